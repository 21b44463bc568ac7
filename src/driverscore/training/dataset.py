"""Training data: join late-arriving claims onto trips, and split by time."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl

from driverscore.errors import InputDataError

__all__ = ["LABEL_COLUMN", "label_trips", "time_split"]

LABEL_COLUMN = "incident"

_TRIP_COLUMNS = ("trip_id", "vehicle_id", "start_ts", "end_ts")
_INCIDENT_COLUMNS = ("vehicle_id", "incident_ts", "reported_at")


def _require(frame: pl.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputDataError(f"{what} lack column(s): {', '.join(missing)}")


def label_trips(
    features: pl.DataFrame,
    incidents: pl.DataFrame,
    reference_time: datetime,
    maturity_days: float,
) -> pl.DataFrame:
    """Trip feature rows with an ``incident`` column (0/1), mature trips only.

    A trip is positive when an incident of its vehicle has ``incident_ts`` within
    ``[start_ts, end_ts]`` and was reported by ``reference_time``: a claim reported later
    was not known when the model was trained, and counting it would leak the future.
    Trips that ended after ``reference_time - maturity_days`` are dropped because their
    claims may still be on the way, so a 0 there would often be a wrong label.

    Each incident is matched with an as-of join to the latest trip of its vehicle that
    started at or before it (trips of one vehicle do not overlap), which is
    O((trips + incidents) log) instead of a trips × incidents cross join.
    """
    if reference_time.tzinfo is None:
        raise ValueError("reference_time must be timezone-aware (UTC)")
    if maturity_days < 0:
        raise ValueError("maturity_days must be >= 0")
    _require(features, _TRIP_COLUMNS, "trip features")
    _require(incidents, _INCIDENT_COLUMNS, "incident labels")

    cutoff = reference_time - timedelta(days=maturity_days)
    ts_type = pl.Datetime("us", "UTC")
    trips = features.with_columns(
        pl.col("start_ts").cast(ts_type), pl.col("end_ts").cast(ts_type)
    ).filter(pl.col("end_ts") <= cutoff)

    known = (
        incidents.select(
            pl.col("vehicle_id").cast(pl.String),
            pl.col("incident_ts").cast(ts_type),
            pl.col("reported_at").cast(ts_type),
        )
        .filter(
            (pl.col("reported_at") <= reference_time)
            & pl.col("incident_ts").is_not_null()
            & pl.col("vehicle_id").is_not_null()
        )
        .sort("incident_ts")
    )
    windows = (
        trips.select(
            pl.col("trip_id"),
            pl.col("vehicle_id").cast(pl.String),
            pl.col("start_ts"),
            pl.col("end_ts").alias("_trip_end"),
        )
        .filter(pl.col("start_ts").is_not_null())
        .sort("start_ts")
    )
    matched = (
        known.join_asof(
            windows,
            left_on="incident_ts",
            right_on="start_ts",
            by="vehicle_id",
            strategy="backward",
            # Both sides are sorted just above; polars cannot verify it within ``by`` groups.
            check_sortedness=False,
        )
        .filter(pl.col("trip_id").is_not_null() & (pl.col("incident_ts") <= pl.col("_trip_end")))
        # A trip is (vehicle, trip id): devices number trips 1, 2, 3... on every vehicle.
        .select("vehicle_id", "trip_id")
        .unique()
        .with_columns(pl.lit(1, dtype=pl.Int8).alias(LABEL_COLUMN))
    )
    trips = trips.with_columns(pl.col("vehicle_id").cast(pl.String))
    return trips.join(matched, on=["vehicle_id", "trip_id"], how="left").with_columns(
        pl.col(LABEL_COLUMN).fill_null(0).cast(pl.Int8)
    )


def time_split(
    labelled: pl.DataFrame, validation_fraction: float
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, holdout): the newest ``validation_fraction`` of trips by ``end_ts`` is held out.

    Holding out the newest trips (not a random sample) measures what matters in production:
    how the model does on trips that come after everything it learned from.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError("validation_fraction must be between 0 and 1")
    ordered = labelled.sort(["end_ts", "trip_id"])
    n = ordered.height
    n_holdout = round(n * validation_fraction)
    if n >= 2:
        n_holdout = min(max(n_holdout, 1), n - 1)
    n_train = n - n_holdout
    return ordered.head(n_train), ordered.tail(n - n_train)
