"""The scoring service logs its rollout decisions to a real Kafka topic when configured."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from driverscore.adapters.kafka.admin import create_topics
from driverscore.adapters.kafka.prediction_log import KafkaPredictionLog
from driverscore.adapters.registry import CHALLENGER, CHAMPION, ModelRegistry
from driverscore.errors import DriverscoreError
from driverscore.services.api import create_app
from driverscore.settings import KafkaConfig, ServiceConfig, Settings
from driverscore.training.synthetic import register_synthetic_model

pytestmark = [pytest.mark.kafka]

FEATURES: dict[str, Any] = {
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


def _registry(root: Path) -> ModelRegistry:
    return ModelRegistry(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        registry_uri=None,
        model_name="trip-risk-prediction-log",
        experiment_name="driverscore-prediction-log-test",
        artifact_location=str(root / "artifacts"),
    )


@contextmanager
def _serving(settings: Settings, root: Path) -> Iterator[httpx.Client]:
    """The service behind a real uvicorn server on a free localhost port, in a thread."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    app = create_app(settings, lambda: _registry(root))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            # The service listens before its models load: wait until it says it is ready.
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").text
                time.sleep(0.05)
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prediction-log-registry")
    registry = _registry(root)
    for max_iter in (20, 40):
        register_synthetic_model(registry, trips=1500, max_iter=max_iter, code_version="test")
    assert registry.alias_version(CHAMPION) == "1"
    assert registry.alias_version(CHALLENGER) == "2"
    return root


def test_shadow_decisions_reach_the_predictions_topic(
    kafka_config: KafkaConfig, two_models: Path, tmp_path: Path
) -> None:
    create_topics(kafka_config)
    settings = Settings(
        home=tmp_path,
        kafka=kafka_config,
        service=ServiceConfig(rollout_mode="shadow", prediction_log="kafka"),
    )
    trips = [
        {"vehicle_id": f"v{i}", "driver_id": f"d{i}", "trip_id": f"t{i}", "features": FEATURES}
        for i in range(40)
    ]
    with _serving(settings, two_models) as client:
        answer = client.post("/v1/score:batch", json={"trips": trips})
        assert answer.status_code == 200, answer.text
        scores = answer.json()["scores"]
    # Leaving the client stops the app, which flushes the log to the broker.

    log = KafkaPredictionLog(kafka_config.bootstrap_servers, kafka_config.topics.predictions)
    decisions = log.read()
    assert sorted(decisions["trip_id"].to_list()) == sorted(t["trip_id"] for t in trips)
    assert set(decisions["rollout_mode"]) == {"shadow"}
    assert set(decisions["answered_by"]) == {"champion"}
    assert set(decisions["champion_version"]) == {"1"}
    assert set(decisions["challenger_version"]) == {"2"}
    assert decisions["challenger_score"].null_count() == 0
    by_trip = {row["trip_id"]: row for row in decisions.iter_rows(named=True)}
    for trip, score in zip(trips, scores, strict=True):
        assert by_trip[trip["trip_id"]]["champion_score"] == pytest.approx(score["score"])


def test_a_service_whose_prediction_topic_is_missing_does_not_start(
    kafka_config: KafkaConfig, two_models: Path, tmp_path: Path
) -> None:
    missing = kafka_config.model_copy(
        update={
            "topics": kafka_config.topics.model_copy(
                update={"predictions": f"missing-{kafka_config.topics.predictions}"}
            )
        }
    )
    settings = Settings(home=tmp_path, kafka=missing, service=ServiceConfig(prediction_log="kafka"))
    app = create_app(settings, lambda: _registry(two_models))

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(DriverscoreError, match="does not exist"):
        asyncio.run(start())
