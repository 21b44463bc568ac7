"""The Spark engine in local mode against the embedded engine on the same pings.

Usage::

    .venv/bin/python bench/bench_spark.py                   # 10M pings
    .venv/bin/python bench/bench_spark.py --pings 1000000   # a quick run

Both engines run the whole import + prepare (read, map, clean, trips, features, quarantine,
versioned datasets written) on the same Parquet files (``bench_features.generate``).
Spark's start-up (JVM, session, the hadoop-aws package resolved from the local cache, a
first Python worker) is timed apart from the run. The projection of cluster throughput
scales the measured cost of a vehicle group in the executors' Python (``prepare_trips``
and Arrow in and out) to more cores: it is a projection, not a measurement — it leaves
out the shuffle over a network, the reads from object storage and the driver's writes,
which a cluster pays.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench_features import generate
from driverscore.pipelines.spark_steps import ingest_spark, prepare_spark
from driverscore.pipelines.steps import RunContext, ingest, prepare
from driverscore.settings import Settings

REFERENCE_TIME = datetime(2030, 1, 1, tzinfo=UTC)
#: Executor cores of the clusters the projection is stated for.
PROJECTED_CORES = (16, 64, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generator", choices=("simulator", "stand-in"), default="stand-in")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ds-bench")
    parser.add_argument("--cores", type=int, default=2, help="Spark local[N].")
    parser.add_argument("--pings-per-group", type=int, default=1_000_000)
    args = parser.parse_args()

    files = generate(args.dir / "pings", args.pings, args.seed, args.generator)
    source = str(files[0].parent / "*.parquet")
    home = Path(tempfile.mkdtemp(prefix="ds-bench-spark-"))
    settings = Settings(
        home=home,
        spark={
            "master": f"local[{args.cores}]",
            "pings_per_group": args.pings_per_group,
            "shuffle_partitions": max(args.cores, args.pings // args.pings_per_group),
            "conf": {"spark.driver.memory": "3g"},
        },
    )
    try:
        ctx = RunContext.start(settings, REFERENCE_TIME)
        started = time.perf_counter()
        embedded = prepare(ctx, ingest(ctx, source))
        embedded_s = time.perf_counter() - started
        pings = embedded.quality["rows_in"]

        from driverscore.adapters.spark.session import spark_session

        started = time.perf_counter()
        spark = spark_session(settings)
        # The JVM, the session and a first Python worker up (workers are reused after).
        spark.range(2).mapInArrow(lambda batches: batches, "id long").count()
        startup_s = time.perf_counter() - started
        started = time.perf_counter()
        ingested = ingest_spark(ctx, spark, source)
        import_s = time.perf_counter() - started
        on_spark = prepare_spark(ctx, spark, ingested)
        spark_s = time.perf_counter() - started
        spark.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)

    same = on_spark.quality["datasets"] == embedded.quality["datasets"]
    cost = on_spark.quality["spark"]
    per_ping_s = cost["executor_seconds"] / pings
    print(
        f"\n{pings:,} pings, {len(files)} files, Spark local[{args.cores}], "
        f"{cost['groups']} vehicle groups"
    )
    print(f"{'engine':<34}{'seconds':>10}{'pings/s':>14}")
    print(f"{'embedded (Polars, one process)':<34}{embedded_s:>10.1f}{pings / embedded_s:>14,.0f}")
    print(f"{'spark local, run':<34}{spark_s:>10.1f}{pings / spark_s:>14,.0f}")
    print(f"{'  of which import (read, map)':<34}{import_s:>10.1f}")
    print(f"{'  of which prepare (shuffle, groups)':<34}{spark_s - import_s:>10.1f}")
    print(f"{'spark start-up (apart)':<34}{startup_s:>10.1f}")
    print(f"spark / embedded: {embedded_s / spark_s:.2f}x; same dataset versions: {same}")
    print(
        f"executor cost: {cost['executor_seconds']:.1f} s over {cost['groups']} groups "
        f"({1 / per_ping_s:,.0f} pings/s per core in prepare_trips; slowest group "
        f"{cost['slowest_group_s']:.1f} s)"
    )
    print("PROJECTION (not a measurement): per-group cost × cores, ignoring shuffle, object")
    print("storage and the driver's writes:")
    for cores in PROJECTED_CORES:
        print(f"  {cores:>4} executor cores: ~{cores / per_ping_s:,.0f} pings/s")
    if not same:
        sys.exit("dataset versions differ between the engines")


if __name__ == "__main__":
    main()
