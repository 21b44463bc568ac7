"""Simulator throughput against a trivial generator of a frame of the same shape.

    .venv/bin/python bench/bench_simulation.py [--vehicles 540 --days 7]

Prints pings/s for the physical simulator (all chunks, through ``iter_simulation``) and for
a numpy baseline that fills the same canonical columns with random walks (no physics, no
schedule, no labels): the ratio is the price of the physics.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

import numpy as np
import polars as pl

from driverscore.domain.schema import conform_pings
from driverscore.simulation import SimulationConfig, iter_simulation


def baseline_frame(rows: int, seed: int) -> pl.DataFrame:
    """Random walks in the canonical columns: the floor for building a frame this size."""
    rng = np.random.default_rng(seed)
    start = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp() * 1_000_000)
    return conform_pings(
        pl.DataFrame(
            {
                "ts": pl.Series(start + np.arange(rows, dtype=np.int64) * 1_000_000).cast(
                    pl.Datetime("us", "UTC")
                ),
                "vehicle_id": np.char.add("veh-", (np.arange(rows) // 20_000).astype(str)),
                "lat": 45.0 + np.cumsum(rng.normal(0, 1e-5, rows)),
                "lon": 4.0 + np.cumsum(rng.normal(0, 1e-5, rows)),
                "speed_mps": np.abs(np.cumsum(rng.normal(0, 0.3, rows))) % 40,
                "heading_deg": np.cumsum(rng.normal(0, 2, rows)) % 360,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=540)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = SimulationConfig(vehicles=args.vehicles, days=args.days, seed=args.seed)
    started = time.perf_counter()
    rows = sum(chunk.pings.height for chunk in iter_simulation(config))
    simulator_s = time.perf_counter() - started

    started = time.perf_counter()
    baseline_rows = baseline_frame(rows, args.seed).height
    baseline_s = time.perf_counter() - started

    print(f"{'contender':<40} {'pings':>12} {'seconds':>9} {'pings/s':>12}")
    print(
        f"{'simulator (physics, labels, dirt)':<40} {rows:>12,} {simulator_s:>9.2f} "
        f"{rows / simulator_s:>12,.0f}"
    )
    print(
        f"{'numpy random walks (same columns)':<40} {baseline_rows:>12,} {baseline_s:>9.2f} "
        f"{baseline_rows / baseline_s:>12,.0f}"
    )
    print(f"simulator cost: {simulator_s / baseline_s:.1f}x the trivial generator")


if __name__ == "__main__":
    main()
