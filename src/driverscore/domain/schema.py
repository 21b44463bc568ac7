"""Canonical telemetry contracts: the ping, the trip feature row and the trip score record.

Every engine (batch, stream, REST) converts its input into the canonical ping frame below
before any domain code touches it, so the domain only ever sees one layout and one set
of units (SI: metres, seconds, m/s, m/s², degrees, UTC).
"""

from __future__ import annotations

from typing import Final

import polars as pl

PING_SCHEMA_VERSION: Final = "1.0"

#: Canonical ping columns and their Polars types. ``ts`` is UTC with microsecond precision.
PING_SCHEMA: Final[dict[str, pl.DataType]] = {
    "ts": pl.Datetime("us", "UTC"),
    "vehicle_id": pl.String(),
    "driver_id": pl.String(),
    "trip_id": pl.String(),
    "lat": pl.Float64(),
    "lon": pl.Float64(),
    "speed_mps": pl.Float64(),
    "heading_deg": pl.Float64(),
    "accel_long_mps2": pl.Float64(),
    "accel_lat_mps2": pl.Float64(),
    "speed_limit_mps": pl.Float64(),
    "fleet_id": pl.String(),
    "client_id": pl.String(),
}

#: Columns a ping cannot do without; every other column is optional and may be null.
REQUIRED_PING_COLUMNS: Final = ("ts", "vehicle_id", "lat", "lon")

#: Descriptions with units, used by the docs and by API schemas.
PING_FIELD_DOCS: Final[dict[str, str]] = {
    "ts": "Fix time, UTC (ISO-8601 with offset, or epoch milliseconds on the wire).",
    "vehicle_id": "Vehicle (device) identifier.",
    "driver_id": "Driver identifier; defaults to the vehicle when absent.",
    "trip_id": "Trip identifier; when absent, trips are cut by time gaps.",
    "lat": "Latitude, WGS84 degrees, -90..90.",
    "lon": "Longitude, WGS84 degrees, -180..180.",
    "speed_mps": "Ground speed, m/s; derived from positions when absent.",
    "heading_deg": "Course over ground, degrees clockwise from north, 0..360.",
    "accel_long_mps2": "Longitudinal acceleration, m/s², forward positive.",
    "accel_lat_mps2": "Lateral acceleration, m/s², left positive.",
    "speed_limit_mps": "Posted speed limit at the fix, m/s.",
    "fleet_id": "Fleet the vehicle belongs to.",
    "client_id": "Client (customer, policy holder) the vehicle belongs to.",
}


def empty_pings() -> pl.DataFrame:
    """An empty canonical ping frame."""
    return pl.DataFrame(schema=PING_SCHEMA)


def conform_pings(frame: pl.DataFrame) -> pl.DataFrame:
    """Add missing optional columns as nulls, cast to canonical types and order columns.

    Raises ``KeyError`` naming the first missing required column; callers at the edges
    turn that into a user-facing error.
    """
    for name in REQUIRED_PING_COLUMNS:
        if name not in frame.columns:
            raise KeyError(name)
    exprs: list[pl.Expr] = []
    for name, dtype in PING_SCHEMA.items():
        if name in frame.columns:
            exprs.append(pl.col(name).cast(dtype))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
    return frame.select(exprs)
