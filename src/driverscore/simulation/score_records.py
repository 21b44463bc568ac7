"""Trip score records without a model: volume for the score store's tests and benchmark.

The records have the schema every scoring path writes (``TRIP_RECORD_SCHEMA``) and the
bands of their scores; the values are random, not driving. Millions of rows in seconds
(numpy, no Python loop). Use the fleet simulator and a model for records that mean
something.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl

from driverscore.domain.scoring import BAND_FLOORS
from driverscore.domain.trip_scoring import TRIP_RECORD_SCHEMA

__all__ = ["random_score_records"]

_BAND_REASON = "Hard braking: 3.1 per 100 km (fleet median 0.8)"


def random_score_records(
    n: int,
    *,
    start: datetime,
    days: float = 3.0,
    seed: int = 0,
    vehicles: int = 7,
    drivers: int = 9,
    fleets: int = 3,
    clients: int = 2,
    model_version: str = "1",
    scored_at: datetime | None = None,
    zero_distance_every: int = 17,
    null_distance_every: int = 23,
) -> pl.DataFrame:
    """``n`` records ending in ``(start, start + days]``; trip ``t{i}`` of vehicle
    ``v{i % vehicles}``, driver ``d{i % drivers}``, fleet ``f{i % fleets}`` (fleet ``f9``
    for every ``zero_distance_every``-th trip, which also has zero distance, so one fleet
    gets the plain mean of ``aggregate_scores``), every ``null_distance_every``-th trip
    without a distance. ``scored_at`` defaults to ``start + days + 1 day``."""
    rng = np.random.default_rng(seed)
    index = pl.int_range(0, n, eager=True)
    end_s = rng.integers(60, int(days * 86_400), n)
    score = rng.uniform(20.0, 100.0, n)
    distance = rng.uniform(0.0, 30.0, n)
    zero = (np.arange(n) % zero_distance_every) == 0
    distance[zero] = 0.0
    band: pl.Expr = pl.lit("high")
    for name, floor in reversed(BAND_FLOORS):
        band = pl.when(pl.col("score") >= floor).then(pl.lit(name)).otherwise(band)
    scored = scored_at or start + timedelta(days=days + 1)
    end_ts = pl.lit(start, dtype=pl.Datetime("us", "UTC")) + pl.duration(
        seconds=pl.lit(pl.Series(end_s))
    )
    frame = pl.DataFrame(
        {
            "trip_id": "t" + index.cast(pl.String),
            "vehicle_id": "v" + (index % vehicles).cast(pl.String),
            "driver_id": "d" + (index % drivers).cast(pl.String),
            "fleet_id": "f" + (index % fleets).cast(pl.String),
            "client_id": "c" + (index % clients).cast(pl.String),
            "distance_km": pl.Series(distance).scatter(
                np.flatnonzero(np.arange(n) % null_distance_every == 0), None
            ),
            "score": score,
            "risk_probability": rng.uniform(0.0, 1.0, n),
            "zero": zero,
        }
    ).with_columns(
        pl.when("zero").then(pl.lit("f9")).otherwise("fleet_id").alias("fleet_id"),
        band.alias("risk_band"),
        end_ts.alias("end_ts"),
        (end_ts - pl.duration(minutes=20)).alias("start_ts"),
        pl.when(pl.col("score") < 60)
        .then(pl.lit([_BAND_REASON], dtype=pl.List(pl.String())))
        .otherwise(pl.lit([], dtype=pl.List(pl.String())))
        .alias("reasons"),
        pl.lit("driverscore-trip-risk").alias("model_name"),
        pl.lit(model_version).alias("model_version"),
        pl.lit("champion").alias("model_role"),
        pl.lit(scored, dtype=pl.Datetime("us", "UTC")).alias("scored_at"),
    )
    return frame.select(
        pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype=dtype).alias(name)
        for name, dtype in TRIP_RECORD_SCHEMA.items()
    )
