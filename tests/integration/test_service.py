"""The scoring service against a real MLflow registry (SQLite) with registered models."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import pytest
import uvicorn

from driverscore.adapters.registry import CHALLENGER, CHAMPION, ModelRegistry
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.schema import conform_pings
from driverscore.domain.scoring import feature_matrix
from driverscore.services.api import create_app
from driverscore.services.api.holder import RegistryReader
from driverscore.settings import GateConfig, ServiceConfig, Settings, TrainingConfig
from driverscore.training.dataset import label_trips, time_split
from driverscore.training.gate import evaluate, run_gate
from driverscore.training.model import train_model
from driverscore.training.onnx_export import export_onnx
from driverscore.training.synthetic import synthetic_trips

pytestmark = [pytest.mark.integration]

TOKEN = "s3cret-token-for-tests"
START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Backend:
    root: Path
    model_name: str
    versions: tuple[str, str]

    def registry(self) -> ModelRegistry:
        return ModelRegistry(
            tracking_uri=f"sqlite:///{self.root / 'mlflow.db'}",
            registry_uri=None,
            model_name=self.model_name,
            experiment_name="driverscore-service-test",
            artifact_location=str(self.root / "artifacts"),
        )


def _register_two(root: Path, model_name: str) -> Backend:
    features, incidents = synthetic_trips(4000, seed=5)
    labelled = label_trips(features, incidents, datetime(2026, 5, 20, tzinfo=UTC), 7.0)
    train, holdout = time_split(labelled, 0.25)
    backend = Backend(root, model_name, ("", ""))
    registry = backend.registry()
    versions = []
    for max_iter in (30, 60):
        trained = train_model(train, TrainingConfig(max_iter=max_iter, min_samples_leaf=50))
        x = feature_matrix(holdout, trained.feature_names)
        card = trained.model_card(
            cleaning_config=CleaningConfig(),
            trip_config=TripConfig(),
            feature_config=FeatureConfig(),
            lineage={"features": "abc123"},
        )
        metrics = evaluate(
            holdout["incident"].to_numpy(),
            trained.predict_proba(x),
            card.decision_threshold,
            holdout["fleet_id"].to_numpy(),
        )
        report = run_gate(
            metrics, None, GateConfig(min_roc_auc=0.5, max_brier=0.5, max_calibration_error=0.5)
        )
        registered = registry.register(
            trained,
            export_onnx(trained, x),
            card,
            report,
            params={"max_iter": max_iter},
            data_versions={"features": "f" * 16},
            code_version="test",
            sample=holdout.head(5),
        )
        versions.append(registered.version)
    assert registry.alias_version(CHAMPION) == versions[0]
    assert registry.alias_version(CHALLENGER) == versions[1]
    return Backend(root, model_name, (versions[0], versions[1]))


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    return _register_two(tmp_path_factory.mktemp("service-mlflow"), "trip-risk-service")


def _settings(tmp: Path, **service: Any) -> Settings:
    return Settings(home=tmp, service=ServiceConfig(**service))


def trip_pings(seed: int, n: int = 240, start: datetime = START) -> list[dict[str, Any]]:
    """A 1 Hz trip with speed changes, a few hard brakes and a bend, heading north-east."""
    rng = np.random.default_rng(seed)
    speed = 12.0
    lat, lon, heading = 52.5 + seed * 1e-3, 13.4, 40.0
    pings = []
    for i in range(n):
        if i % 60 == 50:
            speed = max(speed - 5.0, 0.0)  # hard brake
        else:
            speed = float(np.clip(speed + rng.normal(0.3, 0.8), 0.0, 30.0))
        if 100 <= i < 110:
            heading = (heading + 6.0) % 360.0
        step = speed / 6_371_000.0
        lat += math.degrees(step * math.cos(math.radians(heading)))
        lon += math.degrees(step * math.sin(math.radians(heading)) / math.cos(math.radians(lat)))
        pings.append(
            {
                "ts": (start + timedelta(seconds=i)).isoformat(),
                "lat": lat,
                "lon": lon,
                "speed_mps": speed,
                "heading_deg": heading,
                "speed_limit_mps": 13.9,
            }
        )
    return pings


def trip_body(seed: int, driver: str = "driver-1", **extra: Any) -> dict[str, Any]:
    return {
        "trip_id": f"trip-{seed}",
        "vehicle_id": f"vehicle-{seed}",
        "driver_id": driver,
        "fleet_id": "fleet-a",
        "pings": trip_pings(seed),
        **extra,
    }


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(
    settings: Settings, registry_factory: Callable[[], RegistryReader]
) -> Iterator[httpx.Client]:
    """The app behind a real uvicorn server on a free localhost port, in a thread."""
    app = create_app(settings, registry_factory)
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "server stopped during start-up"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    settings = _settings(tmp_path_factory.mktemp("service"), tokens=[TOKEN], auth="on")
    with serving(settings, backend.registry) as c:
        yield c


def test_score_from_pings_equals_batch_scoring(client: httpx.Client, backend: Backend) -> None:
    body = trip_body(7)
    response = client.post("/v1/score", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["model_version"] == backend.versions[0]
    assert served["model_role"] == "champion"

    frame = pl.DataFrame(body["pings"]).with_columns(
        pl.col("ts").str.to_datetime(time_zone="UTC"),
        pl.lit(body["trip_id"]).alias("trip_id"),
        pl.lit(body["vehicle_id"]).alias("vehicle_id"),
        pl.lit(body["driver_id"]).alias("driver_id"),
        pl.lit(body["fleet_id"]).alias("fleet_id"),
    )
    scorer = backend.registry().load_scorer(CHAMPION)
    card = scorer.card
    prepared = prepare_trips(
        conform_pings(frame),
        card.cleaning_config,
        card.trip_config,
        card.feature_config,
        datetime.now(UTC),
    )
    expected = scorer.score_trips(prepared.features, datetime.now(UTC)).row(0, named=True)
    assert served["risk_probability"] == pytest.approx(expected["risk_probability"], abs=1e-12)
    assert served["score"] == pytest.approx(expected["score"], abs=1e-9)
    assert served["risk_band"] == expected["risk_band"]
    assert served["reasons"] == expected["reasons"]
    for name, value in served["features"].items():
        if isinstance(value, float):
            assert value == pytest.approx(expected[name], abs=1e-12), name
        else:
            assert value == expected[name], name
