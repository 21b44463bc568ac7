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

**The per-day rollup.** The fleet overview's aggregates (``group_scores`` and
``score_histogram`` by fleet or client, ``daily_trend``, ``band_shares``) also carry a
form over a third relation, ``daily``: trips, km, weight and score sums per UTC day,
fleet, client, risk band and 10-point score bucket (:data:`DAILY_COLUMNS`). An engine
that keeps such a rollup (the DuckDB store's ``trip_daily``) answers these queries from
it: the whole days of the period from the rollup, the partial days at its edges from the
trips, summed the same way, so the answers are those of the ``trips`` form.

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
    "DAILY_COLUMNS",
    "DAILY_LEVELS",
    "LEVELS",
    "QUERIES",
    "QueryParams",
    "StoreQuery",
    "filters",
    "finish",
    "query_named",
    "reads_daily",
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
#: The same two over the ``daily`` relation, whose rows hold sums already.
_DAILY_SCORE: Final = (
    "CASE WHEN SUM(weight_km) > 0 THEN SUM(weighted_score) / SUM(weight_km) "
    "ELSE SUM(score_sum) / SUM(trip_count) END"
)
_DAILY_COUNT: Final = "CAST(SUM(trip_count) AS BIGINT)"
#: The score bucket of ``score_histogram``.
SCORE_BUCKET: Final = "LEAST(FLOOR(score / 10), 9) * 10"
#: A row of the ``daily`` relation: the group, then the sums of its trips.
DAILY_COLUMNS: Final = {
    "utc_day": "days since 1970-01-01 of the trip end (UTC)",
    "fleet_id": "fleet",
    "client_id": "client",
    "risk_band": "the trips' band",
    "bucket": "the trips' 10-point score bucket",
    "trip_count": "trips",
    "distance_km": "sum of distance (missing: 0)",
    "weight_km": "sum of the score weight (distance, missing or negative: 0)",
    "weighted_score": "sum of score x weight",
    "score_sum": "sum of score",
}
#: The per-trip values of the ``daily`` columns, over rows of the ``trips`` relation.
DAILY_OF_TRIP: Final = {
    "utc_day": "CAST(FLOOR(epoch_us(end_ts) / 86400000000) AS BIGINT)",
    "fleet_id": "fleet_id",
    "client_id": "client_id",
    "risk_band": "risk_band",
    "bucket": SCORE_BUCKET,
    "trip_count": "1",
    "distance_km": "COALESCE(distance_km, 0.0)",
    "weight_km": _WEIGHT,
    "weighted_score": f"score * {_WEIGHT}",
    "score_sum": "score",
}
#: Group levels the rollup holds (``group_scores`` / ``score_histogram`` at other levels
#: read the trips).
DAILY_LEVELS: Final = ("fleet", "client")
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
    #: The body over the ``daily`` relation (the per-day rollup), for engines keeping one.
    daily: str | None = None

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
            daily=(
                f"SELECT {{group}} AS group_id, {_DAILY_SCORE} AS score, "
                f"{_DAILY_COUNT} AS trip_count, SUM(distance_km) AS distance_km "
                "FROM daily GROUP BY {group} ORDER BY {group}"
            ),
        ),
        StoreQuery(
            "score_histogram",
            "score distribution: trips per 10-point score bucket per group",
            "trips",
            f"SELECT {{group}} AS group_id, {SCORE_BUCKET} AS bucket, "
            "COUNT(*) AS trip_count FROM trips "
            f"GROUP BY {{group}}, {SCORE_BUCKET} ORDER BY {{group}}, bucket",
            daily=(
                f"SELECT {{group}} AS group_id, bucket, {_DAILY_COUNT} AS trip_count "
                "FROM daily GROUP BY {group}, bucket ORDER BY {group}, bucket"
            ),
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
            daily=(
                f"SELECT to_timestamp(utc_day * 86400) AS day, {_DAILY_COUNT} AS trip_count, "
                f"SUM(distance_km) AS distance_km, {_DAILY_SCORE} AS score, "
                "SUM(score_sum) / SUM(trip_count) AS mean_score, "
                "CAST(SUM(CASE WHEN risk_band = 'high' THEN trip_count ELSE 0 END) AS BIGINT) "
                "AS high_risk_trips FROM daily GROUP BY utc_day ORDER BY day"
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
            daily=(
                f"SELECT risk_band, {_DAILY_COUNT} AS trip_count, "
                "SUM(distance_km) AS distance_km FROM daily GROUP BY risk_band ORDER BY risk_band"
            ),
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


def reads_daily(query: StoreQuery, params: QueryParams) -> bool:
    """Whether an engine keeping the per-day rollup answers ``query`` from it."""
    if query.daily is None:
        return False
    return "{group}" not in query.daily or params.level in DAILY_LEVELS


def render(
    query: StoreQuery, engine: Engine, params: QueryParams, *, daily: bool = False
) -> tuple[str, list[object]]:
    """The query's body for ``engine`` (``daily``: its form over the rollup) with
    identifiers and limits filled in, and the values of its ``?`` parameters (the period's
    come first, from the engine's relation)."""
    if query.params and params.entity_id is None:
        raise ValueError(f"{query.name} needs an entity id (a driver or vehicle id)")
    body = query.daily if daily and query.daily is not None else query.body(engine)
    sql = body.format(
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
