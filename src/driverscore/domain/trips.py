"""Trip cutting: give every cleaned ping a ``trip_id`` and set aside trips too short to score.

A given ``trip_id`` is kept. Otherwise a vehicle's trip ends at a silence longer than
``TripConfig.gap_s`` and its id is ``f"{vehicle_id}:{start epoch ms}"``: it depends only on
the trip's own pings, so the stream processor, which sees one closed trip at a time,
names it exactly as the batch pipeline does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import polars as pl

from driverscore.domain.cleaning import (
    NULL_CODE,
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


@dataclass(frozen=True)
class TripResult:
    """Pings of kept trips with ``trip_id`` set (sorted by vehicle, ts), short trips, counts."""

    pings: pl.DataFrame
    quarantine: pl.DataFrame
    counts: dict[str, int]


def trip_starts(gap_s: float) -> pl.Expr:
    """True on the first ping of each trip, on a frame sorted by vehicle, ts.

    A trip starts at a new vehicle, at a change of given ``trip_id`` (including to or from
    null), or, between pings without a given id, after a silence longer than ``gap_s``.
    """
    vehicle, trip = pl.col("vehicle_id"), pl.col("trip_id")
    gap = (epoch_us().diff() > int(gap_s * 1e6)).fill_null(True)
    return (
        vehicle.ne_missing(vehicle.shift(1))
        | trip.ne_missing(trip.shift(1))
        | (trip.is_null() & gap)
    )


def assign_trips(pings: pl.DataFrame, config: TripConfig) -> TripResult:
    """Cut cleaned pings into trips and quarantine short ones (reason ``short_trip``).

    Input: cleaned canonical pings (any order; sorted by ``vehicle_id, ts`` is fastest).
    A trip is short when its duration is below ``min_duration_s``, its path length (sum
    of great-circle steps) below ``min_distance_km`` or it has fewer than ``min_pings``.
    Given trip ids must not overlap in time for one vehicle.

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

    start_mask = np.ones(rows_in, dtype=bool)
    if rows_in > 1:
        new = np.diff(keys.vehicle) != 0
        gap = np.diff(keys.ts_us) > int(config.gap_s * 1e6)
        if keys.trip is None:
            new |= gap
        else:
            new |= (np.diff(keys.trip) != 0) | ((keys.trip[1:] == NULL_CODE) & gap)
        start_mask[1:] = new
    starts = np.flatnonzero(start_mask)
    ends = np.append(starts[1:], rows_in) - 1
    t_us = keys.ts_us
    duration_s = (t_us[ends] - t_us[starts]) / 1e6
    ping_count = ends - starts + 1
    short = (duration_s < config.min_duration_s) | (ping_count < config.min_pings)
    short |= _short_by_distance(frame, starts, ends, ~short, config.min_distance_km)

    heads = frame.select("vehicle_id", "trip_id").gather(pl.Series(starts, dtype=pl.Int64))
    trip_ids = heads.select(
        pl.col("trip_id").fill_null(
            pl.concat_str(
                pl.col("vehicle_id"),
                pl.lit(":"),
                pl.Series((t_us[starts] // 1000).astype(np.int64)).cast(pl.String),
            )
        )
    ).to_series()
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
