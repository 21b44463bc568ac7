"""`score --engine spark` scores on the executors and gives what embedded `score` gives.

Row for row, for the champion alone, a canary and a shadow rollout whose challenger learned
other feature thresholds: the score records (and the score file), the trips set aside, the
prediction-log rows, what the score store took, and the prepared datasets' versions.
A real MLflow registry (SQLite) holds both models; the Spark session is the suite's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from driverscore.adapters.files import write_table
from driverscore.adapters.prediction_log import ParquetPredictionLog
from driverscore.adapters.registry import CHALLENGER, CHAMPION, ModelRegistry
from driverscore.adapters.score_store.duckdb_store import open_score_store
from driverscore.domain.config import FeatureConfig
from driverscore.domain.features import trip_features
from driverscore.domain.rollout import RolloutPolicy
from driverscore.pipelines.scoring_run import ScoringRunResult, run_scoring
from driverscore.pipelines.steps import RunContext
from driverscore.settings import Settings
from driverscore.simulation import SimulationConfig, simulate
from driverscore.training.synthetic import register_synthetic_model

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]

REFERENCE = datetime(2030, 1, 1, tzinfo=UTC)
#: The challenger's card: braking and acceleration thresholds the champion does not use.
CHALLENGER_FEATURES = FeatureConfig(hard_brake_mps2=2.0, harsh_accel_mps2=2.0)
POLICIES = {
    "champion": RolloutPolicy(),
    "canary": RolloutPolicy(mode="canary", challenger_percent=50, salt="spark"),
    "shadow": RolloutPolicy(mode="shadow"),
}
LOG_ORDER = ("trip_id", "vehicle_id")


@dataclass(frozen=True)
class Backend:
    root: Path
    model_name: str = "trip-risk-spark"

    def registry(self) -> ModelRegistry:
        return ModelRegistry(
            tracking_uri=f"sqlite:///{self.root / 'mlflow.db'}",
            registry_uri=None,
            model_name=self.model_name,
            experiment_name="spark-scoring",
            artifact_location=str(self.root / "artifacts"),
        )

    def settings(self, spark_settings: Settings, home: Path) -> Settings:
        return spark_settings.model_copy(
            update={
                "home": home,
                "mlflow_tracking_uri": f"sqlite:///{self.root / 'mlflow.db'}",
                "model_name": self.model_name,
                "experiment_name": "spark-scoring",
                # A few vehicle groups of this small fleet, not dozens: each costs a task.
                "spark": spark_settings.spark.model_copy(update={"pings_per_group": 15_000}),
            }
        )


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    backend = Backend(tmp_path_factory.mktemp("spark-scoring-mlflow"))
    registry = backend.registry()
    register_synthetic_model(registry, seed=5, max_iter=30, code_version="test")
    register_synthetic_model(
        registry, seed=9, max_iter=80, code_version="test", feature_config=CHALLENGER_FEATURES
    )
    assert registry.alias_version(CHAMPION) == "1"
    assert registry.alias_version(CHALLENGER) == "2"
    return backend


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dirty simulated fleet in two files, vehicles split across them."""
    pings = simulate(SimulationConfig(vehicles=8, days=2, seed=4)).pings
    folder = tmp_path_factory.mktemp("spark-scoring-fleet")
    odd = pl.col("vehicle_id").str.tail(1).is_in(["1", "3", "5", "7", "9"]).fill_null(False)
    write_table(pings.filter(odd), str(folder / "odd.parquet"), {})
    write_table(pings.filter(~odd), str(folder / "even.parquet"), {})
    return folder


def _score(
    backend: Backend, settings: Settings, fleet: Path, home: Path, mode: str, engine: str
) -> tuple[ScoringRunResult, Settings]:
    settings = backend.settings(settings, home)
    result = run_scoring(
        settings,
        pings_uri=str(fleet),
        out_uri=str(home / "scores.parquet"),
        reference_time=REFERENCE,
        policy=POLICIES[mode],
        engine="spark" if engine == "spark" else "embedded",
    )
    return result, settings


def _log(settings: Settings) -> pl.DataFrame:
    frame = ParquetPredictionLog(settings.home / "prediction_log").read()
    return frame.drop("decision_id").sort(LOG_ORDER)


@pytest.mark.parametrize("mode", list(POLICIES))
def test_spark_scores_on_the_executors_as_embedded_scoring_does(
    spark: Any,
    spark_settings: Settings,
    backend: Backend,
    fleet: Path,
    tmp_path: Path,
    mode: str,
) -> None:
    embedded, embedded_settings = _score(
        backend, spark_settings, fleet, tmp_path / "embedded", mode, "embedded"
    )
    on_spark, spark_run_settings = _score(
        backend, spark_settings, fleet, tmp_path / "spark", mode, "spark"
    )

    scores = on_spark.scores
    assert scores.height > 20
    assert_frame_equal(scores, embedded.scores)
    assert_frame_equal(pl.read_parquet(on_spark.out_uri), pl.read_parquet(embedded.out_uri))
    assert_frame_equal(on_spark.set_aside, embedded.set_aside)
    assert on_spark.prepared.quality["engine"] == "spark"
    assert on_spark.prepared.quality["datasets"] == embedded.prepared.quality["datasets"]
    assert on_spark.scores_ref.version == embedded.scores_ref.version

    log = _log(spark_run_settings)
    assert log.height == on_spark.decisions == embedded.decisions == scores.height
    assert_frame_equal(log, _log(embedded_settings))
    assert on_spark.stored == embedded.stored
    assert on_spark.stored is not None and on_spark.stored.routes > 0
    spark_store, embedded_store = (
        open_score_store(spark_run_settings),
        open_score_store(embedded_settings),
    )
    assert spark_store.counts() == embedded_store.counts()
    # Every column but the wall-clock time each store took the rows at.
    routes = "SELECT * EXCLUDE (stored_at) FROM trip_routes ORDER BY vehicle_id, trip_id"
    assert_frame_equal(spark_store.sql(routes), embedded_store.sql(routes))

    roles = set(scores.get_column("model_role"))
    versions = set(log.get_column("challenger_version").drop_nulls())
    if mode == "champion":
        assert roles == {"champion"} and not versions
    elif mode == "canary":
        # Each model answers some drivers: the split is the service's and the stream's.
        assert roles == {"champion", "challenger"}
        assert versions == {"2"}
    else:
        assert roles == {"champion"}
        assert log.get_column("challenger_score").null_count() == 0
        assert versions == {"2"}


def test_the_challenger_in_the_parity_runs_sees_other_features(
    spark_settings: Settings, backend: Backend, fleet: Path, tmp_path: Path
) -> None:
    """The parity above covers a challenger whose own features differ from the champion's."""
    settings = backend.settings(spark_settings, tmp_path)
    result, _ = _score(backend, spark_settings, fleet, tmp_path, "champion", "embedded")
    pings = RunContext.start(settings, REFERENCE).store.read_dataset(result.prepared.cleaned)
    default = trip_features(pings, FeatureConfig()).sort(LOG_ORDER)
    other = trip_features(pings, CHALLENGER_FEATURES).sort(LOG_ORDER)
    assert (other["hard_brake_count"] != default["hard_brake_count"]).any()
