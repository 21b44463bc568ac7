"""The embedded score store (DuckDB): idempotent batches, latest record per trip, locks,
the query set against ``aggregate_scores``, routes and rejects."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest

from driverscore.adapters.score_store.duckdb_store import (
    SCHEMA_VERSION,
    DuckDBScoreStore,
    StoreBusyError,
    StoreMissingError,
)
from driverscore.adapters.score_store.queries import QUERIES, QueryParams
from driverscore.adapters.score_store.records import ALERT_SCHEMA, ScoreBatch, decode_lines
from driverscore.domain.config import FeatureConfig
from driverscore.domain.features import EVENT_COLUMNS, ping_events
from driverscore.domain.routes import ROUTE_SCHEMA, trip_routes
from driverscore.domain.scoring import aggregate_scores
from driverscore.domain.trip_scoring import TRIP_RECORD_SCHEMA
from driverscore.simulation.score_records import random_score_records

T0 = datetime(2026, 3, 1, tzinfo=UTC)
SCORED = T0 + timedelta(days=10)
PERIOD = QueryParams(start=T0 - timedelta(days=1), end=T0 + timedelta(days=5))


def records(n: int = 120, seed: int = 1, version: str = "1") -> pl.DataFrame:
    """Trip score records of a small fleet over three days; some trips without distance,
    one fleet (``f9``) of zero-distance trips only."""
    return random_score_records(
        n, start=T0, days=3, seed=seed, model_version=version, scored_at=SCORED
    )


def alerts_of(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("score") < 60).with_columns(
        pl.format("risk {}", pl.col("risk_probability").round(3)).alias("alert")
    )


@pytest.fixture
def store(tmp_path: Path) -> DuckDBScoreStore:
    return DuckDBScoreStore(tmp_path / "scores.duckdb", lock_timeout_s=20)


def test_a_replayed_batch_changes_no_count_and_no_answer(store: DuckDBScoreStore) -> None:
    frame = records()
    first = store.write(ScoreBatch("test", scores=frame, alerts=alerts_of(frame)))
    assert (first.scores, first.alerts) == (frame.height, alerts_of(frame).height)
    before = {name: store.query(name, PERIOD) for name in ("group_scores", "band_shares")}
    counts = store.counts()
    again = store.write(ScoreBatch("test", scores=frame, alerts=alerts_of(frame)))
    assert (again.scores, again.alerts) == (0, 0)
    # In one batch twice, and half of it again: still every trip once.
    store.write(ScoreBatch("test", scores=pl.concat([frame, frame, frame.head(50)])))
    assert store.counts() == counts
    assert counts["trip_latest"] == counts["trip_scores"] == frame.height
    for name, answer in before.items():
        assert store.query(name, PERIOD).equals(answer)


def test_a_newer_record_of_a_trip_replaces_it_and_an_older_one_does_not(
    store: DuckDBScoreStore,
) -> None:
    frame = records(10)
    store.write(ScoreBatch("test", scores=frame))
    newer = frame.head(1).with_columns(
        pl.lit(5.0).alias("score"), pl.lit(SCORED + timedelta(hours=1)).alias("scored_at")
    )
    older = frame.slice(1, 1).with_columns(
        pl.lit(5.0).alias("score"), pl.lit(SCORED - timedelta(hours=1)).alias("scored_at")
    )
    report = store.write(ScoreBatch("test", scores=pl.concat([newer, older])))
    assert report.scores == 1
    stored = store.sql("SELECT trip_id, score FROM trip_scores ORDER BY trip_id")
    assert dict(stored.iter_rows()) == {
        **dict(frame.select("trip_id", "score").iter_rows()),
        "t0": 5.0,
    }


def test_queries_count_each_trip_by_its_latest_record_across_model_versions(
    store: DuckDBScoreStore,
) -> None:
    v1 = records(40)
    # Version 2 rescored half of the trips later; version 1's records of them stay stored.
    v2 = v1.head(20).with_columns(
        pl.lit("2").alias("model_version"),
        pl.lit("challenger").alias("model_role"),
        (pl.col("score") * 0.5).alias("score"),
        pl.lit(SCORED + timedelta(days=1)).alias("scored_at"),
    )
    store.write(ScoreBatch("test", scores=v2))
    store.write(ScoreBatch("test", scores=v1))  # older, written after: changes no answer
    counts = store.counts()
    assert (counts["trip_scores"], counts["trip_latest"]) == (60, 40)
    versions = store.query("model_versions", PERIOD)
    assert versions.select("model_version", "trip_count").rows() == [("1", 20), ("2", 20)]
    expected = pl.concat([v2, v1.slice(20)])
    assert versions["mean_score"].to_list() == pytest.approx(
        [v1.slice(20)["score"].mean(), v2["score"].mean()]
    )
    grouped = store.query("group_scores", PERIOD.__class__(**{**vars(PERIOD), "level": "driver"}))
    truth = aggregate_scores(expected, by="driver", as_of=PERIOD.end, window_days=6)
    assert grouped["score"].to_list() == pytest.approx(truth["score"].to_list(), rel=1e-12)


@pytest.mark.parametrize("level", ["driver", "vehicle", "fleet", "client"])
def test_distance_weighted_group_scores_equal_aggregate_scores(
    store: DuckDBScoreStore, level: str
) -> None:
    frame = records(300, seed=3)
    store.write(ScoreBatch("test", scores=frame))
    as_of = T0 + timedelta(days=2)
    params = QueryParams(start=as_of - timedelta(days=1.5), end=as_of, level=level)  # type: ignore[arg-type]
    answer = store.query("group_scores", params)
    truth = aggregate_scores(frame, by=level, as_of=as_of, window_days=1.5)
    assert answer["group_id"].to_list() == truth[f"{level}_id"].to_list()
    assert answer["trip_count"].to_list() == truth["trip_count"].to_list()
    assert answer["score"].to_list() == pytest.approx(truth["score"].to_list(), rel=1e-12)
    assert answer["distance_km"].to_list() == pytest.approx(truth["distance_km"].to_list())
    assert answer["risk_band"].to_list() == truth["risk_band"].to_list()
    if level == "fleet":
        # The zero-distance fleet: its plain mean, as aggregate_scores gives it.
        assert "f9" in answer["group_id"].to_list()
    worst = store.query("worst_drivers", params)
    by_driver = aggregate_scores(frame, by="driver", as_of=as_of, window_days=1.5)
    assert (
        worst["driver_id"].to_list()
        == by_driver.sort("score", "driver_id").head(20)["driver_id"].to_list()
    )


def test_the_query_set_answers_on_the_same_records(store: DuckDBScoreStore) -> None:
    frame = records(200, seed=5)
    store.write(ScoreBatch("test", scores=frame, alerts=alerts_of(frame)))
    answers = {name: store.query(name, PERIOD) for name, q in QUERIES.items() if not q.params}
    shares = answers["band_shares"]
    assert shares["trip_count"].sum() == frame.height
    assert shares["share"].sum() == pytest.approx(1.0)
    assert dict(shares.select("risk_band", "trip_count").iter_rows()) == dict(
        frame["risk_band"].value_counts().iter_rows()
    )
    trend = answers["daily_trend"]
    assert trend["trip_count"].sum() == frame.height
    assert trend["high_risk_trips"].sum() == (frame["risk_band"] == "high").sum()
    assert trend["day"].dt.hour().to_list() == [0] * trend.height
    histogram = answers["score_histogram"]
    assert histogram["trip_count"].sum() == frame.height
    assert set(histogram["bucket"].to_list()) <= set(range(0, 100, 10))
    alerts = answers["latest_alerts"]
    assert alerts.height == min(20, alerts_of(frame).height)
    assert alerts["end_ts"].is_sorted(descending=True)
    assert all(a.startswith("risk ") for a in alerts["alert"].to_list())
    history = store.query(
        "trip_history",
        QueryParams(start=PERIOD.start, end=PERIOD.end, entity="vehicle", entity_id="v3"),
    )
    mine = frame.filter(pl.col("vehicle_id") == "v3").sort("end_ts", descending=True).head(20)
    assert history["trip_id"].to_list() == mine["trip_id"].to_list()
    assert history["reasons"].to_list() == mine["reasons"].to_list()


def test_shadow_records_and_records_without_a_key_are_kept_as_rejects(
    store: DuckDBScoreStore,
) -> None:
    frame = records(5)
    shadow = frame.head(1).with_columns(pl.lit("shadow").alias("model_role"))
    keyless = frame.slice(1, 1).with_columns(pl.lit(None, dtype=pl.String).alias("trip_id"))
    report = store.write(ScoreBatch("test", scores=pl.concat([shadow, keyless, frame.tail(3)])))
    assert (report.scores, report.rejects) == (3, 2)
    rejects = store.sql("SELECT source, reason FROM store_rejects ORDER BY reason")
    assert rejects.rows() == [("test", "missing_trip_id"), ("test", "shadow_record")]


def test_score_records_round_trip_through_json_and_bad_messages_become_rejects() -> None:
    frame = records(4)
    lines = [
        (f"scores/0/{i}", line.encode()) for i, line in enumerate(frame.write_ndjson().splitlines())
    ]
    bad = [("scores/0/7", b"not json"), ("scores/0/8", b"[1]"), ("scores/0/9", b'{"end_ts": "x"}')]
    decoded, rejects = decode_lines([bad[0], *lines, *bad[1:]], TRIP_RECORD_SCHEMA)
    assert decoded.equals(frame)
    assert rejects.select("source", "reason").rows() == [
        ("scores/0/7", "not_json"),
        ("scores/0/8", "not_an_object"),
        ("scores/0/9", "bad_end_ts"),
    ]
    alert = alerts_of(records(30)).head(2)
    back, none = decode_lines(
        [("a", line.encode()) for line in alert.write_ndjson().splitlines()], ALERT_SCHEMA
    )
    assert back.equals(alert) and none.height == 0


def test_routes_are_stored_with_the_trip_and_read_back_in_time_order(
    store: DuckDBScoreStore,
) -> None:
    n = 400
    pings = pl.DataFrame(
        {
            "vehicle_id": ["v1"] * n,
            "trip_id": ["t1"] * n,
            "ts": [T0 + timedelta(seconds=i) for i in range(n)],
            "lat": [52.0 + i * 1e-4 for i in range(n)],
            "lon": [13.0] * n,
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    routes = trip_routes(ping_events(pings, FeatureConfig()))
    assert routes.schema == pl.Schema(ROUTE_SCHEMA)
    (count,) = routes["point_count"].to_list()
    # 11 m a second, a point every 25 m at least: about one fix in 2.3, first and last kept.
    assert 150 < count < 200
    store.write(ScoreBatch("test", routes=routes))
    store.write(ScoreBatch("test", routes=routes))  # replaced, not doubled
    route = store.route("v1", "t1")
    assert route.height == count
    assert route["ts"].is_sorted()
    assert (route["lat"][0], route["lat"][-1]) == (52.0, pytest.approx(52.0 + (n - 1) * 1e-4))


def test_long_trips_are_thinned_to_the_point_cap() -> None:
    n = 20_000
    pings = pl.DataFrame(
        {
            "vehicle_id": ["v"] * n,
            "trip_id": ["long"] * n,
            "ts": [T0 + timedelta(seconds=i) for i in range(n)],
            "lat": [50.0 + i * 3e-4 for i in range(n)],
            "lon": [8.0] * n,
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    parked = pings.head(50).with_columns(
        pl.lit("parked").alias("trip_id"), pl.lit(50.0).alias("lat")
    )
    routes = trip_routes(ping_events(pl.concat([pings, parked]), FeatureConfig())).sort("trip_id")
    long, still = routes["point_count"].to_list()
    assert (490 <= long <= 500, still) == (True, 2)


def _flagged_route() -> pl.DataFrame:
    """One trip's route whose 3rd point is a hard brake and 4th speeding."""
    points = [
        {
            "ts": T0 + timedelta(seconds=i),
            "lat": 52.0 + i * 1e-3,
            "lon": 13.0,
            **{name: False for name in EVENT_COLUMNS},
            "hard_brake": i == 2,
            "speeding": i == 3,
        }
        for i in range(5)
    ]
    return pl.DataFrame(
        {"vehicle_id": ["v1"], "trip_id": ["new"], "point_count": [5], "route": [points]},
        schema=ROUTE_SCHEMA,
    )


def test_a_version_1_store_stays_readable_and_its_first_write_upgrades_it(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    # The store as version 1 wrote it: route points of time and position only.
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE trip_routes (vehicle_id VARCHAR, trip_id VARCHAR, point_count BIGINT, "
        "route STRUCT(ts TIMESTAMPTZ, lat DOUBLE, lon DOUBLE)[], source VARCHAR, "
        "stored_at TIMESTAMPTZ)"
    )
    con.execute(
        "INSERT INTO trip_routes VALUES ('v1', 'old', 2, "
        "[{'ts': TIMESTAMPTZ '2026-03-01 00:00:00+00', 'lat': 52.0, 'lon': 13.0}, "
        "{'ts': TIMESTAMPTZ '2026-03-01 00:01:00+00', 'lat': 52.1, 'lon': 13.0}], 'score', now())"
    )
    con.execute("CREATE TABLE store_meta (schema_version INTEGER)")
    con.execute("INSERT INTO store_meta VALUES (1)")
    con.close()
    store = DuckDBScoreStore(path, lock_timeout_s=20)

    old = store.route("v1", "old")
    assert old["lat"].to_list() == [52.0, 52.1]
    assert old.select(EVENT_COLUMNS).rows() == [(False,) * 4] * 2  # no flags: no event

    store.write(ScoreBatch("test", routes=_flagged_route()))
    assert store.sql("SELECT schema_version FROM store_meta").item() == SCHEMA_VERSION
    assert store.route("v1", "old").equals(old)
    new = store.route("v1", "new")
    assert new["hard_brake"].to_list() == [False, False, True, False, False]
    assert new["speeding"].to_list() == [False, False, False, True, False]
    store.write(ScoreBatch("test", routes=_flagged_route()))  # an upgraded file stays as is
    assert store.route("v1", "new").equals(new)


def test_route_messages_without_flags_read_as_no_event_and_bad_flags_are_rejects(
    store: DuckDBScoreStore,
) -> None:
    (line,) = _flagged_route().write_ndjson().splitlines()
    message = json.loads(line)
    assert message["route"][2]["hard_brake"] is True
    old = json.loads(line)
    for point in old["route"]:
        for name in ("hard_brake", "harsh_accel"):
            del point[name]
        point["speeding"] = None
    bad_text, bad_number = json.loads(line), json.loads(line)
    bad_text["route"][1]["harsh_corner"] = "yes"
    bad_number["route"][1]["hard_brake"] = 1
    decoded, rejects = decode_lines(
        [
            ("routes/0/1", line.encode()),
            ("routes/0/2", json.dumps(old).encode()),
            ("routes/0/3", json.dumps(bad_text).encode()),
            ("routes/0/4", json.dumps(bad_number).encode()),
        ],
        ROUTE_SCHEMA,
    )
    assert decoded.height == 2 and decoded.head(1).equals(_flagged_route())
    assert _no_events(decoded["route"][1])
    assert rejects.select("source", "reason").rows() == [
        ("routes/0/3", "bad_route"),
        ("routes/0/4", "bad_route"),
    ]
    store.write(ScoreBatch("sink", routes=decoded.tail(1), rejects=rejects))
    assert _no_events(store.route("v1", "new").to_dicts())
    kept = store.sql("SELECT reason, value FROM store_rejects ORDER BY value")
    assert kept["reason"].to_list() == ["bad_route", "bad_route"]
    assert json.loads(kept["value"][0])["route"][1]["hard_brake"] == 1


def _no_events(points: Iterable[dict[str, object]] | pl.Series) -> bool:
    return all(point[name] is False for point in points for name in EVENT_COLUMNS)


HOLD = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "ro")
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
    con.close()
    """
)


@contextmanager
def holding(path: Path, seconds: float, *, read_only: bool = False) -> Iterator[None]:
    """Another process holding the file, as a dashboard or a second writer would."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), "ro" if read_only else "rw", str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        try:
            yield
        finally:
            process.kill()


@pytest.mark.parametrize("read_only", [False, True])
def test_a_writer_waits_for_another_process_lock_and_loses_no_batch(
    store: DuckDBScoreStore, read_only: bool
) -> None:
    store.write(ScoreBatch("test", scores=records(5)))
    with holding(store.path, 2.0, read_only=read_only):
        started = time.monotonic()
        report = store.write(ScoreBatch("test", scores=records(30, seed=9, version="2")))
        waited = time.monotonic() - started
    assert report.attempts > 1 and waited > 1.0
    assert store.counts()["trip_scores"] == 35


def test_a_reader_waits_for_the_writer_and_a_lock_held_too_long_is_one_clear_error(
    tmp_path: Path,
) -> None:
    store = DuckDBScoreStore(tmp_path / "scores.duckdb", lock_timeout_s=0.5)
    with pytest.raises(StoreMissingError, match=r"no score store at .*driverscore demo"):
        store.query("band_shares", PERIOD)
    store.write(ScoreBatch("test", scores=records(5)))
    with holding(store.path, 30.0):
        with pytest.raises(StoreBusyError, match=r"stayed locked by another process for 0\.5 s"):
            store.write(ScoreBatch("test", scores=records(5, version="2")))
        with pytest.raises(StoreBusyError):
            store.query("band_shares", PERIOD)
    assert store.counts()["trip_scores"] == 5
    # Once the other process is gone, a reader that found it busy gets its answer.
    assert store.query("band_shares", PERIOD)["trip_count"].sum() == 5
