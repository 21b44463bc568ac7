"""Throughput of cleaning + trips + features: driverscore vs a bare scan vs plain pandas.

Usage::

    .venv/bin/python bench/bench_features.py                      # 10M pings
    .venv/bin/python bench/bench_features.py --pings 100000000    # 100M pings

Simulated pings are written once to Parquet files (one file per simulator chunk, every
vehicle in one file) under ``--dir``; each contender then runs in its own subprocess on
the same files so that its peak RSS is its own:

- floor: read the same columns, nothing else (the I/O + decode cost any engine pays);
- driverscore: ``prepare_trips`` (clean + trips + features) file by file, memory bounded;
- pandas: sort, cut trips by gap, ``groupby(trip).apply`` of a per-trip Python function
  computing the same features, written plainly as a user would; on a subset.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.schema import PING_SCHEMA, conform_pings

REFERENCE_TIME = datetime(2030, 1, 1, tzinfo=UTC)
COLUMNS = list(PING_SCHEMA)


# --------------------------------------------------------------------------- data


def _simulated_chunks(pings: int, seed: int, generator: str) -> Iterator[pl.DataFrame]:
    """Canonical ping frames from the project simulator (with its default dirt) or the
    stand-in below (clean 1 Hz GPS, fast to generate at 100M pings)."""
    if generator == "stand-in":
        yield from _stand_in_chunks(seed)
        return
    try:
        from driverscore.simulation import SimulationConfig, iter_simulation
    except ImportError:  # the simulator is optional for this benchmark
        yield from _stand_in_chunks(seed)
        return
    # ~25k pings per vehicle-week; ask for more vehicles than needed and stop early.
    config = SimulationConfig(
        vehicles=pings // 10_000 + 20, days=7, seed=seed, vehicles_per_chunk=50
    )
    for simulation in iter_simulation(config):
        yield simulation.pings


def _stand_in_chunks(seed: int, vehicles_per_chunk: int = 200) -> Iterator[pl.DataFrame]:
    """1 Hz GPS trips (speed, heading, some speed limits), 6 trips of ~20 min per vehicle."""
    rng = np.random.default_rng(seed)
    start = datetime(2026, 1, 5, 6, tzinfo=UTC)
    chunk = 0
    trip_len, trips = 1200, 6
    while True:
        frames = []
        for v in range(vehicles_per_chunk):
            vehicle = f"veh-{chunk:05d}-{v:04d}"
            n = trip_len * trips
            steps = np.ones(n, dtype=np.int64) * 1_000_000
            steps[::trip_len] = 3_600_000_000  # an hour between trips
            t_us = int(start.timestamp() * 1e6) + np.cumsum(steps)
            accel = rng.normal(0.0, 0.6, n)
            accel[rng.random(n) < 0.002] = -4.5  # occasional hard brakes
            speed = np.clip(np.cumsum(accel) % 60.0, 0.0, 33.0)
            heading = (np.cumsum(rng.normal(0.0, 2.0, n)) + 90.0) % 360.0
            rad = np.radians(heading)
            lat = 48.1 + np.cumsum(speed * np.cos(rad)) / 111_195.0
            lon = 11.5 + np.cumsum(speed * np.sin(rad)) / (111_195.0 * math.cos(math.radians(48.1)))
            limit = np.where(rng.random(n) < 0.5, 13.9, np.nan)
            frames.append(
                pl.DataFrame(
                    {
                        "ts": pl.Series(t_us).cast(pl.Datetime("us", "UTC")),
                        "vehicle_id": [vehicle] * n,
                        "driver_id": [f"drv-{chunk:05d}-{v:04d}"] * n,
                        "lat": lat + rng.normal(0, 2e-5, n),
                        "lon": lon + rng.normal(0, 2e-5, n),
                        "speed_mps": speed,
                        "heading_deg": heading,
                        "speed_limit_mps": pl.Series(limit).fill_nan(None),
                        "fleet_id": ["fleet-a"] * n,
                        "client_id": ["client-1"] * n,
                    }
                )
            )
        yield conform_pings(pl.concat(frames))
        chunk += 1


def generate(directory: Path, pings: int, seed: int, generator: str) -> list[Path]:
    """Write at least ``pings`` rows as Parquet files (reused when already there)."""
    marker = directory / f"done-{pings}-{seed}-{generator}.json"
    if marker.exists():
        return [directory / name for name in json.loads(marker.read_text())]
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.parquet"):
        old.unlink()
    written, files = 0, []
    for index, frame in enumerate(_simulated_chunks(pings, seed, generator)):
        part = frame.head(pings - written)
        path = directory / f"part-{index:05d}.parquet"
        part.write_parquet(path)
        files.append(path)
        written += part.height
        print(f"\r  generated {written:,} / {pings:,} pings", end="", file=sys.stderr)
        if written >= pings:
            break
    print(file=sys.stderr)
    marker.write_text(json.dumps([p.name for p in files]))
    return files


# --------------------------------------------------------------------------- contenders


def run_floor(files: list[Path], limit: int) -> int:
    rows = 0
    for path in files:
        rows += pl.read_parquet(path, columns=COLUMNS).height
    return rows


def run_driverscore(files: list[Path], limit: int) -> int:
    rows = 0
    cleaning, trips, features = CleaningConfig(), TripConfig(), FeatureConfig()
    trip_rows = 0
    for path in files:
        pings = pl.read_parquet(path, columns=COLUMNS)
        prepared = prepare_trips(pings, cleaning, trips, features, REFERENCE_TIME)
        rows += pings.height
        trip_rows += prepared.features.height
    return rows


def _pandas_trip_features(trip: pd.DataFrame) -> pd.Series:
    """The per-trip features, written as a pandas user would (GPS events, 1 Hz)."""
    config = FeatureConfig()
    ts = trip["ts"]
    speed = trip["speed_mps"].to_numpy()
    dt = ts.diff().dt.total_seconds().to_numpy()
    ok = (dt > 0) & (dt <= config.max_dt_s)
    distance = 0.0
    for i in range(1, len(trip)):
        if ok[i]:
            distance += (speed[i] + speed[i - 1]) / 2 * dt[i]
        else:
            lat1, lon1 = (
                math.radians(trip["lat"].iloc[i - 1]),
                math.radians(trip["lon"].iloc[i - 1]),
            )
            lat2, lon2 = math.radians(trip["lat"].iloc[i]), math.radians(trip["lon"].iloc[i])
            a = (
                math.sin((lat2 - lat1) / 2) ** 2
                + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
            )
            distance += 2 * 6_371_008.8 * math.asin(math.sqrt(min(a, 1.0)))
    duration = (ts.iloc[-1] - ts.iloc[0]).total_seconds()
    accel = np.where(ok, np.diff(speed, prepend=np.nan) / np.where(ok, dt, 1.0), np.nan)
    accel[np.abs(accel) > config.max_plausible_accel_mps2] = np.nan
    heading = trip["heading_deg"].to_numpy()
    turn = (np.diff(heading, prepend=np.nan) + 540) % 360 - 180
    mean_speed = (speed + np.roll(speed, 1)) / 2
    lateral = np.where(
        ok & (mean_speed >= config.min_corner_speed_mps), mean_speed * np.radians(turn) / dt, np.nan
    )

    def count(exceed: np.ndarray) -> int:
        events, inside = 0, False
        for hit in exceed:
            if hit and not inside:
                events += 1
            inside = bool(hit)
        return events

    brakes = count(accel <= -config.hard_brake_mps2)
    accels = count(accel >= config.harsh_accel_mps2)
    corners = count(np.abs(lateral) >= config.harsh_corner_mps2)
    weight = np.append(np.where(ok, dt, 0.0)[1:], 0.0)
    moving = speed >= config.idle_speed_mps
    limit = trip["speed_limit_mps"].to_numpy(dtype=float, na_value=np.nan)
    known = moving & ~np.isnan(limit)
    hours = ((ts.astype("int64") / 1e6 + trip["lon"].to_numpy() * 240) % 86400).to_numpy() / 3600
    night = (hours >= config.night_start_hour) | (hours < config.night_end_hour)
    jerk = np.diff(accel, prepend=np.nan) / dt
    jerk = jerk[moving & ~np.isnan(jerk)]
    km = distance / 1000
    return pd.Series(
        {
            "vehicle_id": trip["vehicle_id"].iloc[0],
            "ping_count": len(trip),
            "duration_s": duration,
            "distance_km": km,
            "avg_speed_kmh": km / (duration / 3600) if duration else np.nan,
            "max_speed_kmh": speed.max() * 3.6,
            "p95_speed_kmh": np.percentile(speed, 95) * 3.6,
            "speed_std_kmh": np.std(speed[moving] * 3.6) if moving.any() else np.nan,
            "hard_brake_count": brakes,
            "harsh_accel_count": accels,
            "harsh_corner_count": corners,
            "hard_brake_per_100km": brakes / km * 100 if km else 0.0,
            "harsh_accel_per_100km": accels / km * 100 if km else 0.0,
            "harsh_corner_per_100km": corners / km * 100 if km else 0.0,
            "speeding_share": (
                (weight * known * (speed > limit + config.speeding_tolerance_mps)).sum()
                / (weight * known).sum()
                if (weight * known).sum() > 0
                else np.nan
            ),
            "night_share": (weight * night).sum() / weight.sum() if weight.sum() else np.nan,
            "idle_share": (weight * ~moving).sum() / weight.sum() if weight.sum() else np.nan,
            "stop_count": int((~moving[1:] & moving[:-1]).sum()),
            "jerk_rms_mps3": math.sqrt((jerk**2).mean()) if jerk.size else np.nan,
        }
    )


def run_pandas(files: list[Path], limit: int) -> int:
    frames, rows = [], 0
    for path in files:
        frames.append(pd.read_parquet(path, columns=COLUMNS))
        rows += len(frames[-1])
        if rows >= limit:
            break
    pings = pd.concat(frames).head(limit)
    pings = pings.sort_values(["vehicle_id", "ts"]).reset_index(drop=True)
    gap = pings["ts"].diff().dt.total_seconds() > TripConfig().gap_s
    new_vehicle = pings["vehicle_id"] != pings["vehicle_id"].shift()
    pings["trip"] = (gap | new_vehicle).cumsum()
    pings.groupby("trip").apply(_pandas_trip_features)
    return len(pings)


CONTENDERS = {"floor": run_floor, "driverscore": run_driverscore, "pandas": run_pandas}


def _measure(mode: str, directory: Path, limit: int) -> dict[str, Any]:
    files = sorted(directory.glob("part-*.parquet"))
    before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    rows = CONTENDERS[mode](files, limit)
    seconds = time.perf_counter() - began
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds (user + system, all threads): less sensitive than wall time to other jobs
    # on a shared machine, though not to memory-bandwidth contention.
    cpu = (usage.ru_utime - before.ru_utime) + (usage.ru_stime - before.ru_stime)
    peak_kb = usage.ru_maxrss  # KiB on Linux
    return {
        "mode": mode,
        "pings": rows,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mb": peak_kb / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=10_000_000)
    parser.add_argument("--pandas-pings", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("bench/out/data"))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--generator", choices=["simulator", "stand-in"], default="simulator")
    parser.add_argument("--only", choices=list(CONTENDERS), action="append")
    parser.add_argument("--child", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = args.dir / f"pings-{args.pings}-{args.generator}"
    if args.child:
        limit = args.pandas_pings if args.child == "pandas" else args.pings
        print(json.dumps(_measure(args.child, directory, limit)))
        return

    generate(directory, args.pings, args.seed, args.generator)
    results: dict[str, dict[str, Any]] = {}
    for mode in args.only or list(CONTENDERS):
        command = [sys.executable, __file__, "--child", mode, "--pings", str(args.pings)]
        command += ["--pandas-pings", str(args.pandas_pings), "--dir", str(args.dir)]
        command += ["--generator", args.generator]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
        results[mode]["rate"] = results[mode]["pings"] / results[mode]["seconds"]

    print(
        f"\n{'contender':<13}{'pings':>14}{'seconds':>10}{'pings/s':>14}"
        f"{'CPU s':>9}{'pings/CPU s':>14}{'peak RSS':>12}"
    )
    for mode, r in results.items():
        print(
            f"{mode:<13}{r['pings']:>14,}{r['seconds']:>10.2f}{r['rate']:>14,.0f}"
            f"{r['cpu_seconds']:>9.2f}{r['pings'] / r['cpu_seconds']:>14,.0f}"
            f"{r['peak_rss_mb']:>9,.0f} MB"
        )
    if "driverscore" in results:
        ours = results["driverscore"]
        for other in ("pandas", "floor"):
            if other in results:
                theirs = results[other]
                wall = ours["rate"] / theirs["rate"]
                cpu = (ours["pings"] / ours["cpu_seconds"]) / (
                    theirs["pings"] / theirs["cpu_seconds"]
                )
                print(f"driverscore / {other}: {wall:.2f}x pings/s, {cpu:.2f}x pings per CPU s")


if __name__ == "__main__":
    main()
