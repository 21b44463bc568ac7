"""The dashboard's pages: server time per page at 1M stored trips on DuckDB.

Usage::

    .venv/bin/python bench/bench_dashboard.py                  # 1M trips, 5 requests a page
    .venv/bin/python bench/bench_dashboard.py --trips 200000 --repeat 3
    # the same run on another version's package first, then this one, with ratios:
    git archive main src | tar -x -C /tmp/base
    .venv/bin/python bench/bench_dashboard.py --baseline /tmp/base

The store is written once (``DuckDBScoreStore.write``, one batch) with synthetic but
realistic trips: 30 days, 50 fleets under 10 clients, one vehicle per 50 trips and one
driver per 40, scores skewed high as a real fleet's are (mean about 82), behaviours that
follow the score (hard brakes, harsh acceleration and cornering, speeding and night
shares) and reasons for them, an alert record for each trip below 50 (about 1.5 %), and
a route (about 120 points) for one trip in 50 and for every trip of the pages measured.
Then each page is requested over HTTP from the app served by uvicorn (the app of
``driverscore dashboard``), and the time from request to the last byte is printed:
median and slowest of ``--repeat`` requests after one warm-up, beside the target of
500 ms. Measured, not asserted. The model page has no registry here:
its time is the store's part (the registry's listing is MLflow's, see bench_service.py).

The write cost is printed too: the one batch of all trips (scores, alerts, routes), and a
stream-sized batch on the full store: ``--rescore`` trips of one day scored again by a
newer model version (median of three such batches, each a different day's trips).

``--baseline DIR`` runs this script first on the package under ``DIR/src`` (the
``PYTHONPATH`` of a child process: same data, same machine, back to back) and then on this
checkout's, and prints both with the ratio baseline / this (above 1: this is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import polars as pl
import uvicorn

import driverscore
from driverscore.adapters.score_store.duckdb_store import DuckDBScoreStore
from driverscore.adapters.score_store.records import ScoreBatch
from driverscore.domain.routes import ROUTE_SCHEMA
from driverscore.domain.scoring import band_for_score
from driverscore.services.dashboard import DashboardSources, create_dashboard
from driverscore.services.dashboard.app import standalone_app
from driverscore.simulation.score_records import random_score_records

START = datetime(2026, 1, 1, tzinfo=UTC)
DAYS = 30
TARGET_MS = 500.0
ALERT_SCORE = 50.0


def trips(n: int, seed: int = 0) -> pl.DataFrame:
    """``n`` trip score records whose behaviours explain their scores."""
    rng = np.random.default_rng(seed)
    frame = random_score_records(
        n,
        start=START,
        days=DAYS,
        seed=seed,
        vehicles=max(1, n // 50),
        drivers=max(1, n // 40),
        fleets=50,
        clients=10,
    )
    # Most trips are safe: scores skewed high (mean about 82), 1.5 % below the alert score.
    score = 100.0 - 80.0 * rng.beta(1.3, 5.0, n)
    frame = frame.with_columns(
        pl.Series("score", score),
        pl.Series("risk_band", [band_for_score(s) for s in score.tolist()], dtype=pl.String),
        pl.Series("risk_probability", (100.0 - score) / 100.0),
    )
    risk = (100.0 - score) / 80.0  # 0 (safe) … 1 (risky)
    km = frame["distance_km"].fill_null(0.0).to_numpy()
    brakes = rng.poisson(0.02 * km * (0.2 + 3 * risk))
    accels = rng.poisson(0.015 * km * (0.2 + 2 * risk))
    corners = rng.poisson(0.01 * km * (0.2 + 2 * risk))
    speeding = np.clip(rng.beta(1.2, 12, n) + 0.4 * risk * rng.random(n), 0, 1)
    night = np.where(rng.random(n) < 0.15, rng.random(n), 0.0)
    reasons = [
        [
            text
            for text, on in (
                (f"Hard braking: {b / max(k, 1) * 100:.1f} per 100 km (fleet median 0.8)", b > 0),
                (f"Speeding: {s:.0%} of moving time over the limit (typical 4%)", s > 0.1),
                (f"Night driving: {g:.0%} of the trip (typical 5%)", g > 0.3),
            )
            if on
        ]
        if r > 0.5
        else []
        for b, k, s, g, r in zip(brakes, km, speeding, night, risk, strict=True)
    ]
    client = (frame["fleet_id"].str.slice(1).cast(pl.Int64, strict=False).fill_null(9) % 10).cast(
        pl.String
    )
    return frame.with_columns(
        pl.Series("hard_brake_count", brakes, dtype=pl.Int64),
        pl.Series("harsh_accel_count", accels, dtype=pl.Int64),
        pl.Series("harsh_corner_count", corners, dtype=pl.Int64),
        pl.Series("speeding_share", speeding),
        pl.Series("night_share", night),
        pl.Series("max_speed_kmh", 60 + 80 * speeding + rng.normal(0, 8, n)),
        pl.Series("reasons", reasons, dtype=pl.List(pl.String)),
        # Each fleet belongs to one client, as in a real book of business.
        ("c" + client).alias("client_id"),
    )


def routes(frame: pl.DataFrame, seed: int = 1) -> pl.DataFrame:
    """A wandering route of ~120 points (a point every ~10 s) for each trip of ``frame``."""
    rng = np.random.default_rng(seed)
    rows = []
    for trip in frame.select("vehicle_id", "trip_id", "start_ts").iter_rows(named=True):
        count = int(rng.integers(60, 180))
        heading = np.cumsum(rng.normal(0, 0.25, count))
        step = rng.uniform(0.0005, 0.002, count)
        lat = 48.1 + np.cumsum(step * np.cos(heading))
        lon = 11.5 + np.cumsum(step * np.sin(heading))
        points = [
            {"ts": trip["start_ts"] + timedelta(seconds=10 * i), "lat": la, "lon": lo}
            for i, (la, lo) in enumerate(zip(lat.tolist(), lon.tolist(), strict=True))
        ]
        rows.append((trip["vehicle_id"], trip["trip_id"], count, points))
    return pl.DataFrame(rows, schema=ROUTE_SCHEMA, orient="row")


def alerts_of(frame: pl.DataFrame) -> pl.DataFrame:
    """Alert records for the trips a model's threshold would flag (score below 50)."""
    return frame.filter(pl.col("score") < ALERT_SCORE).with_columns(
        pl.format("risk {} at or above the alert threshold", pl.col("risk_probability")).alias(
            "alert"
        )
    )


def build_store(path: Path, n: int) -> tuple[pl.DataFrame, float]:
    """The store of ``n`` trips; the seconds its one write took."""
    frame = trips(n)
    worst = frame.sort("score").row(0, named=True)
    measured = frame.filter(
        (pl.col("driver_id") == worst["driver_id"]) | (pl.col("vehicle_id") == worst["vehicle_id"])
    )
    sample = pl.concat([frame.gather_every(50), measured]).unique(["vehicle_id", "trip_id"])
    batch = ScoreBatch("bench", scores=frame, alerts=alerts_of(frame), routes=routes(sample))
    started = time.perf_counter()
    DuckDBScoreStore(path).write(batch)
    return frame, time.perf_counter() - started


def rescore_ms(path: Path, frame: pl.DataFrame, count: int) -> float:
    """Median ms of three writes of ``count`` trips of one day, scored again later by a
    newer version with other scores (so they move between bands and buckets)."""
    store = DuckDBScoreStore(path)
    times = []
    for day in (5, 15, 25):
        lo = START + timedelta(days=day)
        picked = frame.filter(pl.col("end_ts").is_between(lo, lo + timedelta(days=1))).head(count)
        again = picked.with_columns(
            pl.lit("2").alias("model_version"),
            (pl.col("scored_at") + timedelta(days=1)).alias("scored_at"),
            (100.0 - pl.col("score")).alias("score"),
        ).with_columns(
            pl.Series("risk_band", [band_for_score(s) for s in (100.0 - picked["score"]).to_list()])
        )
        started = time.perf_counter()
        store.write(ScoreBatch("bench", scores=again))
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def serve(app: object) -> tuple[str, uvicorn.Server, threading.Thread]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def measure(n: int, repeat: int, rescore: int) -> dict[str, object]:
    """Write the store, time each page, then the re-scored batches; print as it goes."""
    folder = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    frame, seconds = build_store(folder / "scores.duckdb", n)
    store = DuckDBScoreStore(folder / "scores.duckdb")
    print(f"package: {Path(driverscore.__file__).parent}")
    print(f"{n:,} trips written in {seconds:.1f} s ({store.counts()})")
    worst = frame.sort("score").row(0, named=True)
    fleet = frame["fleet_id"][1]
    pages = {
        "fleet overview (30 days)": "/dashboard/",
        "fleet overview, one fleet": f"/dashboard/?fleet={fleet}",
        "fleet overview, one client, 7 days": "/dashboard/?client=c3&days=7",
        "high-risk alerts": "/dashboard/alerts",
        "driver page (+ route)": f"/dashboard/drivers/{quote(worst['driver_id'])}"
        f"?trip={quote(worst['trip_id'])}",
        "vehicle page (+ route)": f"/dashboard/vehicles/{quote(worst['vehicle_id'])}",
        "model page (store part)": "/dashboard/model",
        "unknown driver (404)": "/dashboard/drivers/nobody",
    }
    sources = DashboardSources(reader=store, engine="duckdb", route=store.trip_route, registry=None)
    url, server, thread = serve(standalone_app(create_dashboard(sources)))
    print(f"\npage server time at {n:,} stored trips (DuckDB), target < {TARGET_MS:.0f} ms")
    print(f"{'page':<38} {'p50 ms':>8} {'max ms':>8} {'KiB':>7}  target")
    timed: dict[str, float] = {}
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for name, path in pages.items():
                client.get(path)  # warm: the OS cache of the file
                times, size = [], 0
                for _ in range(repeat):
                    started = time.perf_counter()
                    answer = client.get(path)
                    times.append((time.perf_counter() - started) * 1000)
                    size = len(answer.content)
                    assert answer.status_code in (200, 404), (path, answer.status_code)
                p50 = statistics.median(times)
                timed[name] = p50
                verdict = "ok" if p50 < TARGET_MS else "over"
                print(f"{name:<38} {p50:>8.1f} {max(times):>8.1f} {size / 1024:>7.0f}  {verdict}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    small = rescore_ms(folder / "scores.duckdb", frame, rescore)
    print(f"\nwrite of {rescore:,} re-scored trips into the {n:,}-trip store: {small:.1f} ms")
    sys.stdout.flush()
    return {"write_s": seconds, "rescore_ms": small, "pages": timed}


def compare(base: dict[str, Any], this: dict[str, Any], n: int, rescore: int) -> None:
    print(f"\nbaseline vs this checkout at {n:,} trips (ratio = baseline / this)")
    print(f"{'measure':<46} {'baseline':>10} {'this':>10} {'ratio':>7}")
    rows = [(f"{name} (p50 ms)", base["pages"][name], ms) for name, ms in this["pages"].items()]
    rows.append((f"write {n:,} trips, one batch (s)", base["write_s"], this["write_s"]))
    rows.append((f"write {rescore:,} re-scored trips (ms)", base["rescore_ms"], this["rescore_ms"]))
    for name, before, after in rows:
        print(f"{name:<46} {before:>10.1f} {after:>10.1f} {before / after:>6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rescore", type=int, default=1_000)
    parser.add_argument("--baseline", type=Path, help="a checkout whose src/ is run first")
    parser.add_argument("--json", type=Path, help="also write the measures here")
    args = parser.parse_args()
    base: dict[str, Any] | None = None
    if args.baseline is not None:
        answer = Path(tempfile.mkdtemp(prefix="bench-dashboard-")) / "baseline.json"
        print(f"== baseline: {args.baseline}/src")
        sys.stdout.flush()
        env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve() / "src")}
        command = [sys.executable, __file__, "--trips", str(args.trips), "--repeat"]
        command += [str(args.repeat), "--rescore", str(args.rescore), "--json", str(answer)]
        subprocess.run(command, env=env, check=True)
        base = json.loads(answer.read_text())
        print("\n== this checkout")
    this = measure(args.trips, args.repeat, args.rescore)
    if args.json is not None:
        args.json.write_text(json.dumps(this))
    if base is not None:
        compare(base, this, args.trips, args.rescore)


if __name__ == "__main__":
    main()
