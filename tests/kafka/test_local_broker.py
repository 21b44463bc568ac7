"""`driverscore kafka up|down|reset` and the commands that use its broker, on a real broker.

The restart test starts a broker of its own in a fresh home (one up/down/up/reset cycle);
the `--close-trips` tests use the suite's broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from confluent_kafka import Consumer, KafkaException, Message
from confluent_kafka.admin import AdminClient

from driverscore.adapters.kafka.admin import create_topics
from driverscore.adapters.kafka.broker import LocalKafkaBroker, broker_state_dir
from driverscore.adapters.kafka.messages import CLOCK_KEY
from driverscore.settings import KafkaConfig

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

#: The broker script's own knobs (jar cache, version, heap) pass through; settings do not.
_SCRIPT_KNOBS = ("DRIVERSCORE_KAFKA_CACHE", "DRIVERSCORE_KAFKA_VERSION", "DRIVERSCORE_KAFKA_HEAP")


def _cli(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`driverscore ARGS` with this home and no other DRIVERSCORE_ setting: no export."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DRIVERSCORE_") or k in _SCRIPT_KNOBS
    }
    clean.update({"DRIVERSCORE_HOME": str(home), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "driverscore", *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _messages(bootstrap: str, topic: str, count: int, timeout_s: float = 60) -> list[Message]:
    """Every message of ``topic`` from the start, read by a new consumer group."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "log_level": 0,
        }
    )
    consumer.subscribe([topic])
    found: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                found.append(message)
        end = time.monotonic() + 1  # anything beyond ``count`` would show here
        while time.monotonic() < end:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                found.append(message)
    finally:
        consumer.close()
    return found


def _answers(bootstrap: str) -> bool:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        return bool(admin.list_topics(timeout=2).brokers)
    except KafkaException:
        return False


@pytest.fixture
def pings_file(day_of_pings: pl.DataFrame, tmp_path: Path) -> Path:
    path = tmp_path / "pings.parquet"
    day_of_pings.sort("ts").head(20).write_parquet(path)
    return path


def test_kafka_up_is_found_by_bare_commands_and_a_restart_keeps_data_and_address(
    tmp_path: Path, pings_file: Path
) -> None:
    home = tmp_path / "home"
    state = broker_state_dir(home)
    try:
        bootstrap = _ok(_cli(home, "kafka", "up")).strip()
        assert (state / "bootstrap").read_text().strip() == bootstrap

        # Bare commands in the same home, without an export, use that broker.
        assert "created  telematics.pings" in _ok(_cli(home, "kafka", "init"))
        assert "sent 20 pings" in _ok(_cli(home, "kafka", "produce", str(pings_file)))
        assert len(_messages(bootstrap, "telematics.pings", 20)) == 20
        cluster_id = (state / "cluster.id").read_text()

        _ok(_cli(home, "kafka", "down"))
        assert not _answers(bootstrap)

        # A restart: same address, same cluster, the topic and its messages still there.
        assert _ok(_cli(home, "kafka", "up")).strip() == bootstrap
        assert (state / "cluster.id").read_text() == cluster_id
        assert "exists   telematics.pings" in _ok(_cli(home, "kafka", "init"))
        assert len(_messages(bootstrap, "telematics.pings", 20)) == 20

        # Only reset wipes: the broker stops and its data, id and address are gone.
        _ok(_cli(home, "kafka", "reset"))
        assert not _answers(bootstrap)
        assert not (state / "data").exists()
        assert not (state / "bootstrap").exists()
        assert not (state / "cluster.id").exists()
    finally:
        LocalKafkaBroker(state).down()


def _clock_times(config: KafkaConfig) -> list[datetime]:
    messages = _messages(config.bootstrap_servers, config.topics.pings, 20 + config.partitions)
    clocks = [m for m in messages if m.key() == CLOCK_KEY.encode()]
    assert len(clocks) == config.partitions
    return [datetime.fromisoformat(json.loads(m.value())["ts"]) for m in clocks]


def test_close_trips_waits_the_trip_gap_of_the_model_card(
    kafka_config: KafkaConfig, home: Path, pings_file: Path
) -> None:
    # The champion of ``home`` was trained with the default 300 s gap; the settings say 45 s.
    create_topics(kafka_config)
    done = _cli(
        home,
        *("kafka", "produce", str(pings_file), "--close-trips"),
        env={"DRIVERSCORE_KAFKA": kafka_config.model_dump_json(), "DRIVERSCORE_TRIPS__GAP_S": "45"},
    )
    _ok(done)
    last = pl.read_parquet(pings_file)["ts"].max()
    assert isinstance(last, datetime)
    expected = last + timedelta(seconds=2 * 300 + kafka_config.grace_s + 1)
    assert set(_clock_times(kafka_config)) == {expected}


def test_close_trips_without_a_model_uses_the_setting_and_says_so(
    kafka_config: KafkaConfig, tmp_path: Path, pings_file: Path
) -> None:
    create_topics(kafka_config)
    done = _cli(
        tmp_path / "empty-home",
        *("kafka", "produce", str(pings_file), "--close-trips"),
        env={"DRIVERSCORE_KAFKA": kafka_config.model_dump_json(), "DRIVERSCORE_TRIPS__GAP_S": "45"},
    )
    _ok(done)
    assert "no model with alias 'champion'" in done.stderr
    last = pl.read_parquet(pings_file)["ts"].max()
    assert isinstance(last, datetime)
    expected = last + timedelta(seconds=2 * 45 + kafka_config.grace_s + 1)
    assert set(_clock_times(kafka_config)) == {expected}
