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

import pytest

from driverscore.adapters.kafka.broker import LocalKafkaBroker, wait_until_ready
from driverscore.settings import KafkaConfig, KafkaTopics


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
        ),
        partitions=2,
        consumer_group=f"stream-{run}",
        grace_s=30.0,
        alert_below_score=70.0,
        processing_guarantee="exactly-once",
    )
