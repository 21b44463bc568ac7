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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import polars as pl

from driverscore.domain.cleaning import step_metres

__all__ = ["ROUTE_POINT", "ROUTE_SCHEMA", "RouteConfig", "trip_routes"]

#: One point of a route: the fix's time and WGS84 position.
ROUTE_POINT: Final = pl.Struct(
    {"ts": pl.Datetime("us", "UTC"), "lat": pl.Float64(), "lon": pl.Float64()}
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
    #: Most points of one route, first and last fix included.
    max_points: int = 500

    def __post_init__(self) -> None:
        if self.min_spacing_m <= 0 or self.max_points < 3:
            raise ValueError("min_spacing_m must be positive and max_points at least 3")


def trip_routes(pings: pl.DataFrame, config: RouteConfig = RouteConfig()) -> pl.DataFrame:
    """One thinned route per trip of cleaned pings that carry ``trip_id``.

    Rows of :data:`ROUTE_SCHEMA`, sorted by ``vehicle_id``, ``trip_id``; pings without a
    trip id (set aside by trip cutting) make no route.
    """
    if pings.height == 0 or "trip_id" not in pings.columns:
        return pl.DataFrame(schema=ROUTE_SCHEMA)
    ordered = (
        pings.filter(pl.col("trip_id").is_not_null())
        .select("vehicle_id", "trip_id", pl.col("ts").dt.convert_time_zone("UTC"), "lat", "lon")
        .sort("vehicle_id", "trip_id", "ts")
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
    return (
        driven.filter(pl.col("_first") | pl.col("_last") | new_bucket)
        .group_by(trip, maintain_order=True)
        .agg(
            pl.len().cast(pl.Int64).alias("point_count"),
            pl.struct("ts", "lat", "lon").alias("route"),
        )
        .cast(ROUTE_SCHEMA)  # type: ignore[arg-type]
    )
