"""DuckDB and a real Druid, both fed from the same Kafka topics, answer the query set alike.

A simulated day is scored on the one scoring path (the embedded runner), its score and
alert records are published to Kafka with duplicates (trips published twice, as an
at-least-once stream does after a restart, and trips rescored by a second model version),
then read by `driverscore sink`'s loop into DuckDB and by Druid's Kafka supervisors.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from driverscore.adapters.druid.local import (
    apply_supervisors,
    reset_supervisor,
    wait_until_counted,
)
from driverscore.adapters.druid.specs import supervisor_specs
from driverscore.adapters.kafka.admin import create_topics
from driverscore.adapters.kafka.consumer import TopicReader
from driverscore.adapters.kafka.producer import make_producer
from driverscore.adapters.score_store.druid import DruidScoreStore
from driverscore.adapters.score_store.duckdb_store import DuckDBScoreStore
from driverscore.adapters.score_store.queries import QUERIES, QueryParams
from driverscore.domain.scoring import TripScorer, band_for_score
from driverscore.services.score_sink import ScoreSinkRunner
from driverscore.services.stream import StreamMetrics, TripScoringStep
from driverscore.services.stream_embedded import MemoryScoreSink, run_embedded_stream
from driverscore.settings import DruidConfig, KafkaConfig
from driverscore.simulation import DirtConfig, SimulationConfig, simulate

pytestmark = [pytest.mark.druid, pytest.mark.kafka, pytest.mark.slow]


def publish(config: KafkaConfig, topic: str, frame: pl.DataFrame) -> int:
    producer = make_producer(config.bootstrap_servers)
    lines = frame.write_ndjson().splitlines()
    for vehicle, line in zip(frame["vehicle_id"].to_list(), lines, strict=True):
        producer.produce(topic, key=vehicle, value=line.encode())
        producer.poll(0)
    assert producer.flush(30) == 0
    return len(lines)


def with_duplicates(records: pl.DataFrame) -> pl.DataFrame:
    """The day's records, then: 8 trips again as they were (a message delivered twice),
    8 trips published again a minute later (a restarted stream scores them anew), and 6
    trips rescored by model version 2 with other scores (the newest record wins)."""
    again = records.slice(8, 8).with_columns(pl.col("scored_at") + timedelta(minutes=1))
    rescored = records.slice(16, 6)
    scores = [max(0.0, s - 25.0) for s in rescored["score"].to_list()]
    rescored = rescored.with_columns(
        pl.lit("2").alias("model_version"),
        pl.lit("challenger").alias("model_role"),
        pl.Series("score", scores, dtype=pl.Float64),
        pl.Series("risk_band", [band_for_score(s) for s in scores], dtype=pl.String),
        pl.col("scored_at") + timedelta(minutes=2),
    )
    return pl.concat([records, records.head(8), again, rescored])


def assert_same(name: str, duck: pl.DataFrame, druid: pl.DataFrame) -> None:
    assert duck.columns == druid.columns, name
    assert duck.height == druid.height, (name, duck, druid)
    for column in duck.columns:
        left, right = duck[column], druid[column]
        if left.dtype == pl.Float64:
            assert left.to_list() == pytest.approx(right.to_list(), rel=1e-9, abs=1e-9), (
                name,
                column,
            )
        elif isinstance(left.dtype, pl.Datetime):
            # Druid keeps milliseconds.
            assert left.dt.truncate("1ms").to_list() == right.to_list(), (name, column)
        else:
            assert left.to_list() == right.to_list(), (name, column)


def test_duckdb_and_druid_give_equal_answers_on_a_day_published_with_duplicates(
    druid: object,
    kafka_config: KafkaConfig,
    scorer: TripScorer,
    tmp_path: Path,
) -> None:
    pings = simulate(SimulationConfig(vehicles=10, days=1, seed=21, dirt=DirtConfig.clean())).pings
    memory = MemoryScoreSink()
    run_embedded_stream(pings, TripScoringStep(scorer, StreamMetrics()), memory, grace_s=30)
    records, alerts = memory.scores, memory.alerts
    assert records.height >= 30 and alerts.height >= 3
    create_topics(kafka_config)
    topics = kafka_config.topics
    scores_sent = publish(kafka_config, topics.scores, with_duplicates(records))
    alerts_sent = publish(kafka_config, topics.alerts, pl.concat([alerts, alerts.head(2)]))

    run = uuid.uuid4().hex[:8]
    config = DruidConfig(
        trips_datasource=f"trips_{run}",
        alerts_datasource=f"alerts_{run}",
        hourly_datasource=f"hourly_{run}",
    )
    endpoints = druid
    broker, overlord = endpoints.broker, endpoints.overlord  # type: ignore[attr-defined]
    submitted = time.monotonic()
    ids = apply_supervisors(overlord, supervisor_specs(config, kafka_config))
    try:
        # DuckDB: the sink's loop on the same topics, until they are drained.
        store = DuckDBScoreStore(tmp_path / "scores.duckdb")
        runner = ScoreSinkRunner(store, topics, batch_records=50, batch_wait_s=0.5)
        reader = TopicReader(
            kafka_config.bootstrap_servers, f"sink-{run}", runner.topics, runner.flush
        )
        try:
            runner.run(reader, stop_when_idle_s=3.0)
        finally:
            reader.close()
        assert store.counts()["trip_latest"] == records.height

        wait_until_counted(broker, config.trips_datasource, scores_sent)
        wait_until_counted(broker, config.alerts_datasource, alerts_sent)
        print(f"druid counted every record {time.monotonic() - submitted:.1f} s after apply")
        engine = DruidScoreStore(
            broker,
            trips_datasource=config.trips_datasource,
            alerts_datasource=config.alerts_datasource,
        )
        ends = records["end_ts"]
        day = QueryParams(start=ends.min() - timedelta(hours=1), end=ends.max())  # type: ignore[operator,arg-type]
        # Half of the day, and at least half of its alerts: every query has rows in both.
        middle = max(ends.sort()[records.height // 2], alerts["end_ts"].sort()[alerts.height // 2])
        periods = [day, QueryParams(start=day.start, end=middle)]  # type: ignore[arg-type]
        vehicle = records["vehicle_id"][0]
        driver = records["driver_id"][3]
        compared = 0
        for period in periods:
            for name in QUERIES:
                variants = [period]
                if name in ("group_scores", "score_histogram"):
                    variants = [
                        QueryParams(start=period.start, end=period.end, level=level)
                        for level in ("driver", "vehicle", "fleet", "client")
                    ]
                if name == "trip_history":
                    variants = [
                        QueryParams(
                            start=period.start, end=period.end, entity="vehicle", entity_id=vehicle
                        ),
                        QueryParams(
                            start=period.start, end=period.end, entity="driver", entity_id=driver
                        ),
                    ]
                for params in variants:
                    duck = store.query(name, params)
                    assert duck.height, (name, params)
                    assert_same(name, duck, engine.query(name, params))
                    compared += 1
        assert compared == 2 * (len(QUERIES) + 3 + 3 + 1)
        # The duplicates are in Druid, and counted once: the rescored trips by version 2.
        versions = store.query("model_versions", day)
        assert versions.filter(pl.col("model_version") == "2")["trip_count"].to_list() == [6]
        rollup = engine.sql(f'SELECT SUM("records") AS n FROM "{config.hourly_datasource}"')
        assert rollup["n"].to_list() == [scores_sent]
    finally:
        for supervisor in ids:
            reset_supervisor(overlord, supervisor)
