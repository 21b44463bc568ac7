"""The DuckDB store's per-day rollup (``trip_daily``): kept by each write, read by the fleet
overview's aggregates, equal to the answers over the trips; older files upgraded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest

from driverscore.adapters.score_store.duckdb_store import SCHEMA_VERSION, DuckDBScoreStore
from driverscore.adapters.score_store.queries import (
    BEHAVIOURS,
    DAILY_COLUMNS,
    DAILY_OF_TRIP,
    QUERIES,
    QueryParams,
    filters,
    finish,
    reads_daily,
    render,
)
from driverscore.adapters.score_store.records import ScoreBatch
from driverscore.domain.scoring import band_for_score
from driverscore.simulation.score_records import random_score_records

T0 = datetime(2026, 3, 1, tzinfo=UTC)
SCORED = T0 + timedelta(days=10)
ROLLUP_QUERIES = [name for name, q in QUERIES.items() if q.daily is not None]


def trips_answer(store: DuckDBScoreStore, name: str, params: QueryParams) -> pl.DataFrame:
    """``name`` answered from ``trip_latest`` row by row (the query's ``trips`` form)."""
    query = QUERIES[name]
    body, values = render(query, "duckdb", params)
    where, filtered = filters(params)
    sql = (
        "WITH trips AS (SELECT * FROM trip_latest "
        f"WHERE end_ts > ? AND end_ts <= ? AND score IS NOT NULL{where}) {body}"
    )
    return finish(query, store.sql(sql, [params.start, params.end, *filtered, *values]))


def assert_same(answer: pl.DataFrame, truth: pl.DataFrame, name: str) -> None:
    """Equal frames, floats to 1e-12 (the same sums added in another order)."""
    assert answer.schema == truth.schema, name
    assert answer.height == truth.height, name
    for column, dtype in truth.schema.items():
        if dtype == pl.Float64:
            assert answer[column].to_list() == pytest.approx(truth[column].to_list(), rel=1e-12), (
                name,
                column,
            )
        else:
            assert answer[column].to_list() == truth[column].to_list(), (name, column)


def rescored(frame: pl.DataFrame, *, hours: float, version: str) -> pl.DataFrame:
    """The same trips scored again later: other scores and bands, and ends moved by
    ``hours`` (a trip cut again), so they change day, band and bucket."""
    score = (100.0 - frame["score"]).to_list()
    return frame.with_columns(
        pl.Series("score", score),
        pl.Series("risk_band", [band_for_score(s) for s in score], dtype=pl.String),
        pl.col("end_ts") + timedelta(hours=hours),
        pl.lit(version).alias("model_version"),
        pl.col("scored_at") + timedelta(hours=1 + hours),
    )


@pytest.fixture
def written(tmp_path: Path) -> tuple[DuckDBScoreStore, pl.DataFrame]:
    """A store written in overlapping batches, with re-scored trips and an older record
    written last, some trips without a fleet or client; and the records that should win."""
    frame = random_score_records(
        900, start=T0, days=6, seed=11, fleets=4, clients=3, scored_at=SCORED
    ).with_columns(
        pl.when(pl.int_range(pl.len()) % 31 == 0)
        .then(None)
        .otherwise(pl.col("fleet_id"))
        .alias("fleet_id"),
        pl.when(pl.int_range(pl.len()) % 37 == 0)
        .then(None)
        .otherwise(pl.col("client_id"))
        .alias("client_id"),
        (pl.int_range(pl.len()) % 4).alias("hard_brake_count"),
    )
    store = DuckDBScoreStore(tmp_path / "scores.duckdb")
    store.write(ScoreBatch("test", scores=frame.head(600)))
    store.write(ScoreBatch("test", scores=frame.slice(400)))  # 200 trips again
    later = rescored(frame.slice(100, 150), hours=30, version="2")
    store.write(ScoreBatch("test", scores=later))
    earlier = rescored(frame.slice(300, 50), hours=-20, version="0").with_columns(
        pl.col("scored_at") - timedelta(days=2)
    )
    store.write(ScoreBatch("test", scores=earlier))  # older than what is stored: no change
    newest = pl.concat([frame.head(100), later, frame.slice(250)])
    return store, newest


PERIODS = [
    # (start, end, whole UTC days inside): every trip; whole days only; edges inside days;
    # less than a day; from a midnight (its trips ending at that instant are not in it).
    (T0 - timedelta(days=1), T0 + timedelta(days=9), True),
    (T0 + timedelta(days=1), T0 + timedelta(days=4), True),
    (T0 + timedelta(days=1, hours=7, microseconds=3), T0 + timedelta(days=5, hours=2), True),
    (T0 + timedelta(days=2, hours=3), T0 + timedelta(days=2, hours=21), False),
    (T0 + timedelta(days=3), T0 + timedelta(days=3, hours=30), False),
    (T0 + timedelta(days=3), T0 + timedelta(days=5), True),
]
FILTERS = [(None, None), ("f1", None), (None, "c2"), ("f2", "c0")]


@pytest.mark.parametrize(("start", "end", "whole_days"), PERIODS)
@pytest.mark.parametrize(("fleet", "client"), FILTERS)
def test_rollup_answers_equal_the_answers_over_the_trips(
    written: tuple[DuckDBScoreStore, pl.DataFrame],
    start: datetime,
    end: datetime,
    whole_days: bool,
    fleet: str | None,
    client: str | None,
) -> None:
    store, _newest = written
    for name in ROLLUP_QUERIES:
        for level in ("fleet", "client"):
            params = QueryParams(
                start=start, end=end, level=level, fleet_id=fleet, client_id=client
            )
            assert reads_daily(QUERIES[name], params)
            sql, _values = store.render(QUERIES[name], params)
            assert ("trip_daily" in sql) == whole_days
            assert_same(store.query(name, params), trips_answer(store, name, params), name)


def test_the_rollup_holds_the_latest_records_of_each_day(
    written: tuple[DuckDBScoreStore, pl.DataFrame],
) -> None:
    store, newest = written
    group = ["utc_day", "fleet_id", "client_id", "risk_band", "bucket"]
    kept = store.sql(f"SELECT * FROM trip_daily ORDER BY {', '.join(group)}")
    assert kept.columns == list(DAILY_COLUMNS)
    # The same rows computed in polars from the records that should have won.
    truth = (
        newest.with_columns(
            (pl.col("end_ts").dt.epoch("us") // 86_400_000_000).alias("utc_day"),
            (pl.min_horizontal((pl.col("score") / 10).floor(), 9.0) * 10).alias("bucket"),
            pl.col("distance_km").fill_null(0.0).clip(0.0).alias("weight_km"),
        )
        .group_by(group)
        .agg(
            pl.len().alias("trip_count"),
            pl.col("distance_km").fill_null(0.0).sum(),
            pl.col("weight_km").sum(),
            (pl.col("score") * pl.col("weight_km")).sum().alias("weighted_score"),
            pl.col("score").sum().alias("score_sum"),
        )
        .sort(group, nulls_last=True)
    )
    assert kept.select(group).rows() == truth.select(group).rows()
    assert kept["trip_count"].to_list() == truth["trip_count"].to_list()
    assert kept["trip_count"].sum() == newest.height
    for column in ("distance_km", "weight_km", "weighted_score", "score_sum"):
        assert kept[column].to_list() == pytest.approx(truth[column].to_list(), rel=1e-12)
    # The trips re-scored a day later left their old day's groups: a rebuild is the same.
    rebuilt = store.sql(
        f"SELECT utc_day, fleet_id, client_id, count(*) AS trip_count FROM (SELECT "
        f"{DAILY_OF_TRIP['utc_day']} AS utc_day, fleet_id, client_id FROM trip_latest) "
        "GROUP BY ALL ORDER BY ALL"
    )
    assert rebuilt.rows() == (
        kept.group_by("utc_day", "fleet_id", "client_id")
        .agg(pl.col("trip_count").sum())
        .sort("utc_day", "fleet_id", "client_id", nulls_last=True)
        .rows()
    )


def test_a_replayed_batch_recomputes_no_rollup_row(
    written: tuple[DuckDBScoreStore, pl.DataFrame],
) -> None:
    store, newest = written
    before = store.sql("SELECT rowid, * FROM trip_daily ORDER BY rowid")
    report = store.write(ScoreBatch("test", scores=newest))
    assert report.scores == 0
    assert store.sql("SELECT rowid, * FROM trip_daily ORDER BY rowid").equals(before)


def test_other_levels_and_other_queries_read_the_trips(tmp_path: Path) -> None:
    params = QueryParams(start=T0, end=T0 + timedelta(days=2), level="driver")
    assert not reads_daily(QUERIES["group_scores"], params)
    assert not reads_daily(QUERIES["worst_drivers"], params)
    sql, _values = DuckDBScoreStore(tmp_path / "x.duckdb").render(QUERIES["group_scores"], params)
    assert "trip_daily" not in sql and "trip_scores" not in sql
    behaviours, _values = DuckDBScoreStore(tmp_path / "x.duckdb").render(
        QUERIES["trip_behaviours"],
        QueryParams(start=T0, end=T0 + timedelta(days=2), entity_id="d1"),
    )
    assert "trip_scores" not in behaviours  # the behaviours are in trip_latest


def downgrade_to_layout_1(path: Path) -> None:
    """Make ``path`` a file of the first layout: no behaviours in ``trip_latest``, no
    ``trip_daily``, schema version 1."""
    con = duckdb.connect(str(path))
    try:
        for column in BEHAVIOURS:
            con.execute(f"ALTER TABLE trip_latest DROP COLUMN {column}")
        con.execute("DROP TABLE trip_daily")
        con.execute("UPDATE store_meta SET schema_version = 1")
    finally:
        con.close()


@pytest.mark.parametrize("first", ["read", "write"])
def test_an_older_store_file_is_upgraded_by_its_first_read_or_write(
    tmp_path: Path, first: str
) -> None:
    frame = random_score_records(300, start=T0, days=4, seed=5, scored_at=SCORED).with_columns(
        (pl.int_range(pl.len()) % 6).alias("hard_brake_count")
    )
    path = tmp_path / "scores.duckdb"
    DuckDBScoreStore(path).write(ScoreBatch("test", scores=frame))
    params = QueryParams(start=T0 + timedelta(hours=5), end=T0 + timedelta(days=3, hours=2))
    expected = {name: DuckDBScoreStore(path).query(name, params) for name in ROLLUP_QUERIES}
    downgrade_to_layout_1(path)
    store = DuckDBScoreStore(path)
    if first == "write":
        store.write(ScoreBatch("test", scores=frame.head(10)))  # a replay: changes nothing
    for name, answer in expected.items():
        assert_same(store.query(name, params), answer, name)
    assert store.sql("SELECT schema_version FROM store_meta").rows() == [(SCHEMA_VERSION,)]
    behaviours = store.query(
        "trip_behaviours",
        QueryParams(
            start=T0, end=T0 + timedelta(days=5), entity="vehicle", entity_id="v1", limit=500
        ),
    )
    mine = frame.filter(pl.col("vehicle_id") == "v1").sort("trip_id")
    assert behaviours.sort("trip_id")["hard_brake_count"].to_list() == (
        mine["hard_brake_count"].to_list()
    )
