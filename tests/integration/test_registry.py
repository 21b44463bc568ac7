"""The MLflow registry adapter against a real MLflow backend (SQLite + local artifacts)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import mlflow.artifacts
import numpy as np
import polars as pl
import pytest

from driverscore.adapters.registry import CHALLENGER, CHAMPION, ModelRegistry
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.scoring import ModelCard, feature_matrix
from driverscore.errors import NoModelError
from driverscore.settings import GateConfig, TrainingConfig
from driverscore.training.dataset import label_trips, time_split
from driverscore.training.gate import GateReport, evaluate, run_gate
from driverscore.training.model import TrainedModel, train_model
from driverscore.training.onnx_export import export_onnx
from driverscore.training.synthetic import register_synthetic_model, synthetic_trips

if TYPE_CHECKING:
    from conftest import MlflowServer, ServeProcess

pytestmark = [
    pytest.mark.integration,
]

SCORED_AT = datetime(2026, 6, 1, tzinfo=UTC)
FEATURES: dict[str, float] = {
    "distance_km": 12.5,
    "avg_speed_kmh": 41.0,
    "p95_speed_kmh": 63.0,
    "speed_std_kmh": 11.0,
    "hard_brake_per_100km": 4.0,
    "harsh_accel_per_100km": 1.0,
    "harsh_corner_per_100km": 0.5,
    "speeding_share": 0.08,
    "speeding_moderate_share": 0.03,
    "speeding_severe_share": 0.01,
    "night_share": 0.0,
    "idle_share": 0.1,
    "jerk_rms_mps3": 0.7,
}


@dataclass(frozen=True)
class Candidate:
    trained: TrainedModel
    onnx_bytes: bytes
    card: ModelCard
    holdout: pl.DataFrame
    probability: np.ndarray


@pytest.fixture(scope="module")
def candidate() -> Candidate:
    features, incidents = synthetic_trips(6000, seed=3)
    labelled = label_trips(features, incidents, datetime(2026, 5, 20, tzinfo=UTC), 7.0)
    train, holdout = time_split(labelled, 0.25)
    trained = train_model(train, TrainingConfig(max_iter=40, min_samples_leaf=50))
    x = feature_matrix(holdout, trained.feature_names)
    onnx_bytes = export_onnx(trained, x)
    card = trained.model_card(
        cleaning_config=CleaningConfig(),
        trip_config=TripConfig(),
        feature_config=FeatureConfig(),
        lineage={"features": "abc123"},
    )
    return Candidate(trained, onnx_bytes, card, holdout, trained.predict_proba(x))


def _report(c: Candidate, config: GateConfig) -> GateReport:
    metrics = evaluate(
        c.holdout["incident"].to_numpy(),
        c.probability,
        c.card.decision_threshold,
        c.holdout["fleet_id"].to_numpy(),
    )
    return run_gate(metrics, None, config)


def _register(registry: ModelRegistry, c: Candidate, report: GateReport, tag: str) -> str:
    registered = registry.register(
        c.trained,
        c.onnx_bytes,
        c.card,
        report,
        params={"max_iter": 40, "run": tag},
        data_versions={"features": "f" * 16, "labels": "1" * 16},
        code_version="deadbeef+0.1.0",
        sample=c.holdout.head(5),
    )
    return registered.version


@pytest.fixture(scope="module")
def sqlite_backend(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One database per module: creating it runs every MLflow schema migration (seconds).
    return tmp_path_factory.mktemp("mlflow-sqlite")


@pytest.fixture
def registry(sqlite_backend: Path, request: pytest.FixtureRequest) -> ModelRegistry:
    # A model name per test keeps their aliases apart in the shared database.
    return ModelRegistry(
        tracking_uri=f"sqlite:///{sqlite_backend / 'mlflow.db'}",
        registry_uri=None,
        model_name=f"trip-risk-{request.node.name}",
        experiment_name="driverscore-test",
        artifact_location=str(sqlite_backend / "artifacts"),
    )


def test_promotion_and_loading(registry: ModelRegistry, candidate: Candidate) -> None:
    _check_promotion_and_loading(registry, candidate)


@pytest.mark.slow
def test_promotion_and_loading_through_an_mlflow_server(
    start_mlflow_server: Callable[[], MlflowServer], candidate: Candidate
) -> None:
    # The conftest's server: stopped with its whole process group (its uvicorn and job
    # runner children), not the parent alone.
    server = start_mlflow_server()
    registry = ModelRegistry(
        tracking_uri=server.url,
        registry_uri=None,
        model_name="trip-risk-served",
        experiment_name="driverscore-served",
    )
    _check_promotion_and_loading(registry, candidate)


def _check_promotion_and_loading(registry: ModelRegistry, candidate: Candidate) -> None:
    passing = _report(
        candidate, GateConfig(min_roc_auc=0.5, max_brier=0.5, max_calibration_error=0.5)
    )
    failing = _report(candidate, GateConfig(min_roc_auc=0.99))
    assert passing.passed and not failing.passed

    with pytest.raises(NoModelError):
        registry.load_scorer(CHAMPION)
    first = _register(registry, candidate, passing, "first")
    assert registry.alias_version(CHAMPION) == first
    second = _register(registry, candidate, passing, "second")
    assert registry.alias_version(CHAMPION) == first
    assert registry.alias_version(CHALLENGER) == second
    third = _register(registry, candidate, failing, "third")
    assert registry.alias_version(CHAMPION) == first
    assert registry.alias_version(CHALLENGER) == second
    assert registry.version_tags(third)["gate_status"] == "failed"
    assert "role" not in registry.version_tags(third)

    scorer = registry.load_scorer(CHAMPION)
    assert scorer.model_version == first and scorer.model_role == CHAMPION
    served = scorer.score_trips(candidate.holdout, SCORED_AT)
    local = candidate.trained.scorer(candidate.card, registry.model_name, first, CHAMPION)
    expected = local.score_trips(candidate.holdout, SCORED_AT)
    np.testing.assert_allclose(served["score"].to_numpy(), expected["score"].to_numpy(), atol=1e-3)
    assert served["risk_band"].to_list() == expected["risk_band"].to_list()
    assert registry.load_card(first) == candidate.card

    shadow = registry.load_scorer(CHALLENGER, role="shadow")
    assert (
        shadow.score_trips(candidate.holdout.head(3), SCORED_AT)["model_role"].to_list()
        == ["shadow"] * 3
    )


def test_lineage_is_recorded(registry: ModelRegistry, candidate: Candidate) -> None:
    report = _report(
        candidate, GateConfig(min_roc_auc=0.5, max_brier=0.5, max_calibration_error=0.5)
    )
    version = _register(registry, candidate, report, "lineage")
    run_id = registry.client.get_model_version(registry.model_name, version).run_id
    assert run_id is not None
    run = registry.client.get_run(run_id)
    tags = run.data.tags
    assert tags["data_version.features"] == "f" * 16
    assert tags["data_version.labels"] == "1" * 16
    assert tags["code_version"] == "deadbeef+0.1.0"
    assert tags["gate_status"] == "passed"
    assert run.data.params["max_iter"] == "40"
    assert "holdout.roc_auc" in run.data.metrics
    artifacts = {a.path for a in registry.client.list_artifacts(run_id)}
    assert {"model_card.json", "onnx", "model", "gate_report.json"} <= artifacts
    assert registry.version_tags(version)["data_version.features"] == "f" * 16


def test_sklearn_flavour_is_servable_by_mlflow(
    registry: ModelRegistry, candidate: Candidate, tmp_path: Path
) -> None:
    """``mlflow models serve -m models:/<name>@champion`` loads this pyfunc and calls it."""
    # Imported here: importing mlflow.pyfunc warns (see pytestmark), and collection-time
    # warnings are not covered by the module's filterwarnings marks.
    from mlflow.pyfunc import load_model

    report = _report(
        candidate, GateConfig(min_roc_auc=0.5, max_brier=0.5, max_calibration_error=0.5)
    )
    _register(registry, candidate, report, "pyfunc")
    # Resolve the alias through our client: MLflow's ``models:/`` download ignores an
    # explicit registry URI and would fall back to the process default.
    version = registry.alias_version(CHAMPION)
    assert version is not None
    run_id = registry.client.get_model_version(registry.model_name, version).run_id
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="model",
        dst_path=str(tmp_path),
        tracking_uri=registry.tracking_uri,
    )
    model = load_model(local)
    x = feature_matrix(candidate.holdout.head(20), candidate.trained.feature_names)
    assert model.metadata.signature is not None
    np.testing.assert_allclose(
        np.asarray(model.predict(x))[:, 1], candidate.trained.predict_proba(x), atol=1e-12
    )


def _answer(client: httpx.Client, trip: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/score", json=trip)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _failed_polls(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('driverscore_registry_polls_total{outcome="failed"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.slow
def test_service_rides_out_a_registry_server_outage(
    start_mlflow_server: Callable[[], MlflowServer],
    start_serve: Callable[..., ServeProcess],
    tmp_path: Path,
) -> None:
    """The registry (a real MLflow server) dies under a serving ``driverscore serve``: the
    models loaded keep answering, a rollback through the rollout file takes effect within
    its reload interval, decisions still reach the prediction log on disk, failed polls
    are counted."""
    server = start_mlflow_server()
    registry = ModelRegistry(
        tracking_uri=server.url,
        registry_uri=None,
        model_name="trip-risk-outage",
        experiment_name="driverscore-outage",
    )
    champion, _ = register_synthetic_model(registry, max_iter=30, trips=2000)
    challenger, _ = register_synthetic_model(registry, max_iter=40, trips=2000)
    assert (champion.alias, challenger.alias) == (CHAMPION, CHALLENGER)

    rollout = tmp_path / "rollout.json"
    rollout.write_text('{"mode": "canary", "challenger_percent": 100}')
    log_dir = tmp_path / "predictions"
    reload_s = 0.5
    serve = start_serve(
        MLFLOW_TRACKING_URI=server.url,
        MODEL_NAME=registry.model_name,
        SERVICE__POLL_INTERVAL_S="1",
        SERVICE__ROLLOUT_FILE=str(rollout),
        SERVICE__ROLLOUT_RELOAD_S=str(reload_s),
        SERVICE__PREDICTION_LOG_DIR=str(log_dir),
    )
    trip = {"vehicle_id": "v-1", "driver_id": "d-1", "features": FEATURES}
    with httpx.Client(base_url=serve.url, timeout=10) as client:
        deadline = time.monotonic() + 120
        while True:
            assert serve.process.poll() is None, serve.log_text()
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, serve.log_text()
            time.sleep(0.2)
        assert _answer(client, trip)["model_role"] == "challenger"

        # First the registry hangs (every call waits for its timeout), then it is gone.
        server.freeze()
        # Requests never wait for the registry: answered by the models already loaded.
        during = [_answer(client, {**trip, "trip_id": f"during-{i}"}) for i in range(3)]
        assert {a["model_version"] for a in during} == {challenger.version}

        time.sleep(1.5)  # a poll is now waiting on the hung registry
        rollout.write_text('{"mode": "champion"}')
        written = time.monotonic()
        while _answer(client, trip)["model_role"] != "champion":
            assert time.monotonic() - written < reload_s + 2.0, serve.log_text()[-3000:]
            time.sleep(0.05)
        after = _answer(client, {**trip, "trip_id": "after-rollback"})
        assert after["model_version"] == champion.version

        # Decisions still reach the disk, flushed every second whatever the registry does.
        expected = {a["decision_id"] for a in [*during, after]}
        deadline = time.monotonic() + 5
        while True:
            parts = sorted(log_dir.glob("part-*.parquet"))
            logged = set(pl.read_parquet(parts)["decision_id"].to_list()) if parts else set()
            if expected <= logged:
                break
            assert time.monotonic() < deadline, (expected - logged, serve.log_text()[-3000:])
            time.sleep(0.2)

        # A hung call ends at its timeout (5 s, one retry), and the failed poll is counted.
        deadline = time.monotonic() + 30
        while _failed_polls(client) == 0:
            assert time.monotonic() < deadline, serve.log_text()[-3000:]
            time.sleep(0.2)
        server.kill()
        failed = _failed_polls(client)
        deadline = time.monotonic() + 20
        while _failed_polls(client) <= failed:
            assert time.monotonic() < deadline, serve.log_text()[-3000:]
            time.sleep(0.2)
        assert client.get("/readyz").status_code == 200
        assert _answer(client, trip)["model_version"] == champion.version
    log = serve.log_text()
    assert "cannot load models from the registry; serving the models already loaded" in log
