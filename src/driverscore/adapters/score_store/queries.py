"""The query set of the score store, written once for DuckDB and Apache Druid.

Every query reads one of two relations, which each engine defines for the period
``start < end_ts <= end`` (the window rule of ``domain.scoring.aggregate_scores``):

- ``trips``: the **latest record per trip** (``vehicle_id``, ``trip_id``: the newest
  ``scored_at``), so a trip published twice, or scored again by a later model version,
  counts once;
- ``alerts``: the latest alert record per trip.

The bodies below are plain SQL that both engines run as written; where the dialects
differ, a query carries both forms side by side (``duckdb`` and ``druid``). Each engine
puts its own ``WITH trips AS (...)`` in front (``DuckDBScoreStore``, ``DruidScoreStore``).
What the SQL does not do identically on both engines - the band of an aggregate score,
shares, integer types, the reasons list - :func:`finish` does once, in Python, for both.

Distance-weighted scores use the rule of ``aggregate_scores``: weight = distance (km,
missing or negative counts 0); a group whose trips all have zero distance gets their
plain mean. A test checks the two give equal results on the same records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal

import polars as pl

from driverscore.domain.scoring import band_for_score

__all__ = [
    "BEHAVIOURS",
    "LEVELS",
    "QUERIES",
    "QueryParams",
    "StoreQuery",
    "filters",
    "finish",
    "query_named",
    "render",
]

Level = Literal["driver", "vehicle", "fleet", "client"]
Engine = Literal["duckdb", "druid"]

#: Group level → column.
LEVELS: Final[dict[str, str]] = {
    "driver": "driver_id",
    "vehicle": "vehicle_id",
    "fleet": "fleet_id",
    "client": "client_id",
}

_WEIGHT: Final = "GREATEST(COALESCE(distance_km, 0.0), 0.0)"
#: ``aggregate_scores``' distance-weighted mean, in SQL.
WEIGHTED_SCORE: Final = (
    f"CASE WHEN SUM({_WEIGHT}) > 0 THEN SUM(score * {_WEIGHT}) / SUM({_WEIGHT}) ELSE AVG(score) END"
)
_DISTANCE: Final = "SUM(COALESCE(distance_km, 0.0))"
#: The behaviours a trip page shows: the feature values behind the reason codes.
BEHAVIOURS: Final = (
    "hard_brake_count",
    "harsh_accel_count",
    "harsh_corner_count",
    "speeding_share",
    "night_share",
    "max_speed_kmh",
)


@dataclass(frozen=True)
class QueryParams:
    """What a query is asked: the period (``start < end_ts <= end``, UTC) and its options."""

    start: datetime
    end: datetime
    #: Group level of ``group_scores`` and ``score_histogram``.
    level: Level = "fleet"
    #: Most rows of ``worst_drivers``, ``latest_alerts``, ``trip_history``.
    limit: int = 20
    #: ``worst_drivers``: drivers with fewer trips in the period are left out.
    min_trips: int = 1
    #: ``trip_history``: whose trips (``driver`` or ``vehicle``) and which one.
    entity: Literal["driver", "vehicle"] = "driver"
    entity_id: str | None = None
    #: Only this fleet's / client's trips (``None``: every one); a bound parameter.
    fleet_id: str | None = None
    client_id: str | None = None

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("start and end must be timezone-aware (UTC)")
        if self.level not in LEVELS:
            raise ValueError(f"level {self.level!r}: use one of {', '.join(LEVELS)}")
        if self.limit < 1 or self.min_trips < 1:
            raise ValueError("limit and min_trips must be at least 1")


@dataclass(frozen=True)
class StoreQuery:
    """One query of the set: its SQL body per engine (``druid`` ``None``: the same text)."""

    name: str
    description: str
    relation: Literal["trips", "alerts"]
    duckdb: str
    druid: str | None = None
    #: Names of the query's ``?`` parameters after the period's (``QueryParams`` fields).
    params: tuple[str, ...] = field(default=())
    #: Feature columns the query reads besides the relation's own (``trip_behaviours``):
    #: DuckDB joins them from ``trip_scores``, Druid takes their latest value per trip.
    features: tuple[str, ...] = field(default=())

    def body(self, engine: Engine) -> str:
        return self.druid if engine == "druid" and self.druid is not None else self.duckdb


QUERIES: Final[dict[str, StoreQuery]] = {
    q.name: q
    for q in (
        StoreQuery(
            "group_scores",
            "distance-weighted score, trips and km per fleet / client / vehicle / driver",
            "trips",
            f"SELECT {{group}} AS group_id, {WEIGHTED_SCORE} AS score, COUNT(*) AS trip_count, "
            f"{_DISTANCE} AS distance_km FROM trips GROUP BY {{group}} ORDER BY {{group}}",
        ),
        StoreQuery(
            "score_histogram",
            "score distribution: trips per 10-point score bucket per group",
            "trips",
            "SELECT {group} AS group_id, LEAST(FLOOR(score / 10), 9) * 10 AS bucket, "
            "COUNT(*) AS trip_count FROM trips "
            "GROUP BY {group}, LEAST(FLOOR(score / 10), 9) * 10 ORDER BY {group}, bucket",
        ),
        StoreQuery(
            "daily_trend",
            "per day (UTC, by trip end): trips, km, weighted and mean score, high-risk trips",
            "trips",
            # Grouped by the UTC day's number, turned into its midnight once per day:
            # date_trunc on TIMESTAMPTZ per row costs 8x more at 1M trips.
            f"SELECT to_timestamp(any_value(utc_day) * 86400) AS day, COUNT(*) AS trip_count, "
            f"{_DISTANCE} AS distance_km, {WEIGHTED_SCORE} AS score, AVG(score) AS mean_score, "
            "SUM(CASE WHEN risk_band = 'high' THEN 1 ELSE 0 END) AS high_risk_trips "
            "FROM (SELECT *, epoch_us(end_ts) // 86400000000 AS utc_day FROM trips) "
            "GROUP BY utc_day ORDER BY day",
            druid=(
                f"SELECT TIME_FLOOR(end_ts, 'P1D') AS \"day\", COUNT(*) AS trip_count, "
                f"{_DISTANCE} AS distance_km, {WEIGHTED_SCORE} AS score, "
                "AVG(score) AS mean_score, "
                "SUM(CASE WHEN risk_band = 'high' THEN 1 ELSE 0 END) AS high_risk_trips "
                "FROM trips GROUP BY TIME_FLOOR(end_ts, 'P1D') ORDER BY \"day\""
            ),
        ),
        StoreQuery(
            "worst_drivers",
            "the lowest distance-weighted driver scores, with their exposure (trips, km)",
            "trips",
            f"SELECT driver_id, {WEIGHTED_SCORE} AS score, COUNT(*) AS trip_count, "
            f"{_DISTANCE} AS distance_km FROM trips GROUP BY driver_id "
            "HAVING COUNT(*) >= {min_trips} ORDER BY score, driver_id LIMIT {limit}",
        ),
        StoreQuery(
            "latest_alerts",
            "the newest high-risk alerts (by trip end) with their reasons",
            "alerts",
            "SELECT vehicle_id, trip_id, driver_id, fleet_id, client_id, end_ts, score, "
            "risk_band, risk_probability, reasons, alert, model_version FROM alerts "
            "ORDER BY end_ts DESC, vehicle_id, trip_id LIMIT {limit}",
        ),
        StoreQuery(
            "band_shares",
            "trips, km and share of trips per risk band",
            "trips",
            f"SELECT risk_band, COUNT(*) AS trip_count, {_DISTANCE} AS distance_km "
            "FROM trips GROUP BY risk_band ORDER BY risk_band",
        ),
        StoreQuery(
            "model_versions",
            "trips and mean score per model version and role (the record each trip counts)",
            "trips",
            "SELECT model_name, model_version, model_role, COUNT(*) AS trip_count, "
            "AVG(score) AS mean_score FROM trips GROUP BY model_name, model_version, model_role "
            "ORDER BY model_name, model_version, model_role",
        ),
        StoreQuery(
            "trip_history",
            "one driver's or vehicle's trips, newest first",
            "trips",
            "SELECT trip_id, vehicle_id, driver_id, fleet_id, start_ts, end_ts, distance_km, "
            "score, risk_band, reasons, model_version, model_role FROM trips "
            "WHERE {entity} = ? ORDER BY end_ts DESC, trip_id LIMIT {limit}",
            params=("entity_id",),
        ),
        StoreQuery(
            "trip_behaviours",
            "one driver's or vehicle's trips with the behaviours the score read, newest first",
            "trips",
            f"SELECT trip_id, vehicle_id, end_ts, {', '.join(BEHAVIOURS)} FROM trips "
            "WHERE {entity} = ? ORDER BY end_ts DESC, trip_id LIMIT {limit}",
            params=("entity_id",),
            features=BEHAVIOURS,
        ),
    )
}


def query_named(name: str) -> StoreQuery:
    try:
        return QUERIES[name]
    except KeyError:
        raise ValueError(f"no query {name!r}; the query set is {', '.join(QUERIES)}") from None


def render(query: StoreQuery, engine: Engine, params: QueryParams) -> tuple[str, list[object]]:
    """The query's body for ``engine`` with identifiers and limits filled in, and the
    values of its ``?`` parameters (the period's come first, from the engine's relation)."""
    if query.params and params.entity_id is None:
        raise ValueError(f"{query.name} needs an entity id (a driver or vehicle id)")
    sql = query.body(engine).format(
        group=LEVELS[params.level],
        entity=LEVELS[params.entity],
        limit=int(params.limit),
        min_trips=int(params.min_trips),
    )
    return sql, [getattr(params, name) for name in query.params]


def filters(params: QueryParams) -> tuple[str, list[object]]:
    """The fleet / client filter of a period's relation (``AND ...``) and its values."""
    where, values = "", []
    for column in ("fleet_id", "client_id"):
        value = getattr(params, column)
        if value is not None:
            where += f" AND {column} = ?"
            values.append(value)
    return where, values


_INTEGERS: Final = (
    "trip_count",
    "high_risk_trips",
    "bucket",
    "hard_brake_count",
    "harsh_accel_count",
    "harsh_corner_count",
)


def finish(query: StoreQuery, frame: pl.DataFrame) -> pl.DataFrame:
    """What both engines' answers get in Python: integer counts, the band of aggregate
    scores (``domain.scoring.band_for_score``), shares of trips."""
    frame = frame.with_columns(pl.col(c).cast(pl.Int64) for c in _INTEGERS if c in frame.columns)
    if query.name in ("group_scores", "worst_drivers", "daily_trend"):
        bands = [band_for_score(s) if s is not None else None for s in frame["score"].to_list()]
        frame = frame.with_columns(pl.Series("risk_band", bands, dtype=pl.String()))
    if query.name == "band_shares":
        total = frame["trip_count"].sum() if frame.height else 0
        frame = frame.with_columns(
            (pl.col("trip_count") / total if total else pl.lit(0.0)).alias("share")
        )
    return frame
