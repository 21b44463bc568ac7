"""The live monitor: a process's rolling window of scored trips as Prometheus gauges, and
the stream processor's ``/metrics`` showing them."""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from driverscore.adapters.onnx_model import OnnxRiskModel
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.drift import MonitoringConfig
from driverscore.domain.scoring import TripScorer, feature_matrix
from driverscore.services.live_monitor import LiveMonitor
from driverscore.services.stream import StreamMetrics, TripScoringStep
from driverscore.settings import TrainingConfig
from driverscore.training.dataset import label_trips, time_split
from driverscore.training.model import train_model
from driverscore.training.onnx_export import export_onnx
from driverscore.training.reference import fit_reference_profile
from driverscore.training.synthetic import synthetic_trips

NOW = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def scorer() -> TripScorer:
    features, incidents = synthetic_trips(1500, seed=11)
    labelled = label_trips(features, incidents, datetime(2026, 5, 20, tzinfo=UTC), 7.0)
    train, holdout = time_split(labelled, 0.25)
    trained = train_model(train, TrainingConfig(max_iter=20, min_samples_leaf=50))
    x = feature_matrix(holdout, trained.feature_names)
    card = trained.model_card(
        cleaning_config=CleaningConfig(),
        trip_config=TripConfig(gap_s=300.0),
        feature_config=FeatureConfig(),
        created_at=NOW,
        metrics={"holdout.roc_auc": 0.7, "holdout.brier": 0.05},
    )
    model = OnnxRiskModel(export_onnx(trained, x))
    return TripScorer(model.predict_proba, card, "driverscore", "1", "champion")


@pytest.fixture(scope="module")
def reference(scorer: TripScorer) -> bytes:
    features, _ = synthetic_trips(3000, seed=12)
    return fit_reference_profile(features, scorer).to_json_bytes()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _monitor(reference: bytes | None, clock: Clock, loaded: list[str]) -> LiveMonitor:
    def load(version: str) -> bytes | None:
        loaded.append(version)
        return reference

    return LiveMonitor(
        MonitoringConfig(),
        load,
        card_metrics=lambda _v: (0.1, {"holdout.roc_auc": 0.7}),
        scheduled_result=lambda: {"performance": {"realised": {"roc_auc": 0.71, "n": 900}}},
        min_interval_s=0.0,
        clock=clock,
        load_in_background=False,
    )


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_gauges_show_the_window_and_forget_it_after_an_hour(
    scorer: TripScorer, reference: bytes
) -> None:
    clock, loaded = Clock(), []
    registry = CollectorRegistry()
    monitor = _monitor(reference, clock, loaded).register(registry)
    features, _ = synthetic_trips(400, seed=13)
    monitor.observe(scorer.score_trips(features, NOW), pings_in=1000, quarantined={"gps_spike": 5})
    assert _value(registry, "driverscore_monitor_window_trips") == 400
    assert loaded == ["1"]
    psi = _value(registry, "driverscore_monitor_drift", column="distance_km", statistic="psi")
    assert psi is not None and psi < 0.2
    assert _value(registry, "driverscore_monitor_drift_status", column="distance_km") == 0
    assert _value(registry, "driverscore_monitor_score_shift", statistic="ks") is not None
    auc = _value(registry, "driverscore_monitor_estimated_performance", metric="roc_auc")
    assert auc is not None and 0.5 < auc < 1.0
    assert _value(registry, "driverscore_monitor_realised_performance", metric="roc_auc") == 0.71
    assert _value(registry, "driverscore_monitor_quarantine_share", reason="gps_spike") == 0.005
    assert _value(registry, "driverscore_monitor_verdict") == 0
    # An hour later the minute has left the window.
    clock.now += 3601
    assert _value(registry, "driverscore_monitor_window_trips") == 0


def test_drifted_trips_raise_the_drift_gauges(scorer: TripScorer, reference: bytes) -> None:
    registry = CollectorRegistry()
    monitor = _monitor(reference, Clock(), []).register(registry)
    features, _ = synthetic_trips(600, seed=14)
    drifted = features.with_columns(pl.col("hard_brake_per_100km") * 4.0)
    monitor.observe(scorer.score_trips(drifted, NOW))
    assert _value(registry, "driverscore_monitor_drift_status", column="hard_brake_per_100km") == 2
    assert _value(registry, "driverscore_monitor_verdict") == 2


def test_without_a_reference_only_the_trip_count_shows(scorer: TripScorer) -> None:
    registry = CollectorRegistry()
    monitor = _monitor(None, Clock(), []).register(registry)
    features, _ = synthetic_trips(50, seed=15)
    monitor.observe(scorer.score_trips(features, NOW))
    text = generate_latest(registry).decode()
    assert "driverscore_monitor_window_trips 0.0" in text
    assert "driverscore_monitor_drift{" not in text


def _drive(vehicle: str, start: datetime, n: int = 300) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    lon = 13.4
    metres_per_deg_lon = 111_320.0 * math.cos(math.radians(52.5))
    for i in range(n):
        speed = 12.5 + 2.5 * math.sin(i / 20.0)
        rows.append(
            {
                "ts": start + timedelta(seconds=i),
                "vehicle_id": vehicle,
                "lat": 52.5,
                "lon": round(lon, 7),
                "speed_mps": round(speed, 3),
                "heading_deg": 90.0,
                "speed_limit_mps": 8.0,
            }
        )
        lon += speed / metres_per_deg_lon
    return rows


def test_stream_metrics_carry_the_drift_gauges(scorer: TripScorer, reference: bytes) -> None:
    metrics = StreamMetrics()
    monitor = _monitor(reference, Clock(), []).register(metrics.registry)
    step = TripScoringStep(scorer, metrics, now=lambda: NOW, live_monitor=monitor)
    assert step.score_session(_drive("v1", NOW - timedelta(hours=2))) is not None
    text = generate_latest(metrics.registry).decode()
    assert "driverscore_monitor_window_trips 1.0" in text
    assert 'driverscore_monitor_drift{column="avg_speed_kmh",statistic="psi"}' in text
    assert "driverscore_monitor_estimated_performance" in text


def test_a_hung_registry_never_holds_up_a_scrape(scorer: TripScorer, reference: bytes) -> None:
    """The reference of a new champion is fetched off the scrape: /metrics answered at once
    while the registry hangs, and the trips scored meanwhile count once it answers."""
    release = threading.Event()

    def hung(_version: str) -> bytes:
        release.wait(30)
        return reference

    registry = CollectorRegistry()
    live = LiveMonitor(MonitoringConfig(), hung, min_interval_s=0.0).register(registry)
    features, _ = synthetic_trips(300, seed=16)
    live.observe(scorer.score_trips(features, NOW))
    started = time.monotonic()
    assert _value(registry, "driverscore_monitor_window_trips") == 0
    assert time.monotonic() - started < 1.0
    release.set()
    deadline = time.monotonic() + 10
    while _value(registry, "driverscore_monitor_window_trips") != 300:
        assert time.monotonic() < deadline, "the reference never arrived"
        time.sleep(0.05)
