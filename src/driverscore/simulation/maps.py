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
    step_m = np.asarray(speed_mps, np.float64)
    # Odometer at each fix (distance driven before it), over the trips in row order.
    odometer = np.cumsum(step_m) - step_m
    end_of_trip = np.cumsum(np.bincount(trip))[trip] if n else np.zeros(0, np.int64)

    draw = rng.random(n)
    p_wrong = step_m * (wrong_per_100km / 100_000.0)
    p_missing = step_m * (missing_per_100km / 100_000.0)
    wrong = np.flatnonzero(draw < p_wrong)
    missing = np.flatnonzero((draw >= p_wrong) & (draw < p_wrong + p_missing))

    too_low = rng.random(len(wrong)) < TOO_LOW_SHARE
    factor = np.where(
        too_low,
        rng.uniform(*TOO_LOW_FACTOR, len(wrong)),
        rng.uniform(*TOO_HIGH_FACTOR, len(wrong)),
    )
    stop = _stretch_ends(odometer, end_of_trip, wrong, rng.uniform(*WRONG_LIMIT_M, len(wrong)))
    misread = _covered(n, wrong, stop)
    # Where two wrong stretches overlap, the later one's limit holds.
    mark = np.full(n, -1, np.int64)
    mark[wrong] = np.arange(len(wrong))
    latest = np.maximum.accumulate(mark) if n else mark
    limit = np.asarray(limit_mps, np.float64)
    # Index -1 (no stretch started yet) reads the appended 1.0.
    reported = np.where(misread, limit * np.append(factor, 1.0)[latest], limit)
    stop = _stretch_ends(
        odometer, end_of_trip, missing, rng.uniform(*MISSING_LIMIT_M, len(missing))
    )
    return np.where(_covered(n, missing, stop), np.nan, reported)


def _stretch_ends(
    odometer: np.ndarray, end_of_trip: np.ndarray, start: np.ndarray, length_m: np.ndarray
) -> np.ndarray:
    """First fix past each stretch: ``length_m`` further on, within the trip, at least one fix."""
    stop = np.searchsorted(odometer, odometer[start] + length_m, side="left")
    return np.asarray(np.maximum(np.minimum(stop, end_of_trip[start]), start + 1), np.int64)


def _covered(n: int, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Fixes inside at least one stretch (integer counts: exact, unlike sums of floats)."""
    delta = np.bincount(start, minlength=n + 1) - np.bincount(stop, minlength=n + 1)
    return np.asarray(np.cumsum(delta[:n]) > 0)
