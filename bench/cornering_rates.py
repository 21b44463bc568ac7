"""How the GPS cornering rule does on phone and tracker noise: the table of docs/features.md.

Per speed: harsh-corner events per 100 km on a straight drive under the old 1-s heading
rule and under the windowed rule, and how often turns of known lateral acceleration are
counted right (a 0.4 g turn once, a 0.2 or 0.15 g turn never), over independent noise
draws of the simulator's device model.

    .venv/bin/python bench/cornering_rates.py [--draws 20]
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import polars as pl

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.prepare import prepare_trips
from driverscore.simulation.scenarios import constant_turn, straight_drive

NOW = datetime(2026, 2, 1, tzinfo=UTC)
SPEEDS_KMH = (60.0, 90.0, 120.0, 140.0)


def corners(pings: pl.DataFrame, config: FeatureConfig) -> int:
    prepared = prepare_trips(pings, CleaningConfig(), TripConfig(), config, NOW)
    return int(prepared.features["harsh_corner_count"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20, help="Noise draws per cell.")
    parser.add_argument("--profile", default="phone", choices=["phone", "tracker"])
    args = parser.parse_args()
    n, profile = args.draws, args.profile
    new, old = FeatureConfig(), FeatureConfig(cornering="heading_step")
    print(
        f"| speed | straight, old rule (events/100 km) | straight, this rule "
        f"| 0.4 g turn of 45° / 90° found once | 0.2 g turn of 90° not harsh "
        f"| 0.15 g turn not harsh |  ({profile}, {n} draws)"
    )
    print("|---|---|---|---|---|---|")
    for speed in SPEEDS_KMH:
        # 100 km of straight road in five draws of 20 km.
        straight = [straight_drive(speed, 20.0, profile, seed) for seed in range(5)]
        old_rate = sum(corners(p, old) for p in straight)
        new_rate = sum(corners(p, new) for p in straight)

        def right(g: float, turn: float, expected: int, speed: float = speed) -> int:
            return sum(
                corners(constant_turn(speed, g, turn, profile, seed), new) == expected
                for seed in range(n)
            )

        print(
            f"| {speed:.0f} km/h | {old_rate} | {new_rate} "
            f"| {right(0.4, 45.0, 1)}/{n}, {right(0.4, 90.0, 1)}/{n} "
            f"| {right(0.2, 90.0, 0)}/{n} | {right(0.15, 90.0, 0)}/{n} |"
        )


if __name__ == "__main__":
    main()
