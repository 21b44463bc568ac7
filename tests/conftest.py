"""Engines the whole suite shares: one Kafka broker per run.

With ``DRIVERSCORE_KAFKA_BOOTSTRAP`` set (CI or a developer's `driverscore kafka up`), the
tests use that broker; otherwise the first test that needs it starts a single-node KRaft
broker with ``adapters/kafka/broker.sh`` (jars fetched from Maven Central once, then
cached), and the session stops it at the end. The Kafka and the container tests use the
same one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from driverscore.adapters.kafka.broker import LocalKafkaBroker, wait_until_ready


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
