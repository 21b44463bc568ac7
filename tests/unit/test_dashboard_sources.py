"""The dashboard's reads: the fleet / client filters and trip behaviours of the query set,
the page filters, and the session cookie."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from driverscore.adapters.score_store import ScoreBatch
from driverscore.adapters.score_store.duckdb_store import DuckDBScoreStore
from driverscore.adapters.score_store.queries import BEHAVIOURS, QueryParams
from driverscore.domain.scoring import aggregate_scores
from driverscore.services.dashboard import DashboardSources, PeriodError
from driverscore.services.dashboard.app import Sessions
from driverscore.services.dashboard.sources import entity_page, parse_period
from driverscore.simulation.score_records import random_score_records

T0 = datetime(2026, 3, 1, tzinfo=UTC)
PERIOD = QueryParams(start=T0 - timedelta(days=1), end=T0 + timedelta(days=5))


@pytest.fixture
def stored(tmp_path: Path) -> tuple[DuckDBScoreStore, pl.DataFrame]:
    frame = random_score_records(300, start=T0, seed=3).with_columns(
        (pl.int_range(pl.len()) % 5).alias("hard_brake_count"),
        (pl.int_range(pl.len()) % 3).alias("harsh_corner_count"),
        pl.lit(0.25).alias("speeding_share"),
    )
    store = DuckDBScoreStore(tmp_path / "scores.duckdb")
    store.write(ScoreBatch("test", scores=frame))
    return store, frame


def test_fleet_and_client_filters_give_the_aggregate_of_those_trips(
    stored: tuple[DuckDBScoreStore, pl.DataFrame],
) -> None:
    store, frame = stored
    params = QueryParams(start=PERIOD.start, end=PERIOD.end, fleet_id="f1", client_id="c0")
    mine = frame.filter((pl.col("fleet_id") == "f1") & (pl.col("client_id") == "c0"))
    assert 0 < mine.height < frame.height
    answer = store.query("group_scores", QueryParams(**{**params.__dict__, "level": "driver"}))
    expected = aggregate_scores(mine, by="driver", as_of=PERIOD.end, window_days=6).sort(
        "driver_id"
    )
    assert answer["group_id"].to_list() == expected["driver_id"].to_list()
    assert answer["score"].to_list() == pytest.approx(expected["score"].to_list())
    assert store.query("band_shares", params)["trip_count"].sum() == mine.height
    assert (
        store.query("daily_trend", QueryParams(**{**params.__dict__, "fleet_id": "nope"})).height
        == 0
    )


def test_trip_behaviours_are_the_latest_records_feature_values(
    stored: tuple[DuckDBScoreStore, pl.DataFrame],
) -> None:
    store, frame = stored
    # Trip t0 rescored later by version 2 with other behaviours: those are shown.
    again = frame.filter(pl.col("trip_id") == "t0").with_columns(
        pl.lit("2").alias("model_version"),
        pl.lit(9).alias("hard_brake_count"),
        pl.col("scored_at") + timedelta(hours=1),
    )
    store.write(ScoreBatch("test", scores=again))
    params = QueryParams(
        start=PERIOD.start, end=PERIOD.end, entity="vehicle", entity_id="v0", limit=500
    )
    answer = store.query("trip_behaviours", params)
    mine = frame.filter(pl.col("vehicle_id") == "v0")
    assert answer.columns == ["trip_id", "vehicle_id", "end_ts", *BEHAVIOURS]
    assert answer.height == mine.height
    assert answer["end_ts"].is_sorted(descending=True)
    by_trip = dict(answer.select("trip_id", "hard_brake_count").iter_rows())
    assert by_trip["t0"] == 9
    assert by_trip["t7"] == mine.filter(pl.col("trip_id") == "t7")["hard_brake_count"][0]


def test_an_entity_page_joins_history_and_behaviours_and_is_none_when_unknown(
    stored: tuple[DuckDBScoreStore, pl.DataFrame],
) -> None:
    store, _frame = stored
    sources = DashboardSources(reader=store, engine="duckdb", now=lambda: T0)
    page = entity_page(sources, "driver", "d2", None)
    assert page is not None
    assert page.trips["hard_brake_count"].null_count() == 0
    assert page.trip_id == page.trips["trip_id"][0] and page.route is None
    assert entity_page(sources, "driver", "d' OR 1=1 --", None) is None


NEWEST = datetime(2026, 3, 4, 12, tzinfo=UTC)


def test_the_period_defaults_to_30_days_up_to_the_newest_trip() -> None:
    period = parse_period({}, NEWEST, NEWEST + timedelta(days=300))
    assert (period.start, period.end, period.fleet) == (NEWEST - timedelta(days=30), NEWEST, None)
    chosen = parse_period({"days": "7", "end": "2026-03-02", "fleet": " f1 "}, NEWEST, NEWEST)
    assert chosen.end == datetime(2026, 3, 2, tzinfo=UTC) and chosen.days == 7
    assert chosen.fleet == "f1"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"days": "0"}, "use a number of days above 0"),
        ({"days": "inf"}, "use a number of days above 0"),
        ({"days": "1e9"}, "use a number of days above 0"),
        ({"start": "2026-13-01"}, "is not a date"),
        ({"start": "2026-03-05", "end": "2026-03-04"}, "is not before end"),
        ({"client": "c" * 513}, "client is 513 characters long"),
        ({"level": "fleet"}, "unknown filter 'level'"),
    ],
)
def test_a_bad_filter_says_which_in_one_line(query: dict[str, str], message: str) -> None:
    with pytest.raises(PeriodError, match=message) as raised:
        parse_period(query, NEWEST, NEWEST)
    assert "\n" not in str(raised.value)


def test_a_session_is_valid_under_the_same_tokens_and_until_it_expires() -> None:
    sessions = Sessions([b"t", b"u"], required=True, lifetime_s=60)
    cookie = sessions.issue(1000.0)
    assert sessions.valid(cookie, 1030.0)
    assert not sessions.valid(cookie, 1061.0)
    expires, _, signature = cookie.partition(".")
    assert not sessions.valid(f"{int(expires) + 3600}.{signature}", 1030.0)
    # Another replica (or a restart) with the same tokens accepts it; a changed set does not.
    assert Sessions([b"u", b"t"], required=True).valid(cookie, 1030.0)
    assert not Sessions([b"t"], required=True).valid(cookie, 1030.0)
    assert not Sessions([b"t", b"u", b"v"], required=True).valid(cookie, 1030.0)
    assert not sessions.valid(None, 1030.0) and not sessions.valid("garbage", 1030.0)
    assert Sessions([], required=False).valid(None, 1030.0)


def test_query_many_answers_as_each_query_alone(
    stored: tuple[DuckDBScoreStore, pl.DataFrame],
) -> None:
    store, _frame = stored
    asks = [
        ("group_scores", QueryParams(start=PERIOD.start, end=PERIOD.end, level="client")),
        ("band_shares", QueryParams(start=PERIOD.start, end=PERIOD.end, fleet_id="f2")),
        (
            "trip_history",
            QueryParams(start=PERIOD.start, end=PERIOD.end, entity="driver", entity_id="d1"),
        ),
    ]
    together = store.query_many(asks)
    assert len(together) == len(asks)
    for (name, params), answer in zip(asks, together, strict=True):
        assert answer.equals(store.query(name, params)), name
