"""Defects real telematics feeds carry, injected for the cleaning stage to catch.

Works on the chunk's ping columns as numpy arrays (``ts_us`` in epoch microseconds,
``lat``, ``lon``, ``speed_mps`` and any other column), before the frame is built.
"""

from __future__ import annotations

import numpy as np

from driverscore.simulation.config import DirtConfig

#: What a broken speed sensor or a decoding bug reports (m/s).
IMPOSSIBLE_SPEED_MPS = 150.0


def inject_dirt(
    rng: np.random.Generator, columns: dict[str, np.ndarray], dirt: DirtConfig
) -> dict[str, np.ndarray]:
    """Return the columns with duplicates, swaps, bad fixes and bad timestamps added."""
    n = len(columns["ts_us"])
    if n < 2:
        return columns

    # Duplicates sit next to their original, as a device re-sending a batch does.
    copies = 1 + (rng.random(n) < dirt.duplicate_rate).astype(np.int64)
    order = np.repeat(np.arange(n), copies)

    # Swap a row with its successor; a chosen row next to another chosen one is skipped so
    # swaps do not chain.
    m = len(order)
    swap = rng.random(m - 1) < dirt.out_of_order_rate
    swap[1:] &= ~swap[:-1]
    first = np.flatnonzero(swap)
    order[first], order[first + 1] = order[first + 1], order[first].copy()

    out = {name: values[order] for name, values in columns.items()}

    zero = rng.random(m) < dirt.zero_coordinate_rate
    out["lat"][zero] = 0.0
    out["lon"][zero] = 0.0

    spike = np.flatnonzero(rng.random(m) < dirt.gps_spike_rate)
    # 0.02-0.1 degree: a jump of 2-11 km for a single fix.
    jump = rng.uniform(0.02, 0.1, (2, len(spike))) * rng.choice([-1.0, 1.0], (2, len(spike)))
    out["lat"][spike] = np.clip(out["lat"][spike] + jump[0], -90.0, 90.0)
    out["lon"][spike] = (out["lon"][spike] + jump[1] + 180.0) % 360.0 - 180.0

    out["speed_mps"][rng.random(m) < dirt.impossible_speed_rate] = IMPOSSIBLE_SPEED_MPS
    out["ts_us"][rng.random(m) < dirt.bad_timestamp_rate] = 0
    return out
