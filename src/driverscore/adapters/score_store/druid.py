"""The score store at scale: Apache Druid, fed from the scores and alerts topics by Kafka
supervisors (``adapters/druid/specs.py``), read with Druid SQL over HTTP.

Druid keeps every message as a row (a trip published twice is two rows), so the
``trips`` relation of the query set takes the **latest record per trip** itself:
``LATEST_BY(column, scored_at)`` per (``vehicle_id``, ``trip_id``), the rule the DuckDB
store applies at write time. ``__time`` is the trip's end (milliseconds), so the period
filter prunes segments. ``reasons`` is stored as one string (lines joined by a newline,
the list order kept) and given back as a list.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import httpx
import polars as pl

from driverscore.adapters.score_store.queries import (
    LEVELS,
    QueryParams,
    StoreQuery,
    finish,
    query_named,
    render,
)
from driverscore.errors import DriverscoreError
from driverscore.settings import Settings

__all__ = [
    "REASONS_SEPARATOR",
    "DruidError",
    "DruidScoreStore",
    "latest_records_sql",
    "open_druid_store",
]

#: How ``reasons`` lists are stored in Druid: one string, the lines joined.
REASONS_SEPARATOR: Final = "\n"

_BY: Final = "MILLIS_TO_TIMESTAMP(scored_at_ms)"
_STRINGS: Final = (
    "driver_id",
    "fleet_id",
    "client_id",
    "risk_band",
    "reasons",
    "model_name",
    "model_version",
    "model_role",
)
_NUMBERS: Final = ("distance_km", "score", "risk_probability")


#: Bytes LATEST_BY keeps of a string per group (it reserves them in the merge buffer for
#: every trip, so they are kept small; longer values are cut).
_MAX_BYTES: Final = {"reasons": 2048, "alert": 512}


def _latest(columns: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    strings = [
        f"LATEST_BY({c}, {_BY}, {_MAX_BYTES.get(c, 128)}) AS {c}" for c in (*columns, *extra)
    ]
    numbers = [f"LATEST_BY({c}, {_BY}) AS {c}" for c in _NUMBERS]
    return ", ".join(
        [
            "vehicle_id",
            "trip_id",
            "MAX(__time) AS end_ts",
            f"MILLIS_TO_TIMESTAMP(LATEST_BY(start_ts_ms, {_BY})) AS start_ts",
            "MAX(scored_at_ms) AS scored_at_ms",
            *strings,
            *numbers,
        ]
    )


def latest_records_sql(datasource: str, where: str, *, alerts: bool = False) -> str:
    """The latest record per trip of ``datasource`` among the rows ``where`` selects: the
    ``trips`` (or ``alerts``) relation of the query set, also Superset's datasets."""
    columns = _latest(_STRINGS, ("alert",)) if alerts else _latest(_STRINGS)
    return f'SELECT {columns} FROM "{datasource}" WHERE {where} GROUP BY vehicle_id, trip_id'


class DruidError(DriverscoreError):
    """Druid did not answer, or refused a query."""


class DruidScoreStore:
    """The query set on Druid SQL (``POST /druid/v2/sql``) at ``url`` (router or broker)."""

    def __init__(
        self,
        url: str,
        *,
        trips_datasource: str = "driverscore_trips",
        alerts_datasource: str = "driverscore_alerts",
        timeout_s: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.trips_datasource = trips_datasource
        self.alerts_datasource = alerts_datasource
        self.timeout_s = timeout_s

    def sql(self, text: str, params: list[Any] | None = None) -> pl.DataFrame:
        """Any Druid SQL; ``?`` parameters typed from their Python values."""
        body = {
            "query": text,
            "parameters": [_parameter(v) for v in params or []],
            "resultFormat": "array",
            "header": True,
            "typesHeader": True,
            "sqlTypesHeader": True,
            "context": {"sqlTimeZone": "Etc/UTC"},
        }
        try:
            answer = httpx.post(f"{self.url}/druid/v2/sql", json=body, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise DruidError(
                f"druid at {self.url} did not answer ({exc}): start it with `driverscore druid "
                "up`, or set DRIVERSCORE_STORE__DRUID__URL"
            ) from None
        if answer.status_code != 200:
            raise DruidError(f"druid refused the query ({answer.status_code}): {answer.text[:500]}")
        rows = answer.json()
        names, _types, sql_types = rows[0], rows[1], rows[2]
        return _frame(names, sql_types, rows[3:])

    def render(self, query: StoreQuery, params: QueryParams) -> tuple[str, list[object]]:
        """The Druid form of ``query``: the latest-record relation, then the body; and every
        ``?`` value in order (the period's first)."""
        body, values = render(query, "druid", params)
        period: list[object] = [params.start, params.end]
        where = "__time > ? AND __time <= ?"
        if query.name == "trip_history":
            # One vehicle's or driver's trips: taken before the latest per trip is, so Druid
            # groups that entity's trips only (a trip's vehicle and driver never change).
            where += f" AND {LEVELS[params.entity]} = ?"
            period.append(params.entity_id)
        if query.relation == "trips":
            # Records without a score are never stored by DuckDB; here they are left out
            # before the latest is taken, which gives the same trips.
            latest = latest_records_sql(self.trips_datasource, f"{where} AND score IS NOT NULL")
            relation = f"trips AS ({latest})"
        else:
            latest = latest_records_sql(self.alerts_datasource, where, alerts=True)
            relation = f"alerts AS ({latest})"
        return f"WITH {relation} {body}", [*period, *values]

    def query(self, name: str, params: QueryParams) -> pl.DataFrame:
        query = query_named(name)
        sql, values = self.render(query, params)
        frame = self.sql(sql, values)
        if "reasons" in frame.columns:
            frame = frame.with_columns(
                pl.when(pl.col("reasons") == "")
                .then(pl.lit([], dtype=pl.List(pl.String())))
                .otherwise(pl.col("reasons").str.split(REASONS_SEPARATOR))
                .alias("reasons")
            )
        return finish(query, frame)

    def newest_trip_end(self) -> datetime | None:
        frame = self.sql(f'SELECT MAX(__time) AS newest FROM "{self.trips_datasource}"')
        value = frame["newest"][0] if frame.height else None
        return value if isinstance(value, datetime) else None


def _parameter(value: Any) -> dict[str, Any]:
    if isinstance(value, datetime):
        # Epoch milliseconds: Druid's parameter parser rejects text with a fraction.
        return {"type": "TIMESTAMP", "value": int(value.astimezone(UTC).timestamp() * 1000)}
    if isinstance(value, bool):
        return {"type": "BOOLEAN", "value": value}
    if isinstance(value, int):
        return {"type": "BIGINT", "value": value}
    if isinstance(value, float):
        return {"type": "DOUBLE", "value": value}
    return {"type": "VARCHAR", "value": str(value)}


def _frame(names: list[str], sql_types: list[str], rows: list[list[Any]]) -> pl.DataFrame:
    columns: dict[str, pl.Series] = {}
    for i, (name, sql_type) in enumerate(zip(names, sql_types, strict=True)):
        values = [row[i] for row in rows]
        if sql_type == "TIMESTAMP":
            # Druid gives ISO-8601 text in the query's time zone (UTC).
            series = pl.Series(name, values, dtype=pl.String()).str.to_datetime(
                time_zone="UTC", time_unit="us"
            )
        elif sql_type in ("BIGINT", "INTEGER"):
            series = pl.Series(name, values, dtype=pl.Int64())
        elif sql_type in ("DOUBLE", "FLOAT", "DECIMAL"):
            series = pl.Series(name, values, dtype=pl.Float64())
        else:
            series = pl.Series(name, values, dtype=pl.String())
        columns[name] = series
    return pl.DataFrame(columns)


def open_druid_store(settings: Settings) -> DruidScoreStore:
    """Druid at ``store.druid.url``, else the local Druid `driverscore druid up` recorded."""
    from driverscore.adapters.druid.local import druid_url

    config = settings.store.druid
    return DruidScoreStore(
        druid_url(settings),
        trips_datasource=config.trips_datasource,
        alerts_datasource=config.alerts_datasource,
        timeout_s=config.timeout_s,
    )
