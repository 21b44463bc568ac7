"""The embedded score store: one DuckDB file under the home folder.

**Tables.** ``trip_scores``: one row per trip and model version (key ``vehicle_id``,
``trip_id``, ``model_version``; the answer records of every path: role ``champion`` or
``challenger``). ``trip_latest``: one row per trip, its newest record (``scored_at``, then
``model_version``), kept at write time so that queries need no window over the whole
table; it holds the record's identity, times, distance, score, band, reasons and model
(:data:`LATEST_COLUMNS`), the feature values stay in ``trip_scores`` (join on the key):
every column it holds is written twice. ``trip_alerts``: alert records, keyed like
``trip_scores``. ``trip_routes``: one thinned route per trip (``domain/routes.py``).
``store_rejects``: input the store did not take, with the reason. Every row carries
``source`` (who wrote it) and ``stored_at``.

**Schema versions** (``store_meta``). 2: route points carry their event flags
(``hard_brake``, ``harsh_accel``, ``harsh_corner``, ``speeding``). A writer upgrades a
version-1 file in place (its stored points get no event); a reader of a file not yet
upgraded reads missing or null flags as no event.

**Idempotent writes.** A batch first keeps, per key, its newest record; a stored record
is replaced only by a newer one (later ``scored_at``) of the same key, and a record that
is already there, or older, changes nothing. So a replayed batch, a restarted sink or a
trip published twice never counts a trip twice. Shadow records (``model_role`` =
``shadow``) are not answers and are not stored (they go to ``store_rejects`` with reason
``shadow_record``; the prediction log pairs them with the answers).

**Locks.** DuckDB lets one process write a file and refuses every other process while it
is open for writing ("Conflicting lock"); a process holding it read-only blocks writers.
So the writer opens the file for one batch (one transaction) and closes it, readers open
it read-only for one query, and both retry a conflicting lock with back-off until
``lock_timeout_s``: a batch is never dropped, it is written late or the write raises
:class:`StoreBusyError` (the caller keeps the batch: the sink does not commit its
offsets, ``driverscore score`` has its Parquet output).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import duckdb
import polars as pl
from polars.datatypes import DataTypeClass

from driverscore.adapters.score_store.queries import (
    QueryParams,
    StoreQuery,
    filters,
    finish,
    query_named,
    render,
)
from driverscore.adapters.score_store.records import (
    ALERT_SCHEMA,
    KEY_COLUMNS,
    REJECT_SCHEMA,
    ScoreBatch,
    split_storable,
)
from driverscore.domain.routes import EVENT_COLUMNS, ROUTE_POINT, ROUTE_SCHEMA
from driverscore.domain.trip_scoring import TRIP_RECORD_SCHEMA
from driverscore.errors import DriverscoreError
from driverscore.settings import Settings

__all__ = [
    "DuckDBScoreStore",
    "StoreBusyError",
    "StoreMissingError",
    "WriteReport",
    "open_score_store",
]

SCHEMA_VERSION: Final = 2

_DUCK_TYPES: Final[dict[type[pl.DataType], str]] = {
    pl.String: "VARCHAR",
    pl.Float64: "DOUBLE",
    pl.Int64: "BIGINT",
    pl.Datetime: "TIMESTAMPTZ",
    pl.Boolean: "BOOLEAN",
}


class StoreBusyError(DriverscoreError):
    """Another process held the score store's file longer than the lock timeout."""


class StoreMissingError(DriverscoreError):
    """There is no score store file to read yet."""


@dataclass(frozen=True)
class WriteReport:
    """What one write did: records taken (new or newer) and records rejected."""

    scores: int
    alerts: int
    routes: int
    rejects: int
    attempts: int


def _duck_type(dtype: pl.DataType | DataTypeClass) -> str:
    if isinstance(dtype, pl.List):
        return f"{_duck_type(dtype.inner)}[]"
    if isinstance(dtype, pl.Struct):
        fields = ", ".join(f"{f.name} {_duck_type(f.dtype)}" for f in dtype.fields)
        return f"STRUCT({fields})"
    return _DUCK_TYPES[dtype if isinstance(dtype, type) else type(dtype)]  # type: ignore[index]


def _columns_ddl(schema: dict[str, pl.DataType]) -> str:
    return ", ".join(f"{name} {_duck_type(dtype)}" for name, dtype in schema.items())


_AUDIT: Final = "source VARCHAR, stored_at TIMESTAMPTZ"
#: What ``trip_latest`` keeps of a record: every column the query set reads.
LATEST_COLUMNS: Final = (
    "trip_id",
    "vehicle_id",
    "driver_id",
    "fleet_id",
    "client_id",
    "start_ts",
    "end_ts",
    "distance_km",
    "risk_probability",
    "score",
    "risk_band",
    "reasons",
    "model_name",
    "model_version",
    "model_role",
    "scored_at",
)
_LATEST_SCHEMA: Final = {name: TRIP_RECORD_SCHEMA[name] for name in LATEST_COLUMNS}
_TABLES: Final = {
    "trip_scores": TRIP_RECORD_SCHEMA,
    "trip_latest": _LATEST_SCHEMA,
    "trip_alerts": ALERT_SCHEMA,
    "trip_routes": ROUTE_SCHEMA,
    "store_rejects": REJECT_SCHEMA,
}

_NEWER: Final = "b.scored_at > t.scored_at"
# Between versions of one trip, the newest record wins; equal times: the higher version.
_NEWER_OF_TRIP: Final = (
    "(b.scored_at > t.scored_at OR (b.scored_at = t.scored_at "
    "AND b.model_version > t.model_version))"
)
_SAME_KEY: Final = " AND ".join(f"t.{c} = b.{c}" for c in KEY_COLUMNS)
_SAME_TRIP: Final = "t.vehicle_id = b.vehicle_id AND t.trip_id = b.trip_id"


def _is_lock_conflict(exc: duckdb.Error) -> bool:
    text = str(exc)
    return "lock" in text.lower() and ("Conflicting" in text or "Could not set lock" in text)


class DuckDBScoreStore:
    """The score store in one DuckDB file (module docstring: tables, keys, locks)."""

    def __init__(
        self,
        path: Path,
        *,
        lock_timeout_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.lock_timeout_s = lock_timeout_s
        self._sleep = sleep
        self._clock = clock

    # -- connections ---------------------------------------------------------------------

    @contextmanager
    def _connect(self, *, read_only: bool) -> Iterator[tuple[duckdb.DuckDBPyConnection, int]]:
        """The file opened for one batch or one query; retries a conflicting lock."""
        if read_only and not self.path.exists():
            raise StoreMissingError(
                f"no score store at {self.path}: scores are stored by `driverscore demo`, "
                "`driverscore score`, `driverscore stream --source file` or `driverscore sink`"
            )
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = self._clock() + self.lock_timeout_s
        delay, attempts = 0.02, 0
        while True:
            attempts += 1
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.Error as exc:
                if not _is_lock_conflict(exc):
                    raise
                if self._clock() >= deadline:
                    raise StoreBusyError(
                        f"score store {self.path} stayed locked by another process for "
                        f"{self.lock_timeout_s:g} s ({str(exc).splitlines()[0]}): stop the "
                        "process that holds it open, or raise DRIVERSCORE_STORE__LOCK_TIMEOUT_S"
                    ) from None
                self._sleep(delay)
                delay = min(delay * 2, 0.5)
        try:
            # Days and times in UTC whatever the machine's zone (``date_trunc('day', …)``).
            con.execute("SET TimeZone = 'UTC'")
            yield con, attempts
        finally:
            con.close()

    # -- writing -------------------------------------------------------------------------

    def _create(self, con: duckdb.DuckDBPyConnection) -> None:
        for table, schema in _TABLES.items():
            # A reject names its source in its own columns.
            audit = "stored_at TIMESTAMPTZ" if "source" in schema else _AUDIT
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({_columns_ddl(schema)}, {audit})")
        con.execute("CREATE TABLE IF NOT EXISTS store_meta (schema_version INTEGER)")
        if con.execute("SELECT count(*) FROM store_meta").fetchone() == (0,):
            con.execute("INSERT INTO store_meta VALUES (?)", [SCHEMA_VERSION])
        self._upgrade_routes(con)

    @staticmethod
    def _upgrade_routes(con: duckdb.DuckDBPyConnection) -> None:
        """Version 1 → 2: route points gain their event flags, false on stored points."""
        row = con.execute(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = 'trip_routes' AND column_name = 'route'"
        ).fetchone()
        if row is not None and all(f" {name} " in f" {row[0]} " for name in EVENT_COLUMNS):
            return
        fields = ", ".join(f"{name} := p.{name}" for name in ("ts", "lat", "lon")) + "".join(
            f", {name} := false" for name in EVENT_COLUMNS
        )
        # Rebuilt rather than altered (inserts take the table's columns by position), in one
        # transaction: a failed upgrade leaves the version-1 table, tried again next write.
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                "CREATE TABLE trip_routes_v2 AS SELECT vehicle_id, trip_id, point_count, "
                f"CAST(list_transform(route, lambda p: struct_pack({fields})) "
                f"AS {_duck_type(ROUTE_POINT)}[]) AS route, source, stored_at FROM trip_routes"
            )
            con.execute("DROP TABLE trip_routes")
            con.execute("ALTER TABLE trip_routes_v2 RENAME TO trip_routes")
            con.execute("UPDATE store_meta SET schema_version = ? WHERE schema_version < ?", [2, 2])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def write(self, batch: ScoreBatch) -> WriteReport:
        """Store one batch in one transaction (module docstring: idempotent, retried)."""
        scores, score_rejects = split_storable(batch.scores, TRIP_RECORD_SCHEMA, batch.source)
        alerts, alert_rejects = split_storable(batch.alerts, ALERT_SCHEMA, batch.source)
        rejects = pl.concat([batch.rejects.cast(REJECT_SCHEMA), score_rejects, alert_rejects])  # type: ignore[arg-type]
        scores = _newest_per_key(scores, KEY_COLUMNS)
        latest = _newest_per_key(scores, ("vehicle_id", "trip_id")).select(LATEST_COLUMNS)
        alerts = _newest_per_key(alerts, KEY_COLUMNS)
        routes = batch.routes.unique(["vehicle_id", "trip_id"], keep="last", maintain_order=True)
        now = datetime.now(UTC)
        with self._connect(read_only=False) as (con, attempts):
            self._create(con)
            con.execute("BEGIN TRANSACTION")
            try:
                taken = self._merge(
                    con, "trip_scores", scores, batch.source, now, _SAME_KEY, _NEWER
                )
                self._merge(
                    con, "trip_latest", latest, batch.source, now, _SAME_TRIP, _NEWER_OF_TRIP
                )
                alerted = self._merge(
                    con, "trip_alerts", alerts, batch.source, now, _SAME_KEY, _NEWER
                )
                routed = self._replace_routes(con, routes, batch.source, now)
                self._append(con, "store_rejects", rejects, batch.source, now)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return WriteReport(taken, alerted, routed, rejects.height, attempts)

    @staticmethod
    def _register(
        con: duckdb.DuckDBPyConnection, frame: pl.DataFrame, source: str, now: datetime
    ) -> None:
        con.register(
            "b_frame",
            frame.with_columns(
                pl.lit(source).alias("source"),
                pl.lit(now, dtype=pl.Datetime("us", "UTC")).alias("stored_at"),
            ).to_arrow(),
        )

    def _merge(
        self,
        con: duckdb.DuckDBPyConnection,
        table: str,
        frame: pl.DataFrame,
        source: str,
        now: datetime,
        same: str,
        newer: str,
    ) -> int:
        """Replace stored rows ``frame`` has a newer record of; add rows it alone has."""
        if frame.height == 0:
            return 0
        self._register(con, frame, source, now)
        try:
            con.execute(f"DELETE FROM {table} t USING b_frame b WHERE {same} AND {newer}")
            inserted = con.execute(
                f"INSERT INTO {table} SELECT b.* FROM b_frame b "
                f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {same})"
            ).fetchone()
        finally:
            con.unregister("b_frame")
        return int(inserted[0]) if inserted else 0

    def _replace_routes(
        self, con: duckdb.DuckDBPyConnection, routes: pl.DataFrame, source: str, now: datetime
    ) -> int:
        if routes.height == 0:
            return 0
        self._register(con, routes.cast(ROUTE_SCHEMA), source, now)  # type: ignore[arg-type]
        try:
            con.execute(f"DELETE FROM trip_routes t USING b_frame b WHERE {_SAME_TRIP}")
            con.execute("INSERT INTO trip_routes SELECT * FROM b_frame")
        finally:
            con.unregister("b_frame")
        return routes.height

    def _append(
        self,
        con: duckdb.DuckDBPyConnection,
        table: str,
        frame: pl.DataFrame,
        source: str,
        now: datetime,
    ) -> None:
        if frame.height == 0:
            return
        con.register(
            "b_frame",
            frame.with_columns(
                pl.lit(now, dtype=pl.Datetime("us", "UTC")).alias("stored_at")
            ).to_arrow(),
        )
        try:
            con.execute(f"INSERT INTO {table} SELECT * FROM b_frame")
        finally:
            con.unregister("b_frame")

    # -- reading -------------------------------------------------------------------------

    def sql(self, text: str, params: list[Any] | None = None) -> pl.DataFrame:
        """Any read-only SQL over the store's tables, the file opened for this query only."""
        with self._connect(read_only=True) as (con, _attempts):
            return con.execute(text, params or []).pl()

    def query(self, name: str, params: QueryParams) -> pl.DataFrame:
        """One query of the set (``queries.py``) over the period of ``params``."""
        query = query_named(name)
        sql, values = self.render(query, params)
        return finish(query, self.sql(sql, [params.start, params.end, *values]))

    def query_many(self, asks: Sequence[tuple[str, QueryParams]]) -> list[pl.DataFrame]:
        """Several queries of the set on one opening of the file (a dashboard page's)."""
        with self._connect(read_only=True) as (con, _attempts):
            answers = []
            for name, params in asks:
                query = query_named(name)
                sql, values = self.render(query, params)
                answers.append(
                    finish(query, con.execute(sql, [params.start, params.end, *values]).pl())
                )
        return answers

    def trip_route(self, vehicle_id: str, trip_id: str) -> pl.DataFrame | None:
        """:meth:`route`, or ``None`` when the store holds no route of that trip."""
        frame = self.route(vehicle_id, trip_id)
        return frame if frame.height else None

    @staticmethod
    def render(query: StoreQuery, params: QueryParams) -> tuple[str, list[object]]:
        """The DuckDB form of ``query``: the period's relation, then the body."""
        body, values = render(query, "duckdb", params)
        where, filtered = filters(params)
        if query.relation == "trips" and query.features:
            # The feature values stay in ``trip_scores``: joined on the latest record's key.
            features = ", ".join(f"s.{c}" for c in query.features)
            relation = (
                f"trips AS (SELECT l.*, {features} FROM trip_latest l JOIN trip_scores s "
                "ON s.vehicle_id = l.vehicle_id AND s.trip_id = l.trip_id "
                "AND s.model_version = l.model_version "
                f"WHERE l.end_ts > ? AND l.end_ts <= ? AND l.score IS NOT NULL"
                f"{where.replace(' AND ', ' AND l.')})"
            )
        elif query.relation == "trips":
            relation = (
                "trips AS (SELECT * FROM trip_latest "
                f"WHERE end_ts > ? AND end_ts <= ? AND score IS NOT NULL{where})"
            )
        else:
            relation = (
                f"alerts AS (SELECT * FROM trip_alerts WHERE end_ts > ? AND end_ts <= ?{where} "
                "QUALIFY row_number() OVER (PARTITION BY vehicle_id, trip_id "
                "ORDER BY scored_at DESC, model_version DESC) = 1)"
            )
        return f"WITH {relation} {body}", [*filtered, *values]

    def newest_trip_end(self) -> datetime | None:
        with self._connect(read_only=True) as (con, _attempts):
            row = con.execute("SELECT max(end_ts) FROM trip_latest").fetchone()
        return row[0] if row and row[0] is not None else None

    def counts(self) -> dict[str, int]:
        """Rows per table (``trip_latest``: trips; ``trip_scores``: records)."""
        with self._connect(read_only=True) as (con, _attempts):
            return {
                table: int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]
                for table in _TABLES
            }

    def route(self, vehicle_id: str, trip_id: str) -> pl.DataFrame:
        """One trip's route points (``ts``, ``lat``, ``lon`` and the event flags), in time
        order; a flag the file does not hold yet (schema version 1) or a null one is false."""
        frame = self.sql(
            "SELECT unnest(route, recursive := true) FROM trip_routes "
            "WHERE vehicle_id = ? AND trip_id = ?",
            [vehicle_id, trip_id],
        )
        return frame.with_columns(
            pl.col(name).fill_null(value=False)
            if name in frame.columns
            else pl.lit(value=False).alias(name)
            for name in EVENT_COLUMNS
        )


def _newest_per_key(frame: pl.DataFrame, key: tuple[str, ...]) -> pl.DataFrame:
    """One row per ``key``: the newest ``scored_at`` (then the highest model version)."""
    if frame.height == 0:
        return frame
    return frame.sort(["scored_at", "model_version"], nulls_last=False).unique(
        list(key), keep="last", maintain_order=False
    )


def open_score_store(settings: Settings) -> DuckDBScoreStore:
    """The home's embedded score store (``store.path``, default ``<home>/scores.duckdb``)."""
    return DuckDBScoreStore(settings.store_path, lock_timeout_s=settings.store.lock_timeout_s)
