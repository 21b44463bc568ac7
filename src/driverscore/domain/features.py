"""Trip features: THE one definition, called by batch, the stream processor and the REST service.

:func:`trip_features` turns cleaned pings that carry a ``trip_id`` into one row per trip
(the table in ``docs/design.md``; column order :data:`FEATURE_COLUMNS`). It is written
for throughput and for parity at once:

- the frame is sorted once (skipped when already in trip order, and not even checked when
  trip cutting hands over its trip starts: :func:`features_in_trip_order`); every per-row
  quantity is a numpy element-wise operation on contiguous arrays, and every value taken
  from the previous row is masked at trip starts, so no value ever mixes two trips;
- per-trip sums are exact int64 sums in fixed point (``np.add.reduceat`` over each trip's
  contiguous rows), so a trip's features do not depend on which other trips were in the
  frame; only the final per-trip arithmetic is a Polars select.

Time shares are time-weighted: a fix's state holds until the next fix, and steps longer
than ``max_dt_s`` (dropouts) carry no weight. Accelerations beyond
``max_plausible_accel_mps2`` are glitches: they are neither events nor part of the jerk.

The same pass hands out the per-fix event flags it counts (:func:`ping_events`,
:data:`EVENT_COLUMNS`): ``hard_brake``, ``harsh_accel`` and ``harsh_corner`` are true on
the fix where each event is counted (the first fix of a run over the threshold, or of a
harsh GPS turn), so a trip's flags add up to its ``*_count`` features; ``speeding`` is
true on every fix whose time counts as speeding in ``speeding_share`` (moving, a known
limit exceeded by more than ``speeding_tolerance_mps``, and a step to the next fix that
carries weight). Flags and features come from one set of arrays: they cannot disagree.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import polars as pl

from driverscore.domain.cleaning import BoolArray, FloatArray, IntArray, epoch_us, haversine_m
from driverscore.domain.config import FeatureConfig
from driverscore.domain.schema import PING_SCHEMA

#: Model inputs and their monotone direction: +1 means risk never falls when the feature rises,
#: 0 means no constraint. The order is the model's input order.
MODEL_FEATURES: Final[dict[str, int]] = {
    "distance_km": 1,
    "avg_speed_kmh": 0,
    "p95_speed_kmh": 0,
    "speed_std_kmh": 1,
    "hard_brake_per_100km": 1,
    "harsh_accel_per_100km": 1,
    "harsh_corner_per_100km": 1,
    "speeding_share": 1,
    "speeding_moderate_share": 1,
    "speeding_severe_share": 1,
    "night_share": 1,
    "idle_share": 0,
    "jerk_rms_mps3": 1,
}

_UTC_US: Final = pl.Datetime("us", "UTC")

#: The trip feature row: column names and types, in output order.
FEATURE_SCHEMA: Final[dict[str, pl.DataType]] = {
    "trip_id": pl.String(),
    "vehicle_id": pl.String(),
    "driver_id": pl.String(),
    "fleet_id": pl.String(),
    "client_id": pl.String(),
    "start_ts": _UTC_US,
    "end_ts": _UTC_US,
    "ping_count": pl.Int64(),
    "duration_s": pl.Float64(),
    "distance_km": pl.Float64(),
    "avg_speed_kmh": pl.Float64(),
    "max_speed_kmh": pl.Float64(),
    "p95_speed_kmh": pl.Float64(),
    "speed_std_kmh": pl.Float64(),
    "hard_brake_count": pl.Int64(),
    "harsh_accel_count": pl.Int64(),
    "harsh_corner_count": pl.Int64(),
    "hard_brake_per_100km": pl.Float64(),
    "harsh_accel_per_100km": pl.Float64(),
    "harsh_corner_per_100km": pl.Float64(),
    "speeding_share": pl.Float64(),
    "speeding_moderate_share": pl.Float64(),
    "speeding_severe_share": pl.Float64(),
    "night_share": pl.Float64(),
    "idle_share": pl.Float64(),
    "stop_count": pl.Int64(),
    "jerk_rms_mps3": pl.Float64(),
    "event_source": pl.String(),
}

#: Output column order of :func:`trip_features`.
FEATURE_COLUMNS: Final = tuple(FEATURE_SCHEMA)

#: The per-fix event flags of :func:`ping_events` (module docstring: what each one means).
EVENT_COLUMNS: Final = ("hard_brake", "harsh_accel", "harsh_corner", "speeding")

_MPS_TO_KMH: Final = 3.6
_KMH_TO_MPS: Final = 1.0 / 3.6
#: Fixed-point resolution of the unwrapped heading: 1 µdeg (integer sums are exact).
_UDEG_PER_DEG: Final = 1_000_000.0

# Per-trip sums are taken over integers in fixed point: an integer sum is exact in any
# order, while a float sum depends on how the values are split into blocks (memory
# alignment, chunks, threads). This is what makes a trip's features bit-identical whether
# it is alone in the frame or among millions. Resolutions: 1 µm, 1 µs, 1 mm/s, 1 mm/s³.
_UM_PER_M: Final = 1_000_000
_MILLI: Final = 1000.0
# Polars divides a column by a scalar as a multiplication by the reciprocal, except for a
# one-row column, where it divides: a trip alone would then differ in the last bit from
# the same trip among others. Every scalar division here is therefore written as an
# explicit multiplication by the reciprocal.
#: Jerk is clipped to ±1000 m/s³ before squaring so that sums cannot overflow int64;
#: physical jerk of a road vehicle stays far below.
_MAX_JERK_MM: Final = 1_000_000
_IDENTITY: Final = ("trip_id", "vehicle_id", "driver_id", "fleet_id", "client_id")


def empty_features() -> pl.DataFrame:
    """An empty trip feature frame."""
    return pl.DataFrame(schema=FEATURE_SCHEMA)


def _trip_starts() -> pl.Expr:
    """True on the first row of each run of one trip: a trip is (``vehicle_id``, ``trip_id``),
    as devices that number their trips 1, 2, 3... give the same ids to many vehicles."""
    vehicle, trip = pl.col("vehicle_id"), pl.col("trip_id")
    return vehicle.ne_missing(vehicle.shift(1)) | trip.ne_missing(trip.shift(1))


def _in_trip_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows grouped by trip (each trip contiguous) and in time order within each trip.

    Batch input arrives sorted by vehicle, ts, where trips are already contiguous; checking
    that costs two linear passes, a sort costs far more.
    """
    ts = pl.col("ts")
    first = _trip_starts()
    check = frame.select(
        (first | (ts >= ts.shift(1))).all().alias("ordered"),
        (pl.struct("vehicle_id", "trip_id").filter(first).n_unique() == first.sum()).alias(
            "contiguous"
        ),
    )
    if check["ordered"].item() and check["contiguous"].item():
        return frame
    return frame.sort(["vehicle_id", "trip_id", "ts"], maintain_order=True)


def _local_hour(config: FeatureConfig) -> pl.Expr:
    """Local clock hour 0..24: the IANA zone when configured, else mean solar time."""
    if config.timezone is not None:
        local = pl.col("ts").dt.convert_time_zone(config.timezone)
        return (
            local.dt.hour().cast(pl.Float64)
            + local.dt.minute().cast(pl.Float64) * (1.0 / 60.0)
            + local.dt.second().cast(pl.Float64) * (1.0 / 3600.0)
        )
    # Mean solar time: UTC shifted by 4 minutes (240 s) per degree of longitude east.
    # Integer microseconds: exact, and integer modulo is much cheaper than float modulo.
    local_us = epoch_us() + (pl.col("lon") * 240e6).cast(pl.Int64)
    return (local_us % 86_400_000_000).cast(pl.Float64) * (1.0 / 3.6e9)


def _is_night(config: FeatureConfig) -> pl.Expr:
    hour = _local_hour(config)
    start, end = config.night_start_hour, config.night_end_hour
    if start > end:  # the window wraps midnight, e.g. 22 → 5
        return (hour >= start) | (hour < end)
    return (hour >= start) & (hour < end)


def _fixed(value: pl.Expr, scale: float) -> pl.Expr:
    return (value * scale).round().cast(pl.Int64)


def _fixed_np(value: FloatArray, scale: float) -> IntArray:
    """Fixed point: ``value * scale`` rounded half to even (as Polars rounds).

    ``value`` must hold no NaN; it is consumed (scaled in place).
    """
    np.multiply(value, scale, out=value)
    result: IntArray = np.round(value, out=value).astype(np.int64)
    return result


def _previous(values: FloatArray) -> FloatArray:
    """The previous row's value (NaN on row 0); masked at trip starts by the callers."""
    result = np.empty_like(values)
    result[0] = np.nan
    result[1:] = values[:-1]
    return result


def _plausible_np(accel: FloatArray, config: FeatureConfig) -> FloatArray:
    result: FloatArray = np.where(np.abs(accel) <= config.max_plausible_accel_mps2, accel, np.nan)
    return result


def _floats(frame: pl.DataFrame, name: str) -> FloatArray:
    """A float column as numpy with NaN for null."""
    result: FloatArray = frame[name].cast(pl.Float64).to_numpy()
    return result


class _Trips:
    """Per-trip reductions over rows in trip order: trip ``t`` is rows starts[t]..ends[t].

    Sums are over int64 (exact in any order); sparse counts come from the rows where
    something happens, located in their trip by binary search.
    """

    def __init__(self, starts: IntArray, n: int) -> None:
        self.starts = starts
        self.ends = np.append(starts[1:], n) - 1
        self.count = len(starts)

    def sum(self, values: IntArray) -> IntArray:
        result: IntArray = np.add.reduceat(values, self.starts)
        return result

    def count_true(self, mask: BoolArray) -> IntArray:
        result: IntArray = np.add.reduceat(mask, self.starts, dtype=np.int64)
        return result

    def count_sparse(self, mask: BoolArray) -> IntArray:
        """:meth:`count_true` for masks with few True rows (events, stops)."""
        rows = np.flatnonzero(mask)
        trip = np.searchsorted(self.starts, rows, side="right") - 1
        result: IntArray = np.bincount(trip, minlength=self.count).astype(np.int64)
        return result

    def rows(self, per_trip: BoolArray) -> BoolArray:
        """A per-trip flag repeated on every row of the trip."""
        result: BoolArray = np.repeat(per_trip, self.ends - self.starts + 1)
        return result

    def max(self, values: FloatArray) -> FloatArray:
        """NaN-ignoring maximum; NaN when the trip has no value."""
        result: FloatArray = np.fmax.reduceat(values, self.starts)
        return result

    def quantile(self, values: FloatArray, q: float) -> FloatArray:
        """Linear-interpolated quantile of the non-NaN values, as Polars computes it."""
        result = np.full(self.count, np.nan)
        any_nan = bool(np.isnan(values).any())
        for trip, (start, end) in enumerate(
            zip(self.starts.tolist(), self.ends.tolist(), strict=True)
        ):
            x = values[start : end + 1]
            if any_nan:
                x = x[~np.isnan(x)]
            size = x.size
            if size == 0:
                continue
            index = q * (size - 1)
            low = math.floor(index)
            high = min(low + 1, size - 1)
            part = np.partition(x, (low, high))
            result[trip] = part[low] + (part[high] - part[low]) * (index - low)
        return result


_DAY_US: Final = 86_400_000_000


def _mod_day(t_us: IntArray) -> IntArray:
    """``t_us % 86_400_000_000`` (floored, exact) without integer division, which is slow.

    The day number from a float division is off by at most one; the few remainders that
    land outside 0..day are then taken exactly. ``t_us`` is consumed (reused in place).
    """
    day = t_us.astype(np.float64)
    day *= 1.0 / _DAY_US
    np.floor(day, out=day)
    days = day.astype(np.int64)
    days *= _DAY_US
    t_us -= days
    outside = np.flatnonzero(t_us.view(np.uint64) >= _DAY_US)  # negative ones too
    t_us[outside] %= _DAY_US
    return t_us


def _first_us_at(hour: float) -> int:
    """The smallest time of day (µs) whose hour, computed as in ``_local_hour``, is >= hour.

    The hour of ``us`` is ``float(us) * (1 / 3.6e9)``, non-decreasing in ``us``, so
    ``hour_of(us) >= hour`` exactly when ``us >= _first_us_at(hour)``: the night test then
    compares integers, with the same outcome fix for fix.
    """
    scale = 1.0 / 3.6e9
    us = max(0, math.ceil(hour * 3.6e9))
    while us > 0 and float(us - 1) * scale >= hour:
        us -= 1
    while float(us) * scale < hour:
        us += 1
    return us


def _night_np(frame: pl.DataFrame, t_us: IntArray, config: FeatureConfig) -> BoolArray:
    if config.timezone is not None:
        night: BoolArray = frame.select(_is_night(config)).to_series().to_numpy()
        return night
    # Mean solar time: UTC shifted by 4 minutes (240 s) per degree of longitude east.
    # Integer microseconds: exact, and integer modulo is much cheaper than float modulo.
    local_us = (_floats(frame, "lon") * 240e6).astype(np.int64)
    local_us += t_us
    of_day = _mod_day(local_us)
    start = _first_us_at(config.night_start_hour)
    end = _first_us_at(config.night_end_hour)
    if config.night_start_hour > config.night_end_hour:  # wraps midnight, e.g. 22 → 5
        result: BoolArray = (of_day >= start) | (of_day < end)
        return result
    result = (of_day >= start) & (of_day < end)
    return result


def _run_starts(hit: BoolArray, first: BoolArray) -> BoolArray:
    """The first fix of each run of consecutive ``hit`` fixes within a trip: one event each."""
    hit_prev = np.zeros(hit.size, dtype=bool)
    hit_prev[1:] = hit[:-1]
    result: BoolArray = hit & (first | ~hit_prev)
    return result


def _window_key(t_us: IntArray, trips: _Trips, reach_us: int) -> IntArray:
    """A non-decreasing key over rows in trip order: trip-relative values of ``t_us`` (a
    time, or a distance travelled, non-decreasing within each trip) plus a per-trip offset
    that puts more than ``reach_us`` between two trips, so a window searched on the key
    never reaches into another trip."""
    lengths = trips.ends - trips.starts + 1
    t0 = t_us[trips.starts]
    stride = t_us[trips.ends] - t0 + reach_us + 1
    offset = np.cumsum(stride) - stride
    if offset.size and int(offset[-1]) + int(stride[-1]) >= 2**62:
        raise ValueError("trips span too much time for one feature call; pass fewer trips")
    key: IntArray = t_us - np.repeat(t0 - offset, lengths)
    return key


def _window_edges(key: IntArray, half_us: IntArray) -> tuple[IntArray, IntArray]:
    """Per row, the first and last row whose key lies within that row's ``half_us``.

    Windows hold a few fixes, so they are counted offset by offset on shifted views of the
    key (contiguous, no gather; far cheaper than a binary search per row). The key being
    increasing, the rows within reach on each side are exactly the offsets that pass.
    """
    n = key.size
    before = np.zeros(n, dtype=np.int64)
    after = np.zeros(n, dtype=np.int64)
    for k in range(1, n):
        # Row i reaches back to i - k / ahead to i + k when the keys are within its reach.
        step = key[k:] - key[:-k]
        back = step <= half_us[k:]
        ahead = step <= half_us[:-k]
        if not (back.any() or ahead.any()):
            break
        before[k:] += back
        after[:-k] += ahead
    index = np.arange(n)
    return index - before, index + after


def _unwrapped_heading_udeg(heading: FloatArray, first: BoolArray) -> IntArray:
    """Course unwrapped along each trip, in µdeg as exact integers (differences within a
    trip do not depend on the rows before it). A fix without course holds the last one."""
    n = heading.size
    valid = ~np.isnan(heading)
    last_valid = np.maximum.accumulate(np.where(valid, np.arange(n), -1))
    trip_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    held = np.where(last_valid >= trip_start, heading[np.maximum(last_valid, 0)], np.nan)
    step = held - _previous(held)
    step -= 360.0 * np.round(step * (1.0 / 360.0))  # wrapped to ±180°
    step[first | np.isnan(step)] = 0.0
    result: IntArray = np.cumsum(_fixed_np(step, _UDEG_PER_DEG))
    return result


#: A turn lasts while its lateral estimate stays above this share of the harsh threshold
#: (hysteresis: noise around the threshold inside one turn does not split it in events).
_TURN_HOLD_SHARE: Final = 0.5


def _gps_turn_events(
    heading: FloatArray,
    speed: FloatArray,
    t_us: IntArray,
    first: BoolArray,
    config: FeatureConfig,
) -> BoolArray:
    """Harsh cornering from the GPS course, robust to course jitter (``windowed_turn``).

    The yaw rate of a fix is the course change across a centred window over the window's
    span, and lateral acceleration is speed x yaw rate. The window lasts
    ``corner_window_s_per_mps`` x speed (at least ``corner_window_s``): the error of the
    estimate is then course jitter / that factor at every speed, instead of speed x jitter
    / 1 s. A turn is a run of consecutive fixes turning one way with lateral at or beyond
    half of ``harsh_corner_mps2``; it is one harsh event when its lateral reaches the
    threshold and the course changes by at least ``min_corner_turn_deg`` that way from two
    windows before the turn to two windows after it: a course glitch comes back, a turn
    does not. Returns a mask of the first fix of each event.
    """
    n = speed.size
    trips = _Trips(np.flatnonzero(first), n)
    window_s = np.maximum(config.corner_window_s, config.corner_window_s_per_mps * speed)
    window_s = np.where(np.isnan(window_s), config.corner_window_s, window_s)
    half_us = np.round(window_s * 0.5e6).astype(np.int64)
    reach_us = 4 * half_us  # two windows each side of a turn
    key = _window_key(t_us, trips, 2 * int(reach_us.max()))
    lo, hi = _window_edges(key, half_us)
    course = _unwrapped_heading_udeg(heading, first)
    span_us = t_us[hi] - t_us[lo]
    usable = (span_us >= half_us) & (speed >= config.min_corner_speed_mps)
    with np.errstate(invalid="ignore", divide="ignore"):
        yaw_rad_s = np.radians((course[hi] - course[lo]) * (1.0 / _UDEG_PER_DEG)) / (span_us * 1e-6)
        lateral = np.where(usable, speed * yaw_rad_s, np.nan)
        lateral = _plausible_np(lateral, config)
    events = np.zeros(n, dtype=bool)
    last = np.append(first[1:], True)
    min_turn_udeg = config.min_corner_turn_deg * _UDEG_PER_DEG
    for side in (1.0, -1.0):
        toward = np.where(np.isnan(lateral), -np.inf, side * lateral)
        turning = toward >= _TURN_HOLD_SHARE * config.harsh_corner_mps2
        starts = np.flatnonzero(_run_starts(turning, first))
        if starts.size == 0:
            continue
        next_turning = np.zeros(n, dtype=bool)
        next_turning[:-1] = turning[1:]
        ends = np.flatnonzero(turning & (last | ~next_turning))
        # Peak lateral of each turn: the maximum over rows starts[k]..ends[k].
        bounds = np.empty(2 * starts.size, dtype=np.int64)
        bounds[0::2], bounds[1::2] = starts, ends + 1
        peak = np.maximum.reduceat(np.append(toward, -np.inf), bounds)[0::2]
        before = np.searchsorted(key, key[starts] - reach_us[starts], side="left")
        after = np.searchsorted(key, key[ends] + reach_us[ends], side="right") - 1
        turned = side * (course[after] - course[before]) >= min_turn_udeg
        harsh = np.flatnonzero(turned & (peak >= config.harsh_corner_mps2))
        if harsh.size == 0:
            continue
        # A turn split by a dropout or a glitch is one turn: a harsh turn that starts within
        # two windows of the previous one's end, on the same side, is part of it.
        gap_us = key[starts[harsh[1:]]] - key[ends[harsh[:-1]]]
        joined = np.append(False, gap_us <= reach_us[starts[harsh[1:]]])
        events[starts[harsh[~joined]]] = True
    return events


def _windowed_limit(
    limit: FloatArray,
    travelled_um: IntArray,
    trips: _Trips,
    window_m: float,
    candidates: IntArray,
) -> FloatArray:
    """``limit`` with the rows ``candidates`` judged against the highest known limit within
    ``window_m`` of road centred on them (NaN when none is known there).

    A map limit that is wrong for a stretch shorter than the window - a slip road's or a
    parallel street's limit matched onto a motorway - is outvoted by the limit around it;
    map errors are stretches of road, so the window is one too, at any speed. A real change
    of limit takes effect up to half a window late (lower) or early (higher), which can
    only under-count speeding, never invent it. The window can only raise a limit, so only
    rows that would speed under their own limit, or have none, can change: the caller
    passes those, a small share of a trip's fixes.
    """
    result = limit.copy()
    if candidates.size == 0:
        return result
    half_us = round(window_m * 0.5 * _UM_PER_M)
    key = _window_key(travelled_um, trips, 2 * half_us)
    n = key.size
    # A fix further than half a window from both ends of its run of one limit sees only
    # that limit: only fixes near a change of limit (or of known / unknown) are windowed.
    same = np.zeros(n, dtype=bool)
    same[1:] = (limit[1:] == limit[:-1]) | (np.isnan(limit[1:]) & np.isnan(limit[:-1]))
    new_run = ~same
    new_run[trips.starts] = True
    run_starts = np.flatnonzero(new_run)
    run = np.cumsum(new_run) - 1
    run_ends = np.append(run_starts[1:], n) - 1
    near = (key[candidates] - key[run_starts[run[candidates]]] <= half_us) | (
        key[run_ends[run[candidates]]] - key[candidates] <= half_us
    )
    candidates = candidates[near]
    best = limit[candidates]
    for side in (-1, 1):
        # Positions (into ``candidates``) whose window still reaches ``offset`` rows away:
        # the set shrinks as windows end, so the work is the fixes inside the windows.
        active = np.arange(candidates.size)
        offset = side
        while active.size:
            rows = candidates[active]
            other = rows + offset
            inside = (other >= 0) & (other < n)
            active, rows, other = active[inside], rows[inside], other[inside]
            within = np.abs(key[other] - key[rows]) <= half_us
            active, other = active[within], other[within]
            best[active] = np.fmax(best[active], limit[other])
            offset += side
    result[candidates] = best
    return result


def _trip_sums(
    frame: pl.DataFrame, first: BoolArray, config: FeatureConfig
) -> tuple[pl.DataFrame, dict[str, BoolArray]]:
    """Per-trip sums, counts and extremes (one row per trip, in row order of the trips),
    and the per-fix event flags those counts are taken from (:data:`EVENT_COLUMNS`).

    Every per-row quantity is computed on numpy arrays; every value taken from the
    previous row is masked at trip starts, so no value mixes two trips.
    """
    n = frame.height
    starts = np.flatnonzero(first)
    trips = _Trips(starts, n)
    not_first = ~first
    t_us = frame["ts"].dt.epoch("us").to_numpy()
    speed = _floats(frame, "speed_mps")
    speed_prev = _previous(speed)
    dt_us = np.zeros(n, dtype=np.int64)
    dt_us[1:] = np.diff(t_us)
    dt = dt_us.astype(np.float64) * 1e-6
    step_ok = not_first & (dt > 0) & (dt <= config.max_dt_s)
    dt_ok = np.where(step_ok, dt, np.nan)
    mean_speed = (speed + speed_prev) * 0.5
    moving = speed >= config.idle_speed_mps
    stopped = speed < config.idle_speed_mps

    # Longitudinal acceleration from the IMU when the trip has any value in it, else from
    # GPS speed; lateral from the IMU likewise, else speed x yaw rate (heading change
    # wrapped to ±180°; cornering from GPS heading is noise at walking pace, hence the
    # minimum speed). Each axis is one series holding, trip by trip, the chosen source.
    accel_long, accel_lat = _floats(frame, "accel_long_mps2"), _floats(frame, "accel_lat_mps2")
    imu_long = trips.count_true(~np.isnan(accel_long)) > 0
    imu_lat = trips.count_true(~np.isnan(accel_lat)) > 0
    with np.errstate(invalid="ignore"):
        if imu_long.all():
            longitudinal = accel_long
        else:
            longitudinal = (speed - speed_prev) / dt_ok
            if imu_long.any():
                longitudinal = np.where(trips.rows(imu_long), accel_long, longitudinal)
        windowed = config.cornering == "windowed_turn" and not imu_lat.all()
        if imu_lat.all() or windowed:
            lateral = accel_lat
        else:
            heading = _floats(frame, "heading_deg")
            turn = heading - _previous(heading)
            turn_deg = turn - 360.0 * np.round(turn * (1.0 / 360.0))  # wrapped to ±180°
            lateral = np.where(
                mean_speed >= config.min_corner_speed_mps,
                mean_speed * np.radians(turn_deg) / dt_ok,
                np.nan,
            )
            if imu_lat.any():
                lateral = np.where(trips.rows(imu_lat), accel_lat, lateral)
        longitudinal = _plausible_np(longitudinal, config)
        lateral = np.abs(_plausible_np(lateral, config))

    columns: dict[str, IntArray | FloatArray | BoolArray] = {}
    # The fix where each event is counted: handed out as the fixes' event flags.
    events: dict[str, BoolArray] = {}
    for kind, flag, hit in (
        ("brake", "hard_brake", longitudinal <= -config.hard_brake_mps2),
        ("accel", "harsh_accel", longitudinal >= config.harsh_accel_mps2),
        ("corner", "harsh_corner", lateral >= config.harsh_corner_mps2),
    ):
        events[flag] = _run_starts(hit, first)
        columns[kind] = trips.count_sparse(events[flag])
    if windowed:
        # Trips without an IMU take their cornering events from the GPS course, by turns.
        gps_rows = ~trips.rows(imu_lat)
        corners = _run_starts(lateral >= config.harsh_corner_mps2, first) & ~gps_rows
        on_gps = np.flatnonzero(gps_rows)  # whole trips, so trip starts stay trip starts
        corners[on_gps] = _gps_turn_events(
            _floats(frame, "heading_deg")[on_gps],
            speed[on_gps],
            t_us[on_gps],
            first[on_gps],
            config,
        )
        events["harsh_corner"] = corners
        columns["corner"] = trips.count_sparse(corners)
    # Jerk between consecutive accelerations of one trip, only while moving.
    with np.errstate(invalid="ignore"):
        jerk = (longitudinal - _previous(longitudinal)) / dt_ok
    has_jerk = moving & not_first & ~np.isnan(jerk)
    jerk_mm = np.clip(_fixed_np(np.where(has_jerk, jerk, 0.0), _MILLI), -_MAX_JERK_MM, _MAX_JERK_MM)
    columns["jerk2_count"] = trips.count_true(has_jerk)
    columns["jerk2_sum"] = trips.sum(jerk_mm * jerk_mm)

    moving_prev = np.zeros(n, dtype=bool)
    moving_prev[1:] = moving[:-1]
    columns["stops"] = trips.count_sparse(stopped & not_first & moving_prev)

    integrable = step_ok & ~np.isnan(speed) & ~np.isnan(speed_prev)
    chord_rows = np.flatnonzero(not_first & ~integrable)
    with np.errstate(invalid="ignore"):
        step_m = np.where(integrable, mean_speed * dt_ok, 0.0)
    if chord_rows.size:
        # Dropouts and steps without speed add their great-circle length; they are rare,
        # so the trigonometry runs on those rows only.
        lat, lon = _floats(frame, "lat"), _floats(frame, "lon")
        before = chord_rows - 1
        step_m[chord_rows] = haversine_m(lat[before], lon[before], lat[chord_rows], lon[chord_rows])
    step_um = _fixed_np(step_m, _UM_PER_M)
    columns["step_um"] = trips.sum(step_um)

    moving_mm = _fixed_np(np.where(moving, speed, 0.0), _MILLI)
    columns["moving_n"] = trips.count_true(moving)
    columns["moving_mm"] = trips.sum(moving_mm)
    columns["moving_mm2"] = trips.sum(moving_mm * moving_mm)

    # A fix's state holds until the next fix of the trip (the next row's step).
    weight = np.zeros(n, dtype=np.int64)
    weight[:-1] = np.where(step_ok[1:], dt_us[1:], 0)
    limit = _floats(frame, "speed_limit_mps")
    with np.errstate(invalid="ignore"):
        over = speed - limit
    if config.speed_limit_window_m > 0 and not np.isnan(limit).all():
        # Rows that would count as speeding under their own limit, or that have none in a
        # trip that has some: the only rows the window can change.
        limited_trip = trips.rows(trips.count_true(~np.isnan(limit)) > 0)
        unsure = (
            over
            > min(
                config.speeding_tolerance_mps,
                config.speeding_moderate_kmh * _KMH_TO_MPS,
                config.speeding_severe_kmh * _KMH_TO_MPS,
            )
        ) | (np.isnan(limit) & limited_trip)
        limit = _windowed_limit(
            limit,
            np.cumsum(step_um),  # distance travelled (differences within a trip are exact)
            trips,
            config.speed_limit_window_m,
            np.flatnonzero(moving & unsure),
        )
        with np.errstate(invalid="ignore"):
            over = speed - limit
    limited_moving = moving & ~np.isnan(limit)
    columns["w"] = trips.sum(weight)
    columns["w_idle"] = trips.sum(weight * stopped)
    columns["w_night"] = trips.sum(weight * _night_np(frame, t_us, config))
    columns["w_limited"] = trips.sum(weight * limited_moving)
    for name, margin in (
        ("w_speeding", config.speeding_tolerance_mps),
        ("w_speeding_moderate", config.speeding_moderate_kmh * _KMH_TO_MPS),
        ("w_speeding_severe", config.speeding_severe_kmh * _KMH_TO_MPS),
    ):
        speeding = limited_moving & (over > margin)
        if name == "w_speeding":
            events["speeding"] = speeding & (weight > 0)
        columns[name] = trips.sum(weight * speeding)
    columns["imu"] = imu_long

    heads = pl.Series(starts, dtype=pl.Int64)
    identity = frame.select(*_IDENTITY, pl.col("ts").alias("start_ts")).gather(heads)
    sums = identity.with_columns(
        frame["ts"].gather(pl.Series(trips.ends, dtype=pl.Int64)).alias("end_ts"),
        pl.Series("ping_count", trips.ends - starts + 1, dtype=pl.Int64),
        pl.Series("max_speed", trips.max(speed)).fill_nan(None),
        pl.Series("p95_speed", trips.quantile(speed, 0.95)).fill_nan(None),
        *(pl.Series(name, values) for name, values in columns.items()),
    )
    return sums, events


def trip_features(pings: pl.DataFrame, config: FeatureConfig) -> pl.DataFrame:
    """One feature row per trip (the table in ``docs/design.md``), sorted by ``trip_id``
    then ``vehicle_id``. A trip is a (``vehicle_id``, ``trip_id``) pair.

    ``pings``: cleaned canonical pings with a non-null ``trip_id`` and ``speed_mps`` (see
    :func:`~driverscore.domain.cleaning.clean_pings`), one or many trips, any order.
    Events come from ``accel_long_mps2`` / ``accel_lat_mps2`` for a trip that has them
    (per axis), else from GPS speed and heading; ``event_source`` names the source of the
    longitudinal events. Features that are undefined for a trip are null (for example
    ``speeding_share`` when no speed limit is known while moving).
    """
    if pings.height == 0:
        return empty_features()
    frame, first = _trip_ordered(pings, "trip_features")
    return features_in_trip_order(frame, first, config)


def _trip_ordered(pings: pl.DataFrame, caller: str) -> tuple[pl.DataFrame, BoolArray]:
    """Canonical pings (missing columns null) in trip order, and their trip starts."""
    if pings["trip_id"].null_count():
        raise ValueError(f"{caller} needs a trip_id on every ping; run assign_trips first")
    missing = [name for name in PING_SCHEMA if name not in pings.columns]
    frame = _in_trip_order(
        pings.with_columns(pl.lit(None, dtype=PING_SCHEMA[name]).alias(name) for name in missing)
    )
    first: BoolArray = frame.select(_trip_starts().fill_null(True)).to_series().to_numpy()
    return frame, first


def trip_features_and_events(
    pings: pl.DataFrame, config: FeatureConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`trip_features`, and the pings in trip order (``vehicle_id``, ``trip_id``,
    ``ts``; columns the canonical schema names but the input lacks added as null) with
    the event flags of :data:`EVENT_COLUMNS` appended, from one pass."""
    if pings.height == 0:
        return empty_features(), pings.with_columns(
            pl.lit(None, dtype=pl.Boolean()).alias(name) for name in EVENT_COLUMNS
        )
    frame, first = _trip_ordered(pings, "trip_features_and_events")
    return features_and_events_in_trip_order(frame, first, config)


def ping_events(pings: pl.DataFrame, config: FeatureConfig) -> pl.DataFrame:
    """The pings in trip order with one boolean column per event (:data:`EVENT_COLUMNS`):
    the fixes where :func:`trip_features` counts its events (module docstring).

    ``pings`` as for :func:`trip_features`. A trip's ``hard_brake`` flags add up to its
    ``hard_brake_count``, and so on: both come from one computation.
    """
    return trip_features_and_events(pings, config)[1]


def features_in_trip_order(
    frame: pl.DataFrame, first: BoolArray, config: FeatureConfig
) -> pl.DataFrame:
    """:func:`trip_features` on canonical pings whose trips are runs of consecutive rows
    in time order, ``first`` marking the first row of each (what trip cutting produces).
    """
    if frame.height == 0:
        return empty_features()
    return _features(_trip_sums(frame, first, config)[0])


def features_and_events_in_trip_order(
    frame: pl.DataFrame, first: BoolArray, config: FeatureConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`features_in_trip_order`, and ``frame`` with the event flags of
    :data:`EVENT_COLUMNS` appended (row for row)."""
    if frame.height == 0:
        return trip_features_and_events(frame, config)
    sums, events = _trip_sums(frame, first, config)
    flagged = frame.with_columns(
        pl.Series(name, events[name], dtype=pl.Boolean()) for name in EVENT_COLUMNS
    )
    return _features(sums), flagged


def _features(trips: pl.DataFrame) -> pl.DataFrame:
    """The feature rows from the per-trip sums of :func:`_trip_sums`."""

    distance_km = pl.col("step_um").cast(pl.Float64) * 1e-9
    moving_n = pl.col("moving_n").cast(pl.Float64)
    mean_mm = pl.col("moving_mm") / moving_n
    # Variance from exact integer sums; clipped at 0 against rounding of the difference.
    std_mm = (pl.col("moving_mm2") / moving_n - mean_mm * mean_mm).clip(lower_bound=0.0).sqrt()
    duration_s = (pl.col("end_ts") - pl.col("start_ts")).dt.total_microseconds().cast(
        pl.Float64
    ) * 1e-6

    def per_100km(count: str) -> pl.Expr:
        return pl.when(distance_km > 0).then(pl.col(count) / distance_km * 100.0).otherwise(0.0)

    def share(part: str, whole: str) -> pl.Expr:
        return pl.when(pl.col(whole) > 0).then(pl.col(part) / pl.col(whole))

    return (
        trips.select(
            *_IDENTITY,
            "start_ts",
            "end_ts",
            "ping_count",
            duration_s.alias("duration_s"),
            distance_km.alias("distance_km"),
            pl.when(duration_s > 0)
            .then(distance_km / (duration_s * (1.0 / 3600.0)))
            .alias("avg_speed_kmh"),
            (pl.col("max_speed") * _MPS_TO_KMH).alias("max_speed_kmh"),
            (pl.col("p95_speed") * _MPS_TO_KMH).alias("p95_speed_kmh"),
            (pl.when(moving_n > 0).then(std_mm * (_MPS_TO_KMH / _MILLI))).alias("speed_std_kmh"),
            pl.col("brake").alias("hard_brake_count"),
            pl.col("accel").alias("harsh_accel_count"),
            pl.col("corner").alias("harsh_corner_count"),
            per_100km("brake").alias("hard_brake_per_100km"),
            per_100km("accel").alias("harsh_accel_per_100km"),
            per_100km("corner").alias("harsh_corner_per_100km"),
            share("w_speeding", "w_limited").alias("speeding_share"),
            share("w_speeding_moderate", "w_limited").alias("speeding_moderate_share"),
            share("w_speeding_severe", "w_limited").alias("speeding_severe_share"),
            share("w_night", "w").alias("night_share"),
            share("w_idle", "w").alias("idle_share"),
            pl.col("stops").alias("stop_count"),
            pl.when(pl.col("jerk2_count") > 0)
            .then((pl.col("jerk2_sum") / pl.col("jerk2_count")).sqrt() * (1.0 / _MILLI))
            .alias("jerk_rms_mps3"),
            pl.when(pl.col("imu"))
            .then(pl.lit("imu"))
            .otherwise(pl.lit("gps"))
            .alias("event_source"),
        )
        .cast(FEATURE_SCHEMA)  # type: ignore[arg-type]
        .sort("trip_id", "vehicle_id")
    )
