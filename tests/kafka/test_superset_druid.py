"""The Superset bundle on Druid: score and alert records published to Kafka (some twice)
and ingested by Druid's supervisors; the bundle imports into the run's Superset, every
chart's query answers with rows through ``/api/v1/chart/data``, counting each trip once,
and the dashboard renders in headless Chromium."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from driverscore.adapters.druid.local import (
    apply_supervisors,
    reset_supervisor,
    wait_until_counted,
)
from driverscore.adapters.druid.specs import supervisor_specs
from driverscore.adapters.kafka.admin import create_topics
from driverscore.adapters.kafka.producer import make_producer
from driverscore.adapters.superset.bundle import (
    CHARTS,
    DASHBOARD_SLUGS,
    BundleTarget,
    bundle_zip,
    druid_sqlalchemy_uri,
)
from driverscore.settings import DruidConfig, KafkaConfig
from driverscore.simulation.score_records import random_score_records

pytestmark = [pytest.mark.superset, pytest.mark.druid, pytest.mark.kafka, pytest.mark.slow]

START = datetime(2026, 1, 1, tzinfo=UTC)


def publish(config: KafkaConfig, topic: str, frame: pl.DataFrame) -> int:
    producer = make_producer(config.bootstrap_servers)
    lines = frame.write_ndjson().splitlines()
    for vehicle, line in zip(frame["vehicle_id"].to_list(), lines, strict=True):
        producer.produce(topic, key=vehicle, value=line.encode())
        producer.poll(0)
    assert producer.flush(30) == 0
    return len(lines)


def test_bundle_on_druid_imports_and_every_chart_answers(
    superset: Any, druid: Any, kafka_config: KafkaConfig, tmp_path: Path
) -> None:
    records = random_score_records(300, start=START, days=4, seed=8)
    alerts = records.filter(pl.col("score") < 30).with_columns(
        pl.lit("score below 30").alias("alert")
    )
    # 20 trips delivered twice (at-least-once): Druid keeps both rows, the charts count one.
    scores = pl.concat([records, records.head(20)])
    create_topics(kafka_config)
    scores_sent = publish(kafka_config, kafka_config.topics.scores, scores)
    alerts_sent = publish(kafka_config, kafka_config.topics.alerts, alerts)
    run = uuid.uuid4().hex[:8]
    config = DruidConfig(
        trips_datasource=f"trips_{run}",
        alerts_datasource=f"alerts_{run}",
        hourly_datasource=f"hourly_{run}",
    )
    ids = apply_supervisors(druid.overlord, supervisor_specs(config, kafka_config))
    try:
        wait_until_counted(druid.broker, config.trips_datasource, scores_sent)
        wait_until_counted(druid.broker, config.alerts_datasource, alerts_sent)
        target = BundleTarget(
            "druid",
            druid_sqlalchemy_uri(druid.broker),
            config.trips_datasource,
            config.alerts_datasource,
        )
        superset.local.import_bundle(bundle_zip([target]))
        data = superset.dashboard_chart_data(DASHBOARD_SLUGS["druid"])

        assert sorted(data) == sorted(c.name for row in CHARTS for c in row)
        assert [name for name, rows in data.items() if not rows] == []
        assert data["Trips"] == [{"trips": records.height}]
        assert len(data["High-risk trip alerts"]) == alerts.height
        assert sum(r["records"] for r in data["Model versions"]) == records.height

        shot = tmp_path / "superset-druid.png"
        shown = superset.screenshot(DASHBOARD_SLUGS["druid"], shot, tmp_path / "chromium")
        print(f"screenshot: {shot} {shown}")
        assert shown["charts"] == len(data)
        assert shown["loading"] == 0 and shown["errors"] == []
    finally:
        for supervisor in ids:
            reset_supervisor(druid.overlord, supervisor)
