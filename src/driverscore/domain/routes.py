"""A trip's route for maps: its cleaned positions, thinned.

The score store keeps one route per trip (``vehicle_id``, ``trip_id``) beside the trip's
score records, for the dashboard's trip view. A 1 Hz trip of an hour has 3,600 fixes; a
map line needs far fewer. The thinning rule:

- walk the trip's cleaned fixes in time order and measure the distance driven
  (great-circle steps, the cleaning module's haversine);
- keep the first fix, then the first fix of every further ``spacing`` metres of distance
  driven, and the last fix;
- ``spacing`` is ``min_spacing_m`` (25 m), widened for long trips so that no route has
  more than ``max_points`` (500) points: ``max(min_spacing_m, distance / (max_points - 2))``.

So a stopped vehicle adds no points (a trip that never moved is its first and last fix),
curves driven slowly keep a point every 25 m, and a route's size is bounded. Pure: no I/O.

**Events.** Every point carries the event flags of its fix (``hard_brake``,
``harsh_accel``, ``harsh_corner``, ``speeding``: ``features.EVENT_COLUMNS``), which the
trip features module hands out with the pings (``ping_events``): the one definition of
the events, the one the trip's counts come from. Besides the spacing rule,
the thinning keeps every fix where an event is counted: each hard brake, harsh
acceleration and harsh corner (so a route's flagged points add up to the trip's
``*_count`` features), and the first fix of each stretch of speeding (the other kept
fixes of the stretch carry the flag too). Those fixes are bounded by the trip's counts;
a trip with more than ``max_event_points`` (500) of them keeps its first
``max_event_points``, so a route never has more than ``max_points + max_event_points``
points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import polars as pl

from driverscore.domain.cleaning import step_metres
from driverscore.domain.features import EVENT_COLUMNS

__all__ = ["EVENT_COLUMNS", "ROUTE_POINT", "ROUTE_SCHEMA", "RouteConfig", "trip_routes"]

#: One point of a route: the fix's time, WGS84 position and event flags (module docstring).
ROUTE_POINT: Final = pl.Struct(
    {
        "ts": pl.Datetime("us", "UTC"),
        "lat": pl.Float64(),
        "lon": pl.Float64(),
        **{name: pl.Boolean() for name in EVENT_COLUMNS},
    }
)

ROUTE_SCHEMA: Final[dict[str, pl.DataType]] = {
    "vehicle_id": pl.String(),
    "trip_id": pl.String(),
    "point_count": pl.Int64(),
    "route": pl.List(ROUTE_POINT),
}


@dataclass(frozen=True)
class RouteConfig:
    """How routes are thinned (module docstring)."""

    #: Distance driven between two kept points, at least (m).
    min_spacing_m: float = 25.0
    #: Most points of one route placed by the spacing rule, first and last fix included.
    max_points: int = 500
    #: Most event fixes kept besides them (the earliest ones, when a trip has more).
    max_event_points: int = 500

    def __post_init__(self) -> None:
        if self.min_spacing_m <= 0 or self.max_points < 3 or self.max_event_points < 0:
            raise ValueError(
                "min_spacing_m must be positive, max_points at least 3 and "
                "max_event_points not negative"
            )


def trip_routes(pings: pl.DataFrame, config: RouteConfig = RouteConfig()) -> pl.DataFrame:
    """One thinned route per trip of cleaned pings that carry ``trip_id`` and the event
    flags of :data:`EVENT_COLUMNS` (``features.ping_events``, or trip preparation with
    ``events=True``); a null flag is no event.

    Rows of :data:`ROUTE_SCHEMA`, sorted by ``vehicle_id``, ``trip_id``; pings without a
    trip id (set aside by trip cutting) make no route.
    """
    if pings.height == 0 or "trip_id" not in pings.columns:
        return pl.DataFrame(schema=ROUTE_SCHEMA)
    missing = [name for name in EVENT_COLUMNS if name not in pings.columns]
    if missing:
        raise ValueError(
            f"trip_routes needs the pings' event flags ({', '.join(missing)} missing): "
            "take them from features.ping_events"
        )
    ordered = (
        pings.filter(pl.col("trip_id").is_not_null())
        .select(
            "vehicle_id",
            "trip_id",
            pl.col("ts").dt.convert_time_zone("UTC"),
            "lat",
            "lon",
            *(pl.col(name).fill_null(value=False) for name in EVENT_COLUMNS),
        )
        .sort("vehicle_id", "trip_id", "ts", maintain_order=True)
    )
    if ordered.height == 0:
        return pl.DataFrame(schema=ROUTE_SCHEMA)
    lat = ordered["lat"].to_numpy().astype(np.float64, copy=False)
    lon = ordered["lon"].to_numpy().astype(np.float64, copy=False)
    steps = np.concatenate([[0.0], step_metres(lat, lon)])
    trip = ("vehicle_id", "trip_id")
    first = pl.struct(trip).is_first_distinct()
    last = pl.struct(trip).is_last_distinct()
    # The step into a trip's first fix comes from the previous trip: it counts nothing.
    driven = ordered.with_columns(
        pl.when(first).then(0.0).otherwise(pl.Series(steps)).alias("_step"),
        first.alias("_first"),
        last.alias("_last"),
    ).with_columns(pl.col("_step").cum_sum().over(trip).alias("_driven"))
    spacing = pl.max_horizontal(
        pl.lit(config.min_spacing_m), pl.col("_driven").max().over(trip) / (config.max_points - 2)
    )
    bucket = (pl.col("_driven") / spacing).floor()
    new_bucket = (bucket != bucket.shift(1).over(trip)).fill_null(value=True)
    # Where an event is counted: brakes, accelerations and corners are flagged there
    # only; speeding on every fix of a stretch, counted here at the stretch's first fix.
    speeding = pl.col("speeding")
    speeding_start = speeding & ~speeding.shift(1).over(trip).fill_null(value=False)
    counted = pl.col("hard_brake") | pl.col("harsh_accel") | pl.col("harsh_corner") | speeding_start
    kept_event = counted & (counted.cast(pl.Int64).cum_sum().over(trip) <= config.max_event_points)
    return (
        driven.filter(pl.col("_first") | pl.col("_last") | new_bucket | kept_event)
        .group_by(trip, maintain_order=True)
        .agg(
            pl.len().cast(pl.Int64).alias("point_count"),
            pl.struct("ts", "lat", "lon", *EVENT_COLUMNS).alias("route"),
        )
        .cast(ROUTE_SCHEMA)  # type: ignore[arg-type]
    )
