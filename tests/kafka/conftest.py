"""A real Kafka broker for the suite.

With ``DRIVERSCORE_KAFKA_BOOTSTRAP`` set (CI or a developer's `driverscore kafka up`), the
tests use that broker; otherwise the session starts a single-node KRaft broker with
``adapters/kafka/broker.sh`` (jars fetched from Maven Central once, then cached) and stops
it at the end. Every test uses topics and consumer groups of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from driverscore.adapters.kafka.broker import LocalKafkaBroker, wait_until_ready
from driverscore.adapters.registry import CHAMPION
from driverscore.domain.scoring import TripScorer
from driverscore.pipelines.training_run import open_registry
from driverscore.settings import KafkaConfig, KafkaTopics, Settings
from driverscore.simulation import DirtConfig, SimulationConfig, simulate
from driverscore.training.synthetic import register_synthetic_model


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("DRIVERSCORE_KAFKA_BOOTSTRAP")
    if given:
        wait_until_ready(given)
        yield given
        return
    broker = LocalKafkaBroker(tmp_path_factory.mktemp("kafka"))
    bootstrap = broker.up()
    try:
        yield bootstrap
    finally:
        broker.down()


@pytest.fixture
def kafka_config(kafka_bootstrap: str) -> KafkaConfig:
    """Topics, consumer group and broker address no other test shares."""
    run = uuid.uuid4().hex[:8]
    return KafkaConfig(
        bootstrap_servers=kafka_bootstrap,
        topics=KafkaTopics(
            pings=f"pings-{run}",
            dlq=f"pings-dlq-{run}",
            trip_features=f"features-{run}",
            scores=f"scores-{run}",
            alerts=f"alerts-{run}",
            shadow_scores=f"shadow-{run}",
        ),
        partitions=2,
        consumer_group=f"stream-{run}",
        grace_s=30.0,
        alert_below_score=70.0,
        processing_guarantee="exactly-once",
    )


CLEAN = DirtConfig.clean()


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A driverscore home whose registry holds a champion trained on synthetic trips."""
    root = tmp_path_factory.mktemp("stream-home")
    settings = Settings(home=root)
    registered, _ = register_synthetic_model(
        open_registry(settings), trips=3000, seed=11, max_iter=40, code_version="test"
    )
    assert registered.alias == CHAMPION
    return root


@pytest.fixture(scope="session")
def scorer(home: Path) -> TripScorer:
    return open_registry(Settings(home=home)).load_scorer(CHAMPION)


@pytest.fixture(scope="session")
def day_of_pings() -> pl.DataFrame:
    config = SimulationConfig(vehicles=4, days=1, seed=5, dirt=CLEAN)
    return simulate(config).pings
