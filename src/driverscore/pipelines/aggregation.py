"""`driverscore aggregate`: driver / vehicle / fleet / client scores from trip scores."""

from __future__ import annotations

from datetime import datetime

import polars as pl

from driverscore.adapters.files import write_table
from driverscore.adapters.readers import read_table
from driverscore.domain.scoring import aggregate_scores
from driverscore.errors import ConfigError, InputDataError
from driverscore.settings import Settings

GROUPS = ("driver", "vehicle", "fleet", "client")


def run_aggregation(
    settings: Settings,
    *,
    scores_uri: str,
    by: str,
    window_days: float,
    as_of: datetime | None,
    out_uri: str | None,
) -> pl.DataFrame:
    """Read trip score records, aggregate them over the window, optionally write the table."""
    if by not in GROUPS:
        raise ConfigError(f"--by {by!r}: use one of {', '.join(GROUPS)}")
    options = settings.storage_options()
    scores = read_table(scores_uri, None, options)
    needed = ("end_ts", "score", "distance_km", f"{by}_id")
    missing = [c for c in needed if c not in scores.columns]
    if missing:
        raise InputDataError(
            f"{scores_uri}: not trip score records (no {', '.join(missing)}); "
            "use the output of driverscore score"
        )
    if scores.schema["end_ts"] == pl.String:
        scores = scores.with_columns(pl.col("end_ts").str.to_datetime(time_zone="UTC"))
    for name in ("score", "distance_km"):
        scores = scores.with_columns(pl.col(name).cast(pl.Float64))
    if scores.height == 0:
        raise InputDataError(f"{scores_uri}: no trip scores to aggregate")
    window_end = as_of or scores["end_ts"].dt.convert_time_zone("UTC").max()
    assert isinstance(window_end, datetime)
    table = aggregate_scores(scores, by=by, as_of=window_end, window_days=window_days)
    if out_uri:
        write_table(table, out_uri, options)
    return table
