"""What the routes' event flags cost trip preparation: ``prepare_trips`` without and with
``events=True`` (the stream's path), on one closed trip and on a day of a fleet.

The flags come from the feature pass itself (no second computation); the difference is
the four boolean columns added to the kept pings. Prints the median time of each, side by
side, and the ratio.

    .venv/bin/python bench/bench_route_events.py --vehicles 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import polars as pl

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.routes import trip_routes
from driverscore.simulation import DirtConfig, SimulationConfig, simulate

_NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _median_s(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    pings = simulate(
        SimulationConfig(
            vehicles=args.vehicles, days=1, seed=7, dirt=DirtConfig.clean(), include_trip_id=True
        )
    ).pings
    first_trip = pings.filter(
        (pl.col("vehicle_id") == pings["vehicle_id"][0])
        & (pl.col("trip_id") == pings["trip_id"][0])
    )
    configs = (CleaningConfig(), TripConfig(), FeatureConfig())
    print(
        f"{'input':<28}{'pings':>10}{'plain ms':>12}{'events ms':>12}{'ratio':>8}{'+routes ms':>12}"
    )
    for name, frame in (
        ("one closed trip", first_trip),
        (f"{args.vehicles} vehicles, 1 day", pings),
    ):
        plain = _median_s(lambda f=frame: prepare_trips(f, *configs, _NOW), args.repeat)
        flagged = _median_s(
            lambda f=frame: prepare_trips(f, *configs, _NOW, events=True), args.repeat
        )
        kept = prepare_trips(frame, *configs, _NOW, events=True).pings
        routes = _median_s(lambda k=kept: trip_routes(k), args.repeat)
        print(
            f"{name:<28}{frame.height:>10,}{plain * 1e3:>12.2f}{flagged * 1e3:>12.2f}"
            f"{flagged / plain:>8.2f}{routes * 1e3:>12.2f}"
        )


if __name__ == "__main__":
    main()
