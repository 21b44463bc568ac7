"""The dashboard on Kafka: an alert produced on the alerts topic reaches the alerts page
through `driverscore sink` and the store within 5 s, and every page loads on Druid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from dashboard_pages import check_page, entity_paths, score_fleet, serve
from driverscore.adapters.druid.local import apply_supervisors, reset_supervisor, wait_until_counted
from driverscore.adapters.druid.specs import supervisor_specs
from driverscore.adapters.kafka.admin import create_topics
from driverscore.adapters.kafka.producer import make_producer
from driverscore.adapters.registry import open_registry
from driverscore.adapters.score_store.druid import DruidScoreStore
from driverscore.adapters.score_store.duckdb_store import DuckDBScoreStore, StoreMissingError
from driverscore.pipelines.dashboard_run import build_dashboard_app, latest_monitoring_result
from driverscore.services.dashboard import DashboardSources, create_dashboard
from driverscore.services.dashboard.app import standalone_app
from driverscore.settings import DruidConfig, KafkaConfig, Settings
from driverscore.simulation.score_records import random_score_records
from headless_chromium import Chromium

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def publish(config: KafkaConfig, topic: str, frame: pl.DataFrame) -> int:
    producer = make_producer(config.bootstrap_servers)
    lines = frame.write_ndjson().splitlines()
    for vehicle, line in zip(frame["vehicle_id"].to_list(), lines, strict=True):
        producer.produce(topic, key=vehicle, value=line.encode())
        producer.poll(0)
    assert producer.flush(30) == 0
    return len(lines)


def alerts(n: int, start: datetime, seed: int) -> pl.DataFrame:
    records = random_score_records(n, start=start, days=1, seed=seed, scored_at=start)
    return records.filter(pl.col("score") < 60).with_columns(
        pl.lit("risk 0.91 ≥ threshold 0.50 (score 40.0)").alias("alert")
    )


@pytest.fixture
def running_sink(kafka_config: KafkaConfig, tmp_path: Path) -> Iterator[Path]:
    """`driverscore sink` on the test's topics into ``tmp_path``'s store, until the end."""
    create_topics(kafka_config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVERSCORE_")}
    env.update(
        {
            "DRIVERSCORE_HOME": str(tmp_path),
            "DRIVERSCORE_KAFKA": kafka_config.model_dump_json(),
            "DRIVERSCORE_STORE__SINK_GROUP": f"sink-{uuid.uuid4().hex[:8]}",
            "DRIVERSCORE_STORE__SINK_BATCH_WAIT_S": "0.2",
        }
    )
    log = (tmp_path / "sink.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "driverscore", "sink"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield tmp_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def stored_alerts(home: Path) -> int:
    try:
        return DuckDBScoreStore(home / "scores.duckdb").counts()["trip_alerts"]
    except StoreMissingError:
        return 0


def test_an_alert_produced_on_kafka_appears_on_the_alerts_page_within_5_s(
    kafka_config: KafkaConfig, running_sink: Path, tmp_path: Path
) -> None:
    home = running_sink
    now = datetime.now(UTC)
    earlier = alerts(200, now - timedelta(days=2), seed=8)
    publish(kafka_config, kafka_config.topics.alerts, earlier)
    deadline = time.monotonic() + 120
    while stored_alerts(home) < earlier.height:
        assert time.monotonic() < deadline, (home / "sink.log").read_text()[-2000:]
        time.sleep(0.2)

    with serve(build_dashboard_app(Settings(home=home))) as url:
        browser = Chromium(tmp_path / "chromium-profile")
        try:
            for domain in ("Page", "Runtime", "Log"):
                browser.call(f"{domain}.enable")
            check_page(browser, url, "/dashboard/alerts", tmp_path / "alerts-before.png")
            deadline = time.monotonic() + 15
            while "live" not in browser.evaluate(
                "document.getElementById('feed-status').textContent"
            ):
                assert time.monotonic() < deadline, "the live feed did not connect"
                time.sleep(0.05)
            fresh = alerts(40, now - timedelta(hours=1), seed=9).head(1)
            fresh = fresh.with_columns(
                pl.lit("live-trip").alias("trip_id"),
                pl.lit(now).alias("end_ts").cast(fresh["end_ts"].dtype),
            )
            key = f"{fresh['vehicle_id'][0]}/live-trip/{fresh['model_version'][0]}"
            produced = time.monotonic()
            publish(kafka_config, kafka_config.topics.alerts, fresh)
            found = False
            while not found and time.monotonic() - produced < 10:
                found = browser.evaluate(f"!!document.querySelector('tr[data-key=\"{key}\"]')")
                time.sleep(0.05)
            seen_after = time.monotonic() - produced
            first_key = browser.evaluate("document.querySelector('#alerts tbody tr').dataset.key")
            browser.screenshot(tmp_path / "alerts-after.png")
        finally:
            browser.close()
    print(f"alert on the page {seen_after:.2f} s after it was produced")
    assert found and seen_after < 5.0
    # Newest trip end first: the live trip ended last.
    assert first_key == key


def test_every_page_loads_on_druid(
    druid: object, kafka_config: KafkaConfig, tmp_path: Path
) -> None:
    fleet = score_fleet(tmp_path / "home")
    records, fleet_alerts = fleet.output.scores, fleet.output.alerts
    create_topics(kafka_config)
    scores_sent = publish(kafka_config, kafka_config.topics.scores, records)
    alerts_sent = publish(kafka_config, kafka_config.topics.alerts, fleet_alerts)
    run = uuid.uuid4().hex[:8]
    config = DruidConfig(
        trips_datasource=f"trips_{run}",
        alerts_datasource=f"alerts_{run}",
        hourly_datasource=f"hourly_{run}",
    )
    broker, overlord = druid.broker, druid.overlord  # type: ignore[attr-defined]
    ids = apply_supervisors(overlord, supervisor_specs(config, kafka_config))
    try:
        wait_until_counted(broker, config.trips_datasource, scores_sent)
        wait_until_counted(broker, config.alerts_datasource, alerts_sent)
        settings = fleet.settings
        routes = DuckDBScoreStore(settings.store_path)
        sources = DashboardSources(
            reader=DruidScoreStore(
                broker,
                trips_datasource=config.trips_datasource,
                alerts_datasource=config.alerts_datasource,
            ),
            engine="druid",
            route=routes.trip_route,
            registry=lambda: open_registry(settings),
            drift=lambda: latest_monitoring_result(settings),
        )
        paths = ["/dashboard/", "/dashboard/alerts", *entity_paths(records), "/dashboard/model"]
        seen = {}
        with serve(standalone_app(create_dashboard(sources))) as url:
            browser = Chromium(tmp_path / "chromium-profile")
            try:
                for domain in ("Page", "Runtime", "Log", "Network"):
                    browser.call(f"{domain}.enable")
                for i, path in enumerate(paths):
                    seen[path] = check_page(browser, url, path, tmp_path / f"druid-{i}.png")
            finally:
                browser.close()
    finally:
        for supervisor in ids:
            reset_supervisor(overlord, supervisor)
    print(f"screenshots: {tmp_path}")
    assert f"{records.height:,} trips" in seen["/dashboard/"]["text"]
    assert seen["/dashboard/alerts"]["rows"] == fleet_alerts.height > 0
    assert "score store: druid" in seen["/dashboard/model"]["text"]
    assert "no route stored" not in seen[paths[2]]["text"]
