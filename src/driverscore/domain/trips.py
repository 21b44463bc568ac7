"""Trip cutting: give every cleaned ping a ``trip_id`` and set aside trips too short to score.

One rule, shared with the stream's trip assembler (``domain/sessions.py``), in time order
per vehicle: a ping continues its vehicle's current trip when it carries the same given
``trip_id`` (both absent counts as the same) and comes at most ``TripConfig.gap_s`` after
the previous ping (:func:`continues_trip`); a trip is also cut after
``TripConfig.max_trip_pings`` pings. A trip's identity is the pair (``vehicle_id``,
``trip_id``): devices that number trips 1, 2, 3... give the same ids to different vehicles.

Names: a trip without a given id is ``f"{vehicle_id}:{start epoch ms}"``, which depends
only on its own pings. A given id names its first part unchanged; part k >= 2 of the same
(vehicle, id), after a pause longer than the gap, a forced cut or a return of the id after
another, is ``f"{trip_id}~{k}"``, parts numbered by start time. So no trip id is published
twice for one vehicle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, overload

import numpy as np
import polars as pl

from driverscore.domain.cleaning import (
    BoolArray,
    FloatArray,
    IntArray,
    SortKeys,
    empty_quarantine,
    epoch_us,
    haversine_m,
    is_sorted_keys,
    sort_keys,
    sort_order,
    step_metres,
)
from driverscore.domain.config import TripConfig

#: Stage name written to the quarantine's ``stage`` column by this module.
TRIPS_STAGE: Final = "trips"

#: Between a given trip id and the number of its part k >= 2: ``f"{trip_id}~{k}"``.
PART_SEPARATOR: Final = "~"


@overload
def continues_trip(
    previous_trip: object, previous_ts_us: int, trip: object, ts_us: int, gap_us: int
) -> bool: ...
@overload
def continues_trip(
    previous_trip: IntArray, previous_ts_us: IntArray, trip: IntArray, ts_us: IntArray, gap_us: int
) -> BoolArray: ...
def continues_trip(
    previous_trip: Any, previous_ts_us: Any, trip: Any, ts_us: Any, gap_us: int
) -> Any:
    """Whether a ping continues the trip of the ping before it (same vehicle, time order).

    Same given trip id (null equals null) and at most ``gap_us`` later. Written once for
    scalars (the stream's assembler, one ping at a time) and numpy arrays (batch, all
    consecutive pairs at once): the operators work on both.
    """
    return (trip == previous_trip) & (ts_us - previous_ts_us <= gap_us)


def part_name(trip_id: str, part: int) -> str:
    """The published id of part ``part`` (1, 2, ...) of a given trip id."""
    return trip_id if part == 1 else f"{trip_id}{PART_SEPARATOR}{part}"


@dataclass(frozen=True)
class TripResult:
    """Pings of kept trips with ``trip_id`` set (sorted by vehicle, ts), short trips, counts."""

    pings: pl.DataFrame
    quarantine: pl.DataFrame
    counts: dict[str, int]


def trip_starts(gap_s: float) -> pl.Expr:
    """True where a ping does not continue the trip of the row before it (a frame sorted by
    vehicle, ts): a new vehicle, another given ``trip_id`` (including to or from null) or a
    silence longer than ``gap_s`` (:func:`continues_trip`). Forced cuts at
    ``max_trip_pings`` are not included.
    """
    vehicle, trip = pl.col("vehicle_id"), pl.col("trip_id")
    gap = (epoch_us().diff() > round(gap_s * 1e6)).fill_null(True)
    return vehicle.ne_missing(vehicle.shift(1)) | trip.ne_missing(trip.shift(1)) | gap


def assign_trips(pings: pl.DataFrame, config: TripConfig) -> TripResult:
    """Cut cleaned pings into trips and quarantine short ones (reason ``short_trip``).

    Input: cleaned canonical pings (any order; sorted by ``vehicle_id, ts`` is fastest).
    A trip is short when its duration is below ``min_duration_s``, its path length (sum
    of great-circle steps) below ``min_distance_km`` or it has fewer than ``min_pings``.
    ``trip_id`` is the trip's name (module docstring); (``vehicle_id``, ``trip_id``) is
    unique per trip.

    Counts: ``rows_in == kept + quarantined`` (pings), plus ``trips`` and ``short_trips``.
    """
    keys = sort_keys(pings)
    if is_sorted_keys(keys):
        return assign_trips_sorted(pings, keys, config)[0]
    order = sort_order(keys)
    frame = pings.rechunk().gather(pl.Series(order, dtype=pl.Int64))
    return assign_trips_sorted(frame, keys.take(order), config)[0]


def _path_km(lat: FloatArray, lon: FloatArray) -> float:
    """Sum of the great-circle steps along the fixes, exactly rounded (order-independent)."""
    if len(lat) < 2:
        return 0.0
    return math.fsum(step_metres(lat, lon).tolist()) / 1000.0


def _short_by_distance(
    frame: pl.DataFrame, starts: IntArray, ends: IntArray, check: BoolArray, min_km: float
) -> BoolArray:
    """Which trips (of those flagged in ``check``) have a path shorter than ``min_km``.

    The path is at least as long as the great-circle distance from the first fix to the
    last or to the middle one (triangle inequality): only trips where those chords do not
    already clear the limit get their full path summed.
    """
    short = np.zeros(len(starts), dtype=bool)
    if min_km <= 0 or not check.any():
        return short
    lat, lon = frame["lat"].to_numpy(), frame["lon"].to_numpy()
    first, last, middle = starts[check], ends[check], (starts[check] + ends[check]) // 2
    chord_m = np.maximum(
        haversine_m(lat[first], lon[first], lat[last], lon[last]),
        haversine_m(lat[first], lon[first], lat[middle], lon[middle]),
    )
    clear = chord_m >= min_km * 1000.0 * (1.0 + 1e-9)
    for trip in np.flatnonzero(check)[~clear]:
        start, end = int(starts[trip]), int(ends[trip]) + 1
        short[trip] = _path_km(lat[start:end], lon[start:end]) < min_km
    return short


def assign_trips_sorted(
    frame: pl.DataFrame, keys: SortKeys, config: TripConfig
) -> tuple[TripResult, IntArray]:
    """:func:`assign_trips` on pings sorted by vehicle, ts whose integer keys are known.

    Also returns the first row of every kept trip in the kept pings (each trip is a run
    of consecutive rows in time order), which the features step uses as is.
    """
    rows_in = frame.height
    if rows_in == 0:
        counts = {"rows_in": 0, "kept": 0, "quarantined": 0, "trips": 0, "short_trips": 0}
        return TripResult(frame, empty_quarantine(frame.schema), counts), np.zeros(0, np.int64)

    starts = _cut(keys, config)
    ends = np.append(starts[1:], rows_in) - 1
    t_us = keys.ts_us
    duration_s = (t_us[ends] - t_us[starts]) / 1e6
    ping_count = ends - starts + 1
    short = (duration_s < config.min_duration_s) | (ping_count < config.min_pings)
    short |= _short_by_distance(frame, starts, ends, ~short, config.min_distance_km)

    trip_ids = _trip_names(frame, keys, starts)
    trip_index = pl.Series(np.repeat(np.arange(len(starts), dtype=np.int64), ping_count))
    frame = frame.with_columns(trip_ids.gather(trip_index).alias("trip_id"))

    counts = {"rows_in": rows_in, "trips": len(starts), "short_trips": int(short.sum())}
    if counts["short_trips"]:
        short_rows = pl.Series(np.repeat(short, ping_count))
        quarantine = frame.filter(short_rows).with_columns(
            pl.lit("short_trip").alias("reason"), pl.lit(TRIPS_STAGE).alias("stage")
        )
        frame = frame.filter(~short_rows)
        kept_count = ping_count[~short]
        kept_starts = np.cumsum(kept_count) - kept_count
    else:
        quarantine = empty_quarantine(frame.schema)
        kept_starts = starts
    counts["kept"] = frame.height
    counts["quarantined"] = quarantine.height
    return TripResult(pings=frame, quarantine=quarantine, counts=counts), kept_starts


def _cut(keys: SortKeys, config: TripConfig) -> IntArray:
    """First row of every trip (rows sorted by vehicle, ts): the continuation rule, then
    :func:`forced_cuts` in runs longer than ``max_trip_pings``, as the stream's assembler."""
    rows = len(keys.ts_us)
    start_mask = np.ones(rows, dtype=bool)
    if rows > 1:
        trip = keys.trip if keys.trip is not None else np.zeros(rows, dtype=np.int64)
        gap_us = round(config.gap_s * 1e6)
        continues = continues_trip(trip[:-1], keys.ts_us[:-1], trip[1:], keys.ts_us[1:], gap_us)
        start_mask[1:] = (np.diff(keys.vehicle) != 0) | ~continues
    starts = np.flatnonzero(start_mask)
    limit = config.max_trip_pings
    ends = np.append(starts[1:], rows)
    long_runs = np.flatnonzero(ends - starts > limit)
    if long_runs.size == 0:
        return starts
    ms = keys.ts_us // 1000
    for run in long_runs:  # a loop per part of a long run: rows / max_trip_pings at most
        begin, end = int(starts[run]), int(ends[run])
        cuts = forced_cuts(ms[begin:end].tolist(), limit)
        start_mask[[begin + cut for cut in cuts]] = True
    result: IntArray = np.flatnonzero(start_mask)
    return result


def forced_cuts(stamps_ms: list[int], max_trip_pings: int) -> list[int]:
    """Where a run of one trip id (``ts`` in ms, in time order) is cut into parts.

    Each part takes ``max_trip_pings`` pings, and the pings of the same millisecond as its
    last: a part never starts in the millisecond where the one before ends, so parts
    without a given id, named by their start, never share a name. Returns the positions
    where parts 2, 3... start.
    """
    cuts: list[int] = []
    begin, n = 0, len(stamps_ms)
    while n - begin > max_trip_pings:
        cut = begin + max_trip_pings
        while cut < n and stamps_ms[cut] == stamps_ms[cut - 1]:
            cut += 1
        if cut == n:
            break
        cuts.append(cut)
        begin = cut
    return cuts


def _trip_names(frame: pl.DataFrame, keys: SortKeys, starts: IntArray) -> pl.Series:
    """One name per trip (module docstring); parts of a given id numbered by start time."""
    heads = frame.select("vehicle_id", "trip_id").gather(pl.Series(starts, dtype=pl.Int64))
    start_ms = pl.Series((keys.ts_us[starts] // 1000).astype(np.int64)).cast(pl.String)
    if keys.trip is None:  # no given id: no parts to number
        return heads.select(
            pl.concat_str(pl.col("vehicle_id"), pl.lit(":"), start_ms).alias("trip_id")
        ).to_series()
    # Trips of one vehicle come in time order: the k-th head of (vehicle, id) is part k.
    part = pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("vehicle_id", "trip_id")
    trip = pl.col("trip_id")
    return heads.select(
        pl.when(trip.is_null())
        .then(pl.concat_str(pl.col("vehicle_id"), pl.lit(":"), start_ms))
        .when(part == 1)
        .then(trip)
        .otherwise(pl.concat_str(trip, pl.lit(PART_SEPARATOR), part.cast(pl.String)))
        .alias("trip_id")
    ).to_series()
