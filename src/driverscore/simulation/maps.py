"""What the map says: the posted limit at each fix, as map matching delivers it.

Map limits are mostly right but not everywhere. On short stretches the limit is wrong (a
roadworks or school-zone limit left in the data, the limit of a parallel road or a slip
road the fix was snapped to), and then it is usually too low; on other stretches the map
has no limit at all. Features that judge speeding against the map have to live with both,
so the simulator puts both in the pings. The drivers drive by the posted signs: the wrong
limit changes what is reported, never how anyone drives.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from driverscore.simulation.spans import span_rows

#: Length of a stretch with a wrong limit, uniform (m).
WRONG_LIMIT_M: Final = (200.0, 600.0)
#: Length of a stretch with no limit, uniform (m).
MISSING_LIMIT_M: Final = (200.0, 1500.0)
#: Share of wrong limits that are too low; the wrong limit is the true one times a factor.
TOO_LOW_SHARE: Final = 0.75
TOO_LOW_FACTOR: Final = (0.45, 0.8)
TOO_HIGH_FACTOR: Final = (1.2, 1.6)


def map_limits(
    rng: np.random.Generator,
    trip: np.ndarray,
    speed_mps: np.ndarray,
    limit_mps: np.ndarray,
    wrong_per_100km: float,
    missing_per_100km: float,
) -> np.ndarray:
    """The map's limit at each 1 Hz fix (NaN where the map has none).

    ``trip``: trip index per fix (fixes of a trip contiguous, in time order); ``speed_mps``
    and ``limit_mps``: the true speed and posted limit. Stretches start at a rate per
    distance driven and last a distance, so they cover a few hundred metres whatever the
    speed; a stretch ends at its trip's end at the latest.
    """
    n = len(trip)
    speed = np.asarray(speed_mps, np.float64)
    limit = np.asarray(limit_mps, np.float64)
    # One uniform per fix: a stretch starts where it falls under the hazard of the distance
    # driven in that second (1 s x speed); its place under the hazard picks the kind.
    per_m = (wrong_per_100km + missing_per_100km) / 100_000.0
    draw = rng.random(n)
    start = np.flatnonzero(draw < speed * per_m)
    is_wrong = draw[start] < speed[start] * (wrong_per_100km / 100_000.0)
    wrong, missing = start[is_wrong], start[~is_wrong]

    too_low = rng.random(len(wrong)) < TOO_LOW_SHARE
    factor = np.where(
        too_low,
        rng.uniform(*TOO_LOW_FACTOR, len(wrong)),
        rng.uniform(*TOO_HIGH_FACTOR, len(wrong)),
    )
    wrong_m = rng.uniform(*WRONG_LIMIT_M, len(wrong))
    missing_m = rng.uniform(*MISSING_LIMIT_M, len(missing))

    # Distance driven by the end of each fix's second, and each trip's end (exclusive row).
    odometer = np.cumsum(speed)
    trip_end = np.cumsum(np.bincount(trip)) if n else np.zeros(0, np.int64)
    reported = limit.copy()
    rows, span = span_rows(
        wrong, _stretch_ends(odometer, speed, trip_end[trip[wrong]], wrong, wrong_m)
    )
    # Where two wrong stretches overlap, one of their limits holds.
    reported[rows] = limit[rows] * factor[span]
    rows, _ = span_rows(
        missing, _stretch_ends(odometer, speed, trip_end[trip[missing]], missing, missing_m)
    )
    reported[rows] = np.nan
    return reported


def _stretch_ends(
    odometer: np.ndarray,
    speed: np.ndarray,
    trip_end: np.ndarray,
    start: np.ndarray,
    length_m: np.ndarray,
) -> np.ndarray:
    """First fix past each stretch: the fixes that begin less than ``length_m`` after the
    stretch's start, within its trip."""
    begins = odometer[start] - speed[start]
    stop = np.searchsorted(odometer, begins + length_m, side="left") + 1
    return np.asarray(np.minimum(stop, trip_end), np.int64)
