"""`driverscore sink` on a real broker: the scores, alerts and routes topics into DuckDB.

A replay (a new consumer group) or a restart leaves the counts unchanged; a sink killed
with SIGKILL in the middle of a run resumes where its last committed batch ended and the
store ends with every trip exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from driverscore.adapters.kafka.admin import create_topics
from driverscore.adapters.kafka.producer import make_producer
from driverscore.adapters.score_store.duckdb_store import DuckDBScoreStore
from driverscore.adapters.score_store.queries import QueryParams
from driverscore.domain.config import FeatureConfig
from driverscore.domain.features import EVENT_COLUMNS, ping_events
from driverscore.domain.routes import trip_routes
from driverscore.settings import KafkaConfig
from driverscore.simulation.score_records import random_score_records

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

T0 = datetime(2026, 3, 1, tzinfo=UTC)
PERIOD = QueryParams(start=T0 - timedelta(days=1), end=T0 + timedelta(days=5))


def records(n: int, seed: int) -> pl.DataFrame:
    return random_score_records(n, start=T0, seed=seed)


def alerts_of(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("score") < 60).with_columns(pl.lit("risky").alias("alert"))


def produce(
    config: KafkaConfig, topic: str, frame: pl.DataFrame, extra: Sequence[bytes] = ()
) -> None:
    producer = make_producer(config.bootstrap_servers)
    for vehicle, line in zip(
        frame["vehicle_id"].to_list(), frame.write_ndjson().splitlines(), strict=True
    ):
        producer.produce(topic, key=vehicle, value=line.encode())
        producer.poll(0)
    for value in extra:
        producer.produce(topic, key="junk", value=value)
    assert producer.flush(30) == 0


def routes_of(frame: pl.DataFrame) -> pl.DataFrame:
    pings = pl.concat(
        pl.DataFrame(
            {
                "vehicle_id": [row["vehicle_id"]] * 5,
                "trip_id": [row["trip_id"]] * 5,
                "ts": [row["start_ts"] + timedelta(minutes=i) for i in range(5)],
                "lat": [50.0 + i * 0.01 for i in range(5)],
                "lon": [8.0] * 5,
            }
        )
        for row in frame.iter_rows(named=True)
    )
    flagged = ping_events(pings, FeatureConfig())
    # One flag set on each route, to see flags travel through the topic into the store.
    third = pl.int_range(pl.len()).over("vehicle_id", "trip_id") == 2
    return trip_routes(flagged.with_columns(third.alias("hard_brake")))


def sink(
    home: Path, config: KafkaConfig, group: str, *, batch: int = 5_000, idle_s: float | None = 4.0
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVERSCORE_")}
    env.update(
        {
            "DRIVERSCORE_HOME": str(home),
            # The killed sink's partitions move to the next one after its session (6 s).
            "DRIVERSCORE_KAFKA": config.model_copy(
                update={"session_timeout_s": 6.0}
            ).model_dump_json(),
            "DRIVERSCORE_STORE__SINK_GROUP": group,
            "DRIVERSCORE_STORE__SINK_BATCH_RECORDS": str(batch),
            "DRIVERSCORE_STORE__SINK_BATCH_WAIT_S": "0.5",
        }
    )
    args = ["--stop-when-idle", str(idle_s)] if idle_s is not None else []
    return subprocess.Popen(
        [sys.executable, "-m", "driverscore", "sink", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finished(process: subprocess.Popen[bytes], timeout: float = 180) -> str:
    out, _ = process.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text
    return text


def test_a_replayed_or_restarted_sink_leaves_the_counts_unchanged(
    kafka_config: KafkaConfig, tmp_path: Path
) -> None:
    create_topics(kafka_config)
    topics = kafka_config.topics
    frame = records(150, seed=4)
    # At-least-once: 30 trips published twice, as a restarted stream would.
    produce(kafka_config, topics.scores, pl.concat([frame, frame.head(30)]), [b"not json"])
    produce(kafka_config, topics.alerts, alerts_of(frame))
    routes = routes_of(frame.head(12))
    # A route published before points carried event flags, and one with a flag that is
    # not a boolean.
    (old_line, bad_line) = routes.tail(2).write_ndjson().splitlines()
    old, bad = json.loads(old_line), json.loads(bad_line)
    for point in old["route"]:
        for name in EVENT_COLUMNS:
            del point[name]
    bad["route"][0]["speeding"] = "yes"
    produce(
        kafka_config,
        topics.routes,
        routes.head(10),
        [json.dumps(old).encode(), json.dumps(bad).encode()],
    )
    group = f"sink-{uuid.uuid4().hex[:8]}"
    text = finished(sink(tmp_path, kafka_config, group))
    assert "2 rejected" in text
    store = DuckDBScoreStore(tmp_path / "scores.duckdb")
    counts = store.counts()
    assert counts["trip_latest"] == counts["trip_scores"] == frame.height
    assert counts["trip_alerts"] == alerts_of(frame).height
    assert counts["trip_routes"] == 11
    rejected = store.sql("SELECT reason, value, source FROM store_rejects ORDER BY reason")
    assert rejected["reason"].to_list() == ["bad_route", "not_json"]
    assert json.loads(rejected["value"][0]) == bad
    assert rejected.row(1)[:2] == ("not_json", "not json")
    assert rejected.row(1)[2].startswith(f"{topics.scores}/")
    for row in routes.head(10).iter_rows(named=True):
        stored = store.route(row["vehicle_id"], row["trip_id"])
        assert stored.to_dicts() == row["route"]
        assert stored["hard_brake"].sum() == 1
    unflagged = store.route(old["vehicle_id"], old["trip_id"])
    assert unflagged.height == old["point_count"]
    assert not unflagged.select(pl.any_horizontal(EVENT_COLUMNS)).to_series().any()
    answers = {q: store.query(q, PERIOD) for q in ("group_scores", "band_shares", "daily_trend")}
    assert answers["band_shares"]["trip_count"].sum() == frame.height

    # Restart: the group's offsets were committed, nothing is read again.
    restarted = finished(sink(tmp_path, kafka_config, group))
    assert "stored 0 messages" in restarted
    # Replay: a new group reads every message again; the store takes nothing twice.
    replayed = finished(sink(tmp_path, kafka_config, f"{group}-replay"))
    assert f"stored {frame.height + 30 + 1 + alerts_of(frame).height + 12:,} messages" in replayed
    assert "0 new or newer trip records" in replayed
    assert {k: v for k, v in store.counts().items() if k != "store_rejects"} == {
        k: v for k, v in counts.items() if k != "store_rejects"
    }
    for name, answer in answers.items():
        assert store.query(name, PERIOD).equals(answer), name


def test_a_sink_killed_mid_run_resumes_without_loss_or_double_count(
    kafka_config: KafkaConfig, tmp_path: Path
) -> None:
    create_topics(kafka_config)
    frame = records(20_000, seed=6)
    produce(kafka_config, kafka_config.topics.scores, frame)
    group = f"sink-{uuid.uuid4().hex[:8]}"
    store = DuckDBScoreStore(tmp_path / "scores.duckdb")
    first = sink(tmp_path, kafka_config, group, batch=500, idle_s=None)
    try:
        # Kill it once some batches are in, long before the 40 batches are.
        deadline = time.monotonic() + 120
        stored = 0
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if store.path.exists():
                try:
                    stored = store.counts()["trip_scores"]
                except Exception:
                    continue  # the file is being created
                if stored >= 1_500:
                    break
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == -signal.SIGKILL
    at_kill = store.counts()["trip_scores"]
    assert 1_500 <= at_kill < frame.height
    text = finished(sink(tmp_path, kafka_config, group, batch=500))
    counts = store.counts()
    assert counts["trip_scores"] == counts["trip_latest"] == frame.height
    # The restart read from the last committed batch: at most one batch in flight was
    # read twice (written before the kill, not yet committed).
    read_again = int(text.split("stored ")[1].split(" messages")[0].replace(",", ""))
    assert frame.height - at_kill <= read_again <= frame.height - at_kill + 500
    answer = store.query("band_shares", PERIOD)
    assert answer["trip_count"].sum() == frame.height
