"""Trip cutting: give every cleaned ping a ``trip_id`` and set aside trips too short to score.

A given ``trip_id`` is kept. Otherwise a vehicle's trip ends at a silence longer than
``TripConfig.gap_s`` and its id is ``f"{vehicle_id}:{start epoch ms}"``: it depends only on
the trip's own pings, so the stream processor, which sees one closed trip at a time,
names it exactly as the batch pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import polars as pl

from driverscore.domain.cleaning import empty_quarantine, epoch_us, is_sorted_by, step_metres
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
    frame = pings if is_sorted_by(pings, "vehicle_id") else pings.sort(["vehicle_id", "ts"])
    rows_in = frame.height
    if rows_in == 0:
        counts = {"rows_in": 0, "kept": 0, "quarantined": 0, "trips": 0, "short_trips": 0}
        return TripResult(frame, empty_quarantine(frame.schema), counts)

    start_mask = frame.select(trip_starts(config.gap_s)).to_series().to_numpy()
    starts = np.flatnonzero(start_mask)
    ends = np.append(starts[1:], rows_in) - 1
    t_us = frame["ts"].dt.epoch("us").to_numpy()
    # step_m[i]: metres from fix i - 1 to fix i; the step into a trip's first fix is not
    # part of any trip.
    step_m = np.zeros(rows_in)
    step_m[1:] = step_metres(frame["lat"].to_numpy(), frame["lon"].to_numpy())
    step_m[starts] = 0.0
    length_km = np.add.reduceat(step_m, starts) / 1000.0
    duration_s = (t_us[ends] - t_us[starts]) / 1e6
    ping_count = ends - starts + 1
    short = (
        (duration_s < config.min_duration_s)
        | (length_km < config.min_distance_km)
        | (ping_count < config.min_pings)
    )

    heads = frame.select("vehicle_id", "trip_id").filter(pl.Series(start_mask))
    trip_ids = heads.select(
        pl.col("trip_id").fill_null(
            pl.concat_str(
                pl.col("vehicle_id"),
                pl.lit(":"),
                pl.Series((t_us[starts] // 1000).astype(np.int64)).cast(pl.String),
            )
        )
    ).to_series()
    trip_index = pl.Series(np.cumsum(start_mask, dtype=np.int64) - 1)
    frame = frame.with_columns(trip_ids.gather(trip_index).alias("trip_id"))

    counts = {"rows_in": rows_in, "trips": len(starts), "short_trips": int(short.sum())}
    if counts["short_trips"]:
        short_rows = pl.Series(np.repeat(short, ping_count))
        quarantine = frame.filter(short_rows).with_columns(
            pl.lit("short_trip").alias("reason"), pl.lit(TRIPS_STAGE).alias("stage")
        )
        frame = frame.filter(~short_rows)
    else:
        quarantine = empty_quarantine(frame.schema)
    counts["kept"] = frame.height
    counts["quarantined"] = quarantine.height
    return TripResult(pings=frame, quarantine=quarantine, counts=counts)
