"""The score store: DuckDB ingest and query latency, Apache Druid at scale.

Usage::

    .venv/bin/python bench/bench_store.py                          # DuckDB at 1M and 10M trips
    .venv/bin/python bench/bench_store.py --trips 1000000          # DuckDB at 1M only
    .venv/bin/python bench/bench_store.py --druid --druid-trips 1000000

What it prints, side by side:

- **ingest** at the first size: the same frame of trip score records written by
  ``DuckDBScoreStore.write`` (validation, newest per key, the idempotent merges into
  ``trip_scores`` and ``trip_latest``, one transaction) in one batch and in batches of
  ``--batch``, and written again (a replay: every record already stored), against a bare
  ``INSERT INTO t SELECT * FROM frame`` of the same frame into an empty table of the same
  columns;
- **queries**: each query of the set, the file opened read-only per query as every reader
  does, median and slowest of ``--repeat`` runs, at each size;
- **Druid** (``--druid``): the records produced to a Kafka topic as score records (JSON,
  the stream's messages), ingested by the supervisors of ``driverscore druid apply``; the
  end-to-end delay from the last record acknowledged by Kafka to the last record counted
  by Druid SQL; then the query set's latency on Druid beside DuckDB's at the same size.
  Uses ``DRIVERSCORE_KAFKA_BOOTSTRAP`` and ``DRIVERSCORE_DRUID_URL`` /
  ``DRIVERSCORE_DRUID_OVERLORD`` when set, else starts a local broker and Druid.

Records are random (``simulation.score_records``): 30 days, one vehicle per 50 trips, one
driver per 40, 50 fleets, 10 clients.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl

from driverscore.adapters.score_store.duckdb_store import DuckDBScoreStore, _columns_ddl
from driverscore.adapters.score_store.queries import QUERIES, QueryParams
from driverscore.adapters.score_store.records import ScoreBatch
from driverscore.domain.trip_scoring import TRIP_RECORD_SCHEMA
from driverscore.simulation.score_records import random_score_records

START = datetime(2026, 1, 1, tzinfo=UTC)
DAYS = 30


def records(n: int, seed: int = 0) -> pl.DataFrame:
    return random_score_records(
        n,
        start=START,
        days=DAYS,
        seed=seed,
        vehicles=max(1, n // 50),
        drivers=max(1, n // 40),
        fleets=50,
        clients=10,
    )


def alerts_of(frame: pl.DataFrame) -> pl.DataFrame:
    """Alert records for the riskiest trips (score below 30, about one in eight)."""
    return frame.filter(pl.col("score") < 30).with_columns(
        pl.format(
            "risk {} at or above the model's alert threshold", pl.col("risk_probability")
        ).alias("alert")
    )


def add_alerts(path: Path, frame: pl.DataFrame) -> None:
    """Alerts for ``latest_alerts`` (not part of the timed ingest)."""
    DuckDBScoreStore(path).write(ScoreBatch("bench", alerts=alerts_of(frame)))


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bare_insert(path: Path, frame: pl.DataFrame) -> float:
    con = duckdb.connect(str(path))
    try:
        con.execute(f"CREATE TABLE t ({_columns_ddl(TRIP_RECORD_SCHEMA)})")
        arrow = frame.to_arrow()
        con.register("frame", arrow)
        return timed(lambda: con.execute("INSERT INTO t SELECT * FROM frame"))
    finally:
        con.close()


def store_write(path: Path, frame: pl.DataFrame, batch: int) -> float:
    store = DuckDBScoreStore(path)
    started = time.perf_counter()
    for offset in range(0, frame.height, batch):
        store.write(ScoreBatch("bench", scores=frame.slice(offset, batch)))
    return time.perf_counter() - started


def ingest(frame: pl.DataFrame, folder: Path, batch: int) -> Path:
    """Prints the ingest table; returns the one-batch store's file (reused for queries)."""
    n = frame.height
    rows: list[tuple[str, float]] = [("bare INSERT ... SELECT (one statement)", 0.0)]
    rows[0] = (rows[0][0], bare_insert(folder / "bare.duckdb", frame))
    one = folder / f"store-{n}.duckdb"
    rows.append(("store.write, one batch", store_write(one, frame, n)))
    rows.append(
        (f"store.write, batches of {batch:,}", store_write(folder / "b.duckdb", frame, batch))
    )
    rows.append(("store.write again (replay: nothing new)", store_write(one, frame, n)))
    add_alerts(one, frame)
    bare = rows[0][1]
    print(f"\ningest of {n:,} trip score records (DuckDB {duckdb.__version__})")
    print(f"{'writer':<44} {'seconds':>9} {'rows/s':>12} {'vs bare':>8}")
    for name, seconds in rows:
        print(f"{name:<44} {seconds:>9.2f} {n / seconds:>12,.0f} {bare / seconds:>7.2f}x")
    return one


def params_for(frame: pl.DataFrame) -> dict[str, QueryParams]:
    end = START + timedelta(days=DAYS)
    vehicle = frame["vehicle_id"][0]
    base = QueryParams(start=end - timedelta(days=7), end=end)
    out = {name: base for name in QUERIES}
    out["group_scores"] = QueryParams(start=base.start, end=end, level="driver")
    out["score_histogram"] = QueryParams(start=base.start, end=end, level="fleet")
    out["worst_drivers"] = QueryParams(start=base.start, end=end, min_trips=3)
    out["trip_history"] = QueryParams(
        start=end - timedelta(days=DAYS), end=end, entity="vehicle", entity_id=vehicle
    )
    out["trip_behaviours"] = out["trip_history"]
    return out


def latencies(
    run: Callable[[str, QueryParams], pl.DataFrame], params: dict[str, QueryParams], repeat: int
) -> dict[str, tuple[float, float, int]]:
    out: dict[str, tuple[float, float, int]] = {}
    for name, p in params.items():
        run(name, p)  # warm: the OS cache, Druid's segment cache
        times = []
        rows = 0
        for _ in range(repeat):
            started = time.perf_counter()
            rows = run(name, p).height
            times.append(time.perf_counter() - started)
        out[name] = (statistics.median(times) * 1000, max(times) * 1000, rows)
    return out


def print_latencies(columns: dict[str, dict[str, tuple[float, float, int]]]) -> None:
    names = list(next(iter(columns.values())))
    header = f"{'query':<16}" + "".join(f" {c + ' p50/max ms':>28}" for c in columns)
    print(header)
    for name in names:
        cells = "".join(
            f" {f'{v[name][0]:,.1f} / {v[name][1]:,.1f} ({v[name][2]} rows)':>28}"
            for v in columns.values()
        )
        print(f"{name:<16}{cells}")


def duckdb_store_of(
    folder: Path, n: int, reuse: Path | None, seed: int
) -> tuple[Path, pl.DataFrame]:
    frame = records(n, seed)
    if reuse is not None:
        return reuse, frame
    path = folder / f"store-{n}.duckdb"
    store_write(path, frame, 1_000_000)
    add_alerts(path, frame)
    return path, frame


def druid_part(n: int, repeat: int, duck: DuckDBScoreStore, frame: pl.DataFrame) -> None:
    from driverscore.adapters.druid.local import (
        LocalDruid,
        apply_supervisors,
        reset_supervisor,
        wait_until_counted,
    )
    from driverscore.adapters.druid.specs import supervisor_specs
    from driverscore.adapters.kafka.admin import create_topics
    from driverscore.adapters.kafka.broker import LocalKafkaBroker
    from driverscore.adapters.kafka.producer import make_producer
    from driverscore.adapters.score_store.druid import DruidScoreStore
    from driverscore.settings import DruidConfig, KafkaConfig, KafkaTopics

    stops: list[Callable[[], None]] = []
    state = Path(tempfile.mkdtemp(prefix="bench-store-"))
    bootstrap = os.environ.get("DRIVERSCORE_KAFKA_BOOTSTRAP")
    if not bootstrap:
        kafka = LocalKafkaBroker(state / "kafka")
        bootstrap = kafka.up()
        stops.append(kafka.down)
    broker = os.environ.get("DRIVERSCORE_DRUID_URL")
    overlord = os.environ.get("DRIVERSCORE_DRUID_OVERLORD", broker or "")
    if not broker:
        local = LocalDruid(state / "druid")
        broker = local.up()
        overlord = (state / "druid" / "coordinator").read_text().strip()
        stops.append(local.down)
    run = uuid.uuid4().hex[:8]
    config = KafkaConfig(
        bootstrap_servers=bootstrap,
        topics=KafkaTopics(scores=f"bench-scores-{run}", alerts=f"bench-alerts-{run}"),
        partitions=2,
    )
    druid_config = DruidConfig(
        trips_datasource=f"bench_trips_{run}",
        alerts_datasource=f"bench_alerts_{run}",
        hourly_datasource=f"bench_hourly_{run}",
    )
    try:
        create_topics(config)
        ids = apply_supervisors(overlord, supervisor_specs(druid_config, config))
        producer = make_producer(bootstrap)
        started = time.perf_counter()
        alerts = alerts_of(frame)
        for topic, records_ in ((config.topics.alerts, alerts), (config.topics.scores, frame)):
            vehicles = records_["vehicle_id"].to_list()
            for vehicle, line in zip(vehicles, records_.write_ndjson().splitlines(), strict=True):
                while True:
                    try:
                        producer.produce(topic, key=vehicle, value=line.encode())
                        break
                    except BufferError:
                        producer.poll(0.05)
                producer.poll(0)
        producer.flush(300)
        produced = time.perf_counter() - started
        delay = wait_until_counted(broker, druid_config.trips_datasource, n, timeout_s=3600)
        wait_until_counted(broker, druid_config.alerts_datasource, alerts.height, timeout_s=600)
        print(
            f"\nDruid at {n:,} trips: produced to Kafka in {produced:.1f} s "
            f"({n / produced:,.0f} records/s); end-to-end delay from the last record "
            f"acknowledged to the last counted by Druid SQL: {delay:.1f} s"
        )
        engine = DruidScoreStore(
            broker,
            trips_datasource=druid_config.trips_datasource,
            alerts_datasource=druid_config.alerts_datasource,
            timeout_s=300,
        )
        params = params_for(frame)
        print_latencies(
            {
                f"duckdb {n / 1e6:g}M": latencies(duck.query, params, repeat),
                f"druid {n / 1e6:g}M": latencies(engine.query, params, repeat),
            }
        )
        for supervisor in ids:
            reset_supervisor(overlord, supervisor)
    finally:
        for stop in reversed(stops):
            stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--druid", action="store_true")
    parser.add_argument("--druid-trips", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench-store-"))
    folder.mkdir(parents=True, exist_ok=True)
    columns: dict[str, dict[str, tuple[float, float, int]]] = {}
    stores: dict[int, tuple[Path, pl.DataFrame]] = {}
    for i, n in enumerate(args.trips):
        if i == 0:
            frame = records(n)
            stores[n] = (ingest(frame, folder, args.batch), frame)
        else:
            started = time.perf_counter()
            stores[n] = duckdb_store_of(folder, n, None, seed=0)
            print(
                f"\nstore of {n:,} trips written in {time.perf_counter() - started:.1f} s "
                "(batches of 1M)"
            )
        path, frame = stores[n]
        store = DuckDBScoreStore(path)
        columns[f"duckdb {n / 1e6:g}M"] = latencies(store.query, params_for(frame), args.repeat)
    print(f"\nquery set latency, file opened read-only per query ({args.repeat} runs)")
    print_latencies(columns)
    if args.druid:
        n = args.druid_trips
        path, frame = stores.get(n) or duckdb_store_of(folder, n, None, seed=0)
        druid_part(n, args.repeat, DuckDBScoreStore(path), frame)


if __name__ == "__main__":
    main()
