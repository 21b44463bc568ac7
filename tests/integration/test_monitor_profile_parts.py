"""The monitor's window is a merge of the profile parts every writer of trip records stores.

Batch scoring, the REST service and the embedded stream runner each write parts as they
score; `driverscore monitor` merges the parts of its window and judges exactly what a
rescan of the same trip records would, without reading their features.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pytest
from test_scoring_parity import GRACE_S, dirty_input
from test_service import serving, trip_body

from driverscore.adapters.profile_parts import KEY_COLUMNS, ProfilePartStore
from driverscore.adapters.registry import CHAMPION, ModelRegistry, open_registry
from driverscore.adapters.storage import DataStore
from driverscore.domain.monitoring import judge_window
from driverscore.domain.performance import estimate_performance
from driverscore.domain.profiles import ProfileEdges, TripProfile, profile_trips
from driverscore.pipelines.monitoring_run import (
    run_monitor,
    trip_keys,
    window_bounds,
    window_profile,
)
from driverscore.pipelines.scoring_run import run_scoring, write_profiles
from driverscore.services.api.holder import ModelHolder
from driverscore.services.profile_writer import (
    ProfileWriter,
    ReferenceCache,
    build_profile_writer,
    write_scores_profiles,
)
from driverscore.services.stream import PolledModels, StreamMetrics, TripScoringStep
from driverscore.services.stream_embedded import MemoryScoreSink, run_embedded_stream
from driverscore.settings import Settings
from driverscore.training.reference import fit_reference_profile
from driverscore.training.synthetic import register_synthetic_model, synthetic_trips

if TYPE_CHECKING:
    from conftest import S3Server

pytestmark = [pytest.mark.integration]

WINDOW_START = datetime(2026, 6, 1, tzinfo=UTC)
AS_OF = datetime(2026, 7, 1, tzinfo=UTC)
#: The pings of the batch, service and stream paths are driven on 2 March 2026.
PINGS_AS_OF = datetime(2026, 3, 3, tzinfo=UTC)
COMPARED = (
    "verdict",
    "summary",
    "alarms",
    "trips",
    "features",
    "vs_previous_window",
    "slices",
    "skipped_slices",
    "band_shares",
)


@dataclass(frozen=True)
class Champion:
    root: Path
    version: str
    reference: TripProfile

    def settings(self, home: Path) -> Settings:
        return Settings(
            home=home,
            mlflow_tracking_uri=f"sqlite:///{self.root / 'mlflow.db'}",
            model_name="trip-risk-parts",
            experiment_name="profile-parts",
        )

    def registry(self, home: Path) -> ModelRegistry:
        return open_registry(self.settings(home))


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Champion:
    """A champion with its reference profile, as `driverscore train` registers one."""
    root = tmp_path_factory.mktemp("parts-mlflow")
    registry = open_registry(
        Settings(
            home=root / "home",
            mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
            model_name="trip-risk-parts",
            experiment_name="profile-parts",
        )
    )
    registered, _ = register_synthetic_model(registry, trips=4000, seed=5)
    training, _ = synthetic_trips(4000, seed=5)
    reference = fit_reference_profile(training, registry.load_scorer(CHAMPION))
    registry.save_reference_profile(registered.version, reference.to_json_bytes())
    # As every reader gets it back from the registry (canonical JSON: columns by name).
    return Champion(root, registered.version, TripProfile.from_json(reference.to_json_bytes()))


def _ending(frame: pl.DataFrame, start: datetime, end: datetime) -> pl.DataFrame:
    return frame.filter((pl.col("end_ts") >= start) & (pl.col("end_ts") < end))


def test_the_window_merged_from_parts_is_judged_as_a_rescan_of_its_rows(
    champion: Champion, tmp_path: Path
) -> None:
    settings = champion.settings(tmp_path)
    store = DataStore(settings.resolved_data_uri, {})
    registry = champion.registry(tmp_path)
    features, incidents = synthetic_trips(6000, seed=11, start=WINDOW_START, days=30)
    scores = registry.load_scorer(CHAMPION).score_trips(features, AS_OF)
    scores_ref = store.write_dataset("scores", scores, name="scores")
    # What `driverscore score` does after writing its scores dataset.
    written = write_profiles(store, registry, scores, scores_ref)
    assert len(written[champion.version]) > 24 * 20  # one part per hour of trip end
    # The features are gone from the stored records: only a monitor that merges the parts
    # can still see them (a rescan would find every feature missing).
    for uri in store.part_uris(scores_ref):
        pl.read_parquet(uri).select(KEY_COLUMNS).write_parquet(uri)
    assert "distance_km" not in store.read_dataset(scores_ref).columns
    labels = tmp_path / "claims.parquet"
    incidents.with_columns(reported_at=pl.col("incident_ts") + timedelta(days=1)).write_parquet(
        labels
    )

    result = run_monitor(settings, as_of=AS_OF, window_hours=14 * 24, labels_uri=str(labels))

    start, end = window_bounds(AS_OF, 14 * 24)
    edges = champion.reference.edges
    card = registry.load_card(champion.version)
    rescanned = judge_window(
        champion.reference,
        profile_trips(_ending(scores, start, end), edges),
        settings.monitoring,
        model_columns=card.feature_names,
        card_metrics=card.metrics,
        previous=profile_trips(_ending(scores, start - (end - start), start), edges),
        performance=result.result["performance"],
    ).to_dict()
    for key in COMPARED:
        assert result.result[key] == rescanned[key], key
    assert result.result["trips"] == _ending(scores, start, end).height > 2000
    assert result.result["profile_parts"]["scores_profiled_now"] == []
    assert result.result["sources"] == [scores_ref.uri]
    # Performance reads the key, time and probability columns, and finds what the rows give.
    performance = result.result["performance"]
    expected = estimate_performance(
        _ending(scores, start, end).get_column("risk_probability").to_numpy(),
        card.decision_threshold,
    )
    assert performance["estimated"]["roc_auc"] == pytest.approx(expected["roc_auc"])
    assert performance["estimated"]["brier"] == pytest.approx(expected["brier"])
    assert performance["realised"]["n"] >= 2000


@pytest.fixture(scope="module")
def pings() -> pl.DataFrame:
    return dirty_input().pings.sort("ts", "vehicle_id", maintain_order=True)


def _window_trips(settings: Settings) -> dict[str, object]:
    result = run_monitor(settings, as_of=PINGS_AS_OF, window_hours=48).result
    return {
        "trips": result["trips"],
        "estimated_n": result["performance"]["estimated"]["n"],
        "parts": result["profile_parts"]["current"],
        "profiled_now": result["profile_parts"]["scores_profiled_now"],
    }


def test_batch_scoring_writes_the_parts_of_its_trips(
    champion: Champion, pings: pl.DataFrame, tmp_path: Path
) -> None:
    settings = champion.settings(tmp_path)
    source = tmp_path / "pings.parquet"
    pings.write_parquet(source)
    scored = run_scoring(
        settings,
        pings_uri=str(source),
        out_uri=str(tmp_path / "scores.parquet"),
        reference_time=PINGS_AS_OF,
    )
    assert scored.profile_parts[champion.version]
    trips = scored.scores.height
    assert _window_trips(settings) == {
        "trips": trips,
        "estimated_n": trips,
        "parts": len(scored.profile_parts[champion.version]),
        "profiled_now": [],
    }


def test_trips_scored_by_the_service_are_in_the_monitors_window(
    champion: Champion, tmp_path: Path
) -> None:
    settings = champion.settings(tmp_path)
    with serving(settings, lambda: champion.registry(tmp_path)) as client:
        for seed in range(4):
            answer = client.post("/v1/score", json=trip_body(seed))
            assert answer.status_code == 200, answer.text
    # The service wrote its parts when it stopped (and every few minutes while it runs).
    window = _window_trips(settings)
    assert window["trips"] == window["estimated_n"] == 4
    assert window["parts"] >= 1


def test_trips_scored_by_the_embedded_stream_are_in_the_monitors_window(
    champion: Champion, pings: pl.DataFrame, tmp_path: Path
) -> None:
    settings = champion.settings(tmp_path)

    def registry() -> ModelRegistry:
        return champion.registry(tmp_path)

    step = TripScoringStep(
        PolledModels(ModelHolder(registry), poll_interval_s=3600.0),
        StreamMetrics(),
        profile_writer=build_profile_writer(settings, registry, "stream"),
    )
    sink = MemoryScoreSink()
    run_embedded_stream(pings, step, sink, grace_s=GRACE_S)
    window = _window_trips(settings)
    assert window["trips"] == window["estimated_n"] == sink.scores.height > 0
    parts = ProfilePartStore(DataStore(settings.resolved_data_uri, {}))
    start, end = window_bounds(PINGS_AS_OF, 48)
    sources = {p.source["kind"] for p in parts.parts(champion.version, start, end)}
    assert sources == {"stream"}


def test_parts_and_keys_on_an_s3_data_store(s3_server: S3Server) -> None:
    store = DataStore(s3_server.fresh_prefix("parts"), s3_server.storage_options())
    parts = ProfilePartStore(store)
    features, _ = synthetic_trips(600, seed=3, start=WINDOW_START, days=2)
    records = features.with_columns(
        risk_probability=pl.col("distance_km") / 1000.0,
        model_version=pl.lit("7"),
        model_role=pl.lit("champion"),
        scored_at=pl.lit(WINDOW_START + timedelta(days=3)).cast(pl.Datetime("us", "UTC")),
    )
    reference = profile_trips(records, ProfileEdges.fit(records, ["distance_km"]))
    batch, served = records.head(400), records.slice(400)
    ref = store.write_dataset("scores", batch, name="scores")
    write_scores_profiles(parts, batch, ref, {"7": reference})
    writer = ProfileWriter(
        parts, ReferenceCache(lambda _v: reference.to_json_bytes()), source={"kind": "service"}
    )
    writer.observe(served)
    assert writer.flush().rows_profiled == 200
    start, end = WINDOW_START, WINDOW_START + timedelta(days=3)
    assert parts.profiled_scores("7") == {ref.version}
    merged = window_profile(parts, "7", reference, start, end)
    assert merged.profile.equals(profile_trips(records, reference.edges))
    keys = trip_keys(store, parts, "7", start, end)
    assert keys.height == 600
    assert set(keys.columns) <= set(KEY_COLUMNS)
