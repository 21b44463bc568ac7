"""The dashboard's pages: server time per page at 1M stored trips on DuckDB.

Usage::

    .venv/bin/python bench/bench_dashboard.py                  # 1M trips, 5 requests a page
    .venv/bin/python bench/bench_dashboard.py --trips 200000 --repeat 3
    # the same run on another version's package first, then this one, with ratios:
    mkdir -p /tmp/base && git archive main src | tar -x -C /tmp/base
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

Each store is written and served by a child process running this script (``--serve``).
``--baseline DIR`` adds a second one on the package under ``DIR/src`` (its
``PYTHONPATH``): the same data, written first; then every request alternates between
the two servers, so a busy machine slows both alike, and the ratio baseline / this is
printed (above 1: this checkout is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def rescore_ms(store: DuckDBScoreStore, frame: pl.DataFrame, count: int, day: int) -> float:
    """ms of one write of ``count`` trips of day ``day``, scored again later by a newer
    version with other scores (so they move between bands and buckets)."""
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
    return (time.perf_counter() - started) * 1000


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


def pages_of(frame: pl.DataFrame) -> dict[str, str]:
    worst = frame.sort("score").row(0, named=True)
    fleet = frame["fleet_id"][1]
    return {
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


def served(n: int, rescore: int) -> None:
    """The child: write the store, serve the dashboard on it, say where (one JSON line),
    then write a re-scored day for each ``rescore DAY`` line read, until stdin closes."""
    folder = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    try:
        frame, seconds = build_store(folder / "scores.duckdb", n)
        store = DuckDBScoreStore(folder / "scores.duckdb")
        sources = DashboardSources(
            reader=store, engine="duckdb", route=store.trip_route, registry=None
        )
        url, server, thread = serve(standalone_app(create_dashboard(sources)))
        ready = {
            "url": url,
            "package": str(Path(driverscore.__file__).parent),
            "write_s": seconds,
            "counts": store.counts(),
            "pages": pages_of(frame),
        }
        print(json.dumps(ready), flush=True)
        for line in sys.stdin:
            day = int(line.split()[1])
            print(json.dumps({"rescore_ms": rescore_ms(store, frame, rescore, day)}), flush=True)
        server.should_exit = True
        thread.join(timeout=30)
    finally:
        shutil.rmtree(folder)


class Target:
    """One served store: this checkout's package, or a baseline's (``PYTHONPATH``)."""

    def __init__(self, name: str, n: int, rescore: int, source: Path | None) -> None:
        env = dict(os.environ)
        if source is not None:
            env["PYTHONPATH"] = str(source.resolve() / "src")
        command = [sys.executable, __file__, "--serve", "--trips", str(n)]
        self.name = name
        self.process = subprocess.Popen(
            [*command, "--rescore", str(rescore)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready: dict[str, Any] = json.loads(self._line())
        self.http = httpx.Client(base_url=self.ready["url"], timeout=120)
        self.times: dict[str, list[float]] = {}
        self.rescores: list[float] = []
        print(
            f"{name}: {self.ready['package']}: {n:,} trips written in "
            f"{self.ready['write_s']:.1f} s ({self.ready['counts']})",
            flush=True,
        )

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name}: the serving process ended ({self.process.wait()})")
        return line

    def get(self, page: str, path: str, *, timed: bool = True) -> None:
        started = time.perf_counter()
        answer = self.http.get(path)
        elapsed = (time.perf_counter() - started) * 1000
        assert answer.status_code in (200, 404), (self.name, path, answer.status_code)
        if timed:
            self.times.setdefault(page, []).append(elapsed)

    def rescore(self, day: int) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"rescore {day}\n")
        self.process.stdin.flush()
        self.rescores.append(json.loads(self._line())["rescore_ms"])

    def close(self) -> None:
        self.http.close()
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rescore", type=int, default=1_000)
    parser.add_argument("--baseline", type=Path, help="a checkout whose src/ is measured too")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        served(args.trips, args.rescore)
        return
    # Written one after the other; then each request alternates between the two servers,
    # so both see the same load from the rest of the machine.
    targets = [Target("baseline", args.trips, args.rescore, args.baseline)] if args.baseline else []
    targets.append(Target("this", args.trips, args.rescore, None))
    try:
        pages = targets[-1].ready["pages"]
        for page, path in pages.items():
            for target in targets:
                target.get(page, path, timed=False)  # warm: the OS cache of the file
            for _ in range(args.repeat):
                for target in targets:
                    target.get(page, path)
        for day in (5, 15, 25):
            for target in targets:
                target.rescore(day)
    finally:
        for target in targets:
            target.close()
    print(
        f"\npage server time at {args.trips:,} stored trips (DuckDB), median and slowest of "
        f"{args.repeat}, target < {TARGET_MS:.0f} ms"
    )
    head = "".join(f" {t.name + ' p50':>14} {'max':>7}" for t in targets)
    ratio = f" {'ratio':>7}" if len(targets) == 2 else ""
    print(f"{'page':<36}{head}{ratio}  target")
    for page in pages:
        cells = "".join(
            f" {statistics.median(t.times[page]):>14.1f} {max(t.times[page]):>7.1f}"
            for t in targets
        )
        p50s = [statistics.median(t.times[page]) for t in targets]
        verdict = "ok" if p50s[-1] < TARGET_MS else "over"
        factor = f" {p50s[0] / p50s[1]:>6.2f}x" if len(targets) == 2 else ""
        print(f"{page:<36}{cells}{factor}  {verdict}")
    print(f"\nwrites (re-scored: {args.rescore:,} trips of one day, median of 3)")
    for target in targets:
        print(
            f"{target.name:<9} {args.trips:,} trips in one batch {target.ready['write_s']:6.1f} s"
            f"   re-scored batch {statistics.median(target.rescores):7.1f} ms"
        )
    if len(targets) == 2:
        base, this = targets
        print(
            f"ratio baseline / this: one batch {base.ready['write_s'] / this.ready['write_s']:.2f}x"
            f", re-scored batch "
            f"{statistics.median(base.rescores) / statistics.median(this.rescores):.2f}x"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
