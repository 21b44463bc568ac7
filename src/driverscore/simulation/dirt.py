"""Defects real telematics feeds carry, injected for the cleaning stage to catch.

Two steps, so the pings are gathered once: :func:`dirty_order` says which rows the feed
carries in which order (duplicates next to their original, neighbours swapped), and
:func:`corrupt_values` then breaks values in place (``ts_us`` in epoch microseconds,
``lat``, ``lon``, ``speed_mps``).
"""

from __future__ import annotations

import numpy as np

from driverscore.simulation.config import DirtConfig

#: What a broken speed sensor or a decoding bug reports (m/s).
IMPOSSIBLE_SPEED_MPS = 150.0


def dirty_order(rng: np.random.Generator, n: int, dirt: DirtConfig) -> np.ndarray:
    """Row order of the feed: some rows sent twice, some swapped with their successor."""
    copies = 1 + (rng.random(n) < dirt.duplicate_rate).astype(np.int64)
    order = np.repeat(np.arange(n), copies)
    if len(order) < 2:
        return order
    swap = rng.random(len(order) - 1) < dirt.out_of_order_rate
    # A chosen row next to another chosen one is skipped so swaps do not chain.
    swap[1:] &= ~swap[:-1]
    first = np.flatnonzero(swap)
    order[first], order[first + 1] = order[first + 1], order[first].copy()
    return order


def corrupt_values(
    rng: np.random.Generator, columns: dict[str, np.ndarray], dirt: DirtConfig
) -> None:
    """Break fixes in place: (0, 0) positions, kilometre jumps, 150 m/s, epoch-0 times."""
    m = len(columns["ts_us"])
    zero = rng.random(m) < dirt.zero_coordinate_rate
    columns["lat"][zero] = 0.0
    columns["lon"][zero] = 0.0

    spike = np.flatnonzero(rng.random(m) < dirt.gps_spike_rate)
    # 0.02-0.1 degree: a jump of 2-11 km for a single fix.
    jump = rng.uniform(0.02, 0.1, (2, len(spike))) * rng.choice([-1.0, 1.0], (2, len(spike)))
    columns["lat"][spike] = np.clip(columns["lat"][spike] + jump[0], -90.0, 90.0)
    columns["lon"][spike] = (columns["lon"][spike] + jump[1] + 180.0) % 360.0 - 180.0

    columns["speed_mps"][rng.random(m) < dirt.impossible_speed_rate] = IMPOSSIBLE_SPEED_MPS
    columns["ts_us"][rng.random(m) < dirt.bad_timestamp_rate] = 0
