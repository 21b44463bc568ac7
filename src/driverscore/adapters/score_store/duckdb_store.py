"""The embedded score store: one DuckDB file under the home folder.

**Tables.** ``trip_scores``: one row per trip and model version (key ``vehicle_id``,
``trip_id``, ``model_version``; the answer records of every path: role ``champion`` or
``challenger``). ``trip_latest``: one row per trip, its newest record (``scored_at``, then
``model_version``), kept at write time so that queries need no window over the whole
table; it holds every column the query set reads (:data:`LATEST_COLUMNS`: identity,
times, distance, score, band, reasons, model, and the behaviours the driver and vehicle
pages show), so no query joins ``trip_scores``. ``trip_daily``: the per-day rollup of
``trip_latest`` (``queries.DAILY_COLUMNS``: trips, km and score sums per UTC day, fleet,
client, band and score bucket) that the fleet overview's aggregates read for the whole
days of a period. ``trip_alerts``: alert records, keyed like ``trip_scores``.
``trip_routes``: one thinned route per trip (``domain/routes.py``). ``store_rejects``:
input the store did not take, with the reason. Every row of the record tables carries
``source`` (who wrote it) and ``stored_at``.

**Schema versions** (``store_meta``). 2: route points carry their event flags
(``hard_brake``, ``harsh_accel``, ``harsh_corner``, ``speeding``). 3: the behaviours in
``trip_latest`` and the ``trip_daily`` rollup. A reader of a file not yet upgraded reads
missing or null route flags as no event.

**The rollup in the same transaction.** A write recomputes, from ``trip_latest`` after
its merge, the ``trip_daily`` rows of every (day, fleet, client) whose trips it changed:
the groups of the rows it replaced and of the rows it added. So a trip re-scored into
another band, or whose newer record ends on another day, leaves its old group and joins
its new one, and a replayed batch (nothing replaced) recomputes nothing. Sums are
recomputed, never added to, so the rollup cannot drift from the trips.

**Older files.** ``store_meta.schema_version`` says which layout a file has. A file of
an earlier layout (version 1: no route flags; 1 or 2: no behaviours in ``trip_latest``,
no ``trip_daily``) is brought up to date in one transaction by the first write, or by
the first read, which then opens it for writing once; stored route points get no event.

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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import duckdb
import polars as pl
from polars.datatypes import DataTypeClass

from driverscore.adapters.score_store.queries import (
    BEHAVIOURS,
    DAILY_COLUMNS,
    DAILY_OF_TRIP,
    QueryParams,
    StoreQuery,
    filters,
    finish,
    query_named,
    reads_daily,
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

#: 1: the first layout; 2: route points with event flags; 3: behaviours in
#: ``trip_latest`` and the ``trip_daily`` rollup.
SCHEMA_VERSION: Final = 3

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
    *BEHAVIOURS,
)
_LATEST_SCHEMA: Final = {name: TRIP_RECORD_SCHEMA[name] for name in LATEST_COLUMNS}
_DAILY_TYPES: Final = {
    "utc_day": "BIGINT",
    "fleet_id": "VARCHAR",
    "client_id": "VARCHAR",
    "risk_band": "VARCHAR",
    "bucket": "DOUBLE",
    "trip_count": "BIGINT",
}
_DAILY_DDL: Final = ", ".join(f"{c} {_DAILY_TYPES.get(c, 'DOUBLE')}" for c in DAILY_COLUMNS)
_DAY_US: Final = 86_400_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
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
#: A ``trip_latest`` row's rollup group (what a write changed).
_GROUP_OF_ROW: Final = (
    f"{DAILY_OF_TRIP['utc_day'].replace('end_ts', 't.end_ts')} AS utc_day, "
    "t.fleet_id AS fleet_id, t.client_id AS client_id"
)
_SAME_GROUP: Final = (
    "d.utc_day = g.utc_day AND d.fleet_id IS NOT DISTINCT FROM g.fleet_id "
    "AND d.client_id IS NOT DISTINCT FROM g.client_id"
)
_DAILY_GROUP: Final = ("utc_day", "fleet_id", "client_id", "risk_band", "bucket")


def _daily_rows(trips: str, *, groups: str | None = None) -> str:
    """The rollup's rows of the trips ``trips`` selects (``trip_latest`` rows); with
    ``groups`` (a relation of groups), of those groups only."""
    values = ", ".join(f"{v} AS {c}" for c, v in DAILY_OF_TRIP.items())
    sums = ", ".join(c if c in _DAILY_GROUP else f"SUM({c}) AS {c}" for c in DAILY_COLUMNS)
    only = f" SEMI JOIN {groups} g ON {_SAME_GROUP.replace('d.', 't.')}" if groups else ""
    return (
        f"SELECT {sums} FROM (SELECT {values} FROM {trips}) t{only} "
        f"GROUP BY {', '.join(_DAILY_GROUP)}"
    )


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
        #: Whether this file's layout is known to be current (``_ensure_layout``).
        self._layout_checked = False

    # -- connections ---------------------------------------------------------------------

    @contextmanager
    def _connect(
        self, *, read_only: bool, check_layout: bool = True
    ) -> Iterator[tuple[duckdb.DuckDBPyConnection, int]]:
        """The file opened for one batch or one query; retries a conflicting lock."""
        if read_only and not self.path.exists():
            raise StoreMissingError(
                f"no score store at {self.path}: scores are stored by `driverscore demo`, "
                "`driverscore score`, `driverscore stream --source file` or `driverscore sink`"
            )
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif check_layout:
            self._ensure_layout()
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
        """Create the tables a file lacks; bring a file of an earlier layout up to date."""
        for table, schema in _TABLES.items():
            # A reject names its source in its own columns.
            audit = "stored_at TIMESTAMPTZ" if "source" in schema else _AUDIT
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({_columns_ddl(schema)}, {audit})")
        con.execute(f"CREATE TABLE IF NOT EXISTS trip_daily ({_DAILY_DDL})")
        con.execute("CREATE TABLE IF NOT EXISTS store_meta (schema_version INTEGER)")
        row = con.execute("SELECT max(schema_version) FROM store_meta").fetchone()
        version = row[0] if row else None
        if version is None:
            con.execute("INSERT INTO store_meta VALUES (?)", [SCHEMA_VERSION])
        elif version < SCHEMA_VERSION:
            self._upgrade_routes(con)
            self._upgrade(con)
            con.execute("UPDATE store_meta SET schema_version = ?", [SCHEMA_VERSION])

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
        # Rebuilt rather than altered (inserts take the table's columns by position), inside
        # the caller's transaction: a failed upgrade leaves the version-1 table.
        con.execute(
            "CREATE TABLE trip_routes_v2 AS SELECT vehicle_id, trip_id, point_count, "
            f"CAST(list_transform(route, lambda p: struct_pack({fields})) "
            f"AS {_duck_type(ROUTE_POINT)}[]) AS route, source, stored_at FROM trip_routes"
        )
        con.execute("DROP TABLE trip_routes")
        con.execute("ALTER TABLE trip_routes_v2 RENAME TO trip_routes")

    @staticmethod
    def _upgrade(con: duckdb.DuckDBPyConnection) -> None:
        """Versions 1 and 2 → 3: the behaviours into ``trip_latest`` (from each trip's latest
        record in ``trip_scores``), and ``trip_daily`` built from ``trip_latest``."""
        present = {
            row[0]
            for row in con.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'trip_latest'"
            ).fetchall()
        }
        missing = [c for c in BEHAVIOURS if c not in present]
        for column in missing:
            dtype = _duck_type(TRIP_RECORD_SCHEMA[column])
            con.execute(f"ALTER TABLE trip_latest ADD COLUMN {column} {dtype}")
        if missing:
            assignments = ", ".join(f"{c} = s.{c}" for c in missing)
            con.execute(
                f"UPDATE trip_latest t SET {assignments} FROM trip_scores s "
                "WHERE s.vehicle_id = t.vehicle_id AND s.trip_id = t.trip_id "
                "AND s.model_version = t.model_version"
            )
        con.execute("DELETE FROM trip_daily")
        con.execute(
            "INSERT INTO trip_daily BY NAME " + _daily_rows("trip_latest WHERE score IS NOT NULL")
        )

    def _ensure_layout(self) -> None:
        """Before the first read: a file of an earlier layout is upgraded (one write)."""
        if self._layout_checked or not self.path.exists():
            return
        with self._connect(read_only=True, check_layout=False) as (con, _attempts):
            try:
                row = con.execute("SELECT max(schema_version) FROM store_meta").fetchone()
            except duckdb.CatalogException:
                row = None
        if row is None or row[0] is None or row[0] < SCHEMA_VERSION:
            with self._connect(read_only=False) as (con, _attempts):
                con.execute("BEGIN TRANSACTION")
                try:
                    self._create(con)
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
        self._layout_checked = True

    def write(self, batch: ScoreBatch) -> WriteReport:
        """Store one batch in one transaction (module docstring: idempotent, retried)."""
        scores, score_rejects = split_storable(batch.scores, TRIP_RECORD_SCHEMA, batch.source)
        alerts, alert_rejects = split_storable(batch.alerts, ALERT_SCHEMA, batch.source)
        rejects = pl.concat([batch.rejects.cast(REJECT_SCHEMA), score_rejects, alert_rejects])  # type: ignore[arg-type]
        scores = _newest_per_key(scores, KEY_COLUMNS)
        # In trip-end order: a file written in time order lets a period's scan skip the
        # row groups outside it (DuckDB's min/max per row group), a big batch too.
        latest = (
            _newest_per_key(scores, ("vehicle_id", "trip_id"))
            .select(LATEST_COLUMNS)
            .sort("end_ts", nulls_last=True)
        )
        alerts = _newest_per_key(alerts, KEY_COLUMNS)
        routes = batch.routes.unique(["vehicle_id", "trip_id"], keep="last", maintain_order=True)
        now = datetime.now(UTC)
        with self._connect(read_only=False) as (con, attempts):
            con.execute("BEGIN TRANSACTION")
            try:
                self._create(con)
                taken, _ = self._merge(
                    con, "trip_scores", scores, batch.source, now, _SAME_KEY, _NEWER
                )
                _, changed = self._merge(
                    con,
                    "trip_latest",
                    latest,
                    batch.source,
                    now,
                    _SAME_TRIP,
                    _NEWER_OF_TRIP,
                    returning=_GROUP_OF_ROW,
                )
                self._refresh_daily(con, changed)
                alerted, _ = self._merge(
                    con, "trip_alerts", alerts, batch.source, now, _SAME_KEY, _NEWER
                )
                routed = self._replace_routes(con, routes, batch.source, now)
                self._append(con, "store_rejects", rejects, batch.source, now)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        self._layout_checked = True
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
        *,
        returning: str | None = None,
    ) -> tuple[int, pl.DataFrame | None]:
        """Replace stored rows ``frame`` has a newer record of; add rows it alone has.
        The rows added, and with ``returning`` (columns of a row ``t``) those columns of
        every row removed or added."""
        if frame.height == 0:
            return 0, None
        self._register(con, frame, source, now)
        try:
            if returning is None:
                con.execute(f"DELETE FROM {table} t USING b_frame b WHERE {same} AND {newer}")
                row = con.execute(
                    f"INSERT INTO {table} BY NAME SELECT b.* FROM b_frame b "
                    f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {same})"
                ).fetchone()
                return (int(row[0]) if row else 0), None
            # The rows about to be replaced, found once (one scan of the key columns), then
            # deleted by row id.
            removed = con.execute(
                f"SELECT t.rowid AS row_id, {returning} FROM {table} t JOIN b_frame b "
                f"ON {same} WHERE {newer}"
            ).pl()
            if removed.height:
                con.register("r_frame", removed.select("row_id").to_arrow())
                try:
                    con.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT row_id FROM r_frame)")
                finally:
                    con.unregister("r_frame")
            added = con.execute(
                f"INSERT INTO {table} BY NAME SELECT b.* FROM b_frame b "
                f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {same}) "
                # An INSERT's RETURNING knows no alias: the same columns, unqualified.
                f"RETURNING {returning.replace('t.', '')}"
            ).pl()
        finally:
            con.unregister("b_frame")
        return added.height, pl.concat([removed.drop("row_id"), added], how="vertical_relaxed")

    @staticmethod
    def _refresh_daily(con: duckdb.DuckDBPyConnection, changed: pl.DataFrame | None) -> None:
        """Recompute the ``trip_daily`` rows of the groups a write ``changed``, from
        ``trip_latest`` as it is now (module docstring)."""
        if changed is None or changed.height == 0:
            return
        groups = changed.unique().cast(
            {"utc_day": pl.Int64, "fleet_id": pl.String, "client_id": pl.String}
        )
        first, last = groups["utc_day"].min(), groups["utc_day"].max()
        assert isinstance(first, int) and isinstance(last, int)
        con.register("g_frame", groups.to_arrow())
        try:
            con.execute(f"DELETE FROM trip_daily d USING g_frame g WHERE {_SAME_GROUP}")
            # The days' trips (a range the row groups' min/max prune), of the groups only.
            trips = "trip_latest WHERE end_ts >= ? AND end_ts < ? AND score IS NOT NULL"
            con.execute(
                f"INSERT INTO trip_daily BY NAME {_daily_rows(trips, groups='g_frame')}",
                [_EPOCH + timedelta(days=first), _EPOCH + timedelta(days=last + 1)],
            )
        finally:
            con.unregister("g_frame")

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
        return finish(query, self.sql(sql, values))

    def query_many(self, asks: Sequence[tuple[str, QueryParams]]) -> list[pl.DataFrame]:
        """Several queries of the set on one opening of the file (a dashboard page's)."""
        with self._connect(read_only=True) as (con, _attempts):
            answers = []
            for name, params in asks:
                query = query_named(name)
                sql, values = self.render(query, params)
                answers.append(finish(query, con.execute(sql, values).pl()))
        return answers

    def trip_route(self, vehicle_id: str, trip_id: str) -> pl.DataFrame | None:
        """:meth:`route`, or ``None`` when the store holds no route of that trip."""
        frame = self.route(vehicle_id, trip_id)
        return frame if frame.height else None

    @staticmethod
    def render(query: StoreQuery, params: QueryParams) -> tuple[str, list[object]]:
        """The DuckDB form of ``query``: the period's relation, then the body; and every
        ``?`` value in order."""
        where, filtered = filters(params)
        if query.relation == "trips" and reads_daily(query, params):
            body, values = render(query, "duckdb", params, daily=True)
            relation, period = _daily_relation(params, where, filtered)
            return f"WITH {relation} {body}", [*period, *values]
        body, values = render(query, "duckdb", params)
        if query.relation == "trips":
            # ``trip_latest`` holds the behaviours too (``query.features``): no join.
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
        return f"WITH {relation} {body}", [params.start, params.end, *filtered, *values]

    def newest_trip_end(self) -> datetime | None:
        with self._connect(read_only=True) as (con, _attempts):
            row = con.execute("SELECT max(end_ts) FROM trip_latest").fetchone()
        return row[0] if row and row[0] is not None else None

    def counts(self) -> dict[str, int]:
        """Rows per table (``trip_latest``: trips; ``trip_scores``: records)."""
        with self._connect(read_only=True) as (con, _attempts):
            return {
                table: int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]
                for table in (*_TABLES, "trip_daily")
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


def _daily_relation(
    params: QueryParams, where: str, filtered: list[object]
) -> tuple[str, list[object]]:
    """The ``daily`` relation over ``start < end_ts <= end``: the rollup's rows of the
    whole UTC days inside the period, and the rows of the trips of the partial days at its
    edges, summed the same way (``_daily_rows``); with its ``?`` values."""
    start_us = (params.start - _EPOCH) // timedelta(microseconds=1)
    end_us = (params.end - _EPOCH) // timedelta(microseconds=1)
    # Whole days: their midnight after ``start``, their next midnight at or before ``end``.
    first, last = start_us // _DAY_US + 1, end_us // _DAY_US
    trips = "trip_latest WHERE end_ts {} ? AND end_ts {} ? AND score IS NOT NULL" + where
    if first >= last:
        relation = f"daily AS ({_daily_rows(trips.format('>', '<='))})"
        return relation, [params.start, params.end, *filtered]
    first_ts, last_ts = _EPOCH + timedelta(days=first), _EPOCH + timedelta(days=last)
    # Each edge is a plain range of its own, so the row groups' min/max skip the rest.
    relation = (
        f"daily AS (SELECT {', '.join(DAILY_COLUMNS)} FROM trip_daily "
        f"WHERE utc_day >= ? AND utc_day < ?{where} "
        f"UNION ALL {_daily_rows(trips.format('>', '<'))} "
        f"UNION ALL {_daily_rows(trips.format('>=', '<='))})"
    )
    values: list[object] = [first, last, *filtered, params.start, first_ts, *filtered]
    return relation, [*values, last_ts, params.end, *filtered]


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
