"""Routes and their event points: the flags are the trip features' own events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.features import (
    EVENT_COLUMNS,
    ping_events,
    trip_features,
    trip_features_and_events,
)
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.routes import ROUTE_SCHEMA, RouteConfig, trip_routes
from driverscore.domain.schema import PING_SCHEMA
from driverscore.simulation.config import SimulationConfig
from driverscore.simulation.scenarios import hard_stop
from driverscore.simulation.simulator import simulate

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
NOW = datetime(2030, 1, 1, tzinfo=UTC)
COUNTS = {
    "hard_brake": "hard_brake_count",
    "harsh_accel": "harsh_accel_count",
    "harsh_corner": "harsh_corner_count",
}


def _points(routes: pl.DataFrame) -> pl.DataFrame:
    return routes.explode("route").unnest("route")


def _route_events(routes: pl.DataFrame) -> pl.DataFrame:
    """Per trip: flagged points of each event, and the route's points."""
    return (
        _points(routes)
        .group_by("vehicle_id", "trip_id")
        .agg(*(pl.col(c).sum().cast(pl.Int64) for c in EVENT_COLUMNS), pl.len().alias("points"))
    )


@pytest.fixture(scope="module")
def fleet() -> pl.DataFrame:
    """A simulated fleet, half of it with an accelerometer, as batch prepares it."""
    sim = simulate(SimulationConfig(vehicles=8, days=2, seed=21, imu_share=0.5))
    return prepare_trips(
        sim.pings, CleaningConfig(), TripConfig(), FeatureConfig(), NOW, events=True
    ).pings


@pytest.mark.parametrize("cornering", ["heading_step", "windowed_turn"])
def test_a_routes_event_points_are_the_trip_features_counts(
    fleet: pl.DataFrame, cornering: str
) -> None:
    config = FeatureConfig(cornering=cornering)  # type: ignore[arg-type]
    pings = fleet.drop(EVENT_COLUMNS)
    features = trip_features(pings, config)
    routes = trip_routes(ping_events(pings, config))
    joined = features.join(_route_events(routes), on=["vehicle_id", "trip_id"], how="full")
    assert joined.height == features.height == routes.height > 20
    for flag, count in COUNTS.items():
        assert joined[flag].to_list() == joined[count].to_list(), flag
    # Independent of the sums: events do happen in this fleet, on IMU and GPS trips.
    assert joined["hard_brake"].sum() > 0 and joined["harsh_corner"].sum() > 0
    assert set(features.filter(pl.col("hard_brake_count") > 0)["event_source"]) == {"imu", "gps"}
    # Speeding colours a route exactly where the trip has speeding time.
    speeding = joined.select(
        (pl.col("speeding_share").fill_null(0.0) > 0).alias("share"),
        (pl.col("speeding") > 0).alias("flags"),
    )
    assert speeding["share"].to_list() == speeding["flags"].to_list()
    assert speeding["share"].any() and not speeding["share"].all()
    bound = RouteConfig().max_points + RouteConfig().max_event_points
    assert (routes["point_count"] <= bound).all()


def test_flags_do_not_depend_on_the_order_or_company_of_the_pings(fleet: pl.DataFrame) -> None:
    config = FeatureConfig()
    pings = fleet.drop(EVENT_COLUMNS)
    alone = pings.filter(pl.col("vehicle_id") == pings["vehicle_id"][0])
    shuffled = pings.sample(fraction=1.0, shuffle=True, seed=4)
    key = ["vehicle_id", "trip_id", "ts"]
    everyone = ping_events(shuffled, config).select(*key, *EVENT_COLUMNS)
    mine = everyone.join(alone.select(key), on=key, how="semi").sort(key)
    assert mine.equals(ping_events(alone, config).select(*key, *EVENT_COLUMNS).sort(key))
    # Preparation hands out the same flags as the event function.
    prepared = fleet.select(*key, *EVENT_COLUMNS).sort(key)
    assert prepared.equals(everyone.sort(key))


@pytest.mark.parametrize("profile", ["phone", "tracker"])
def test_a_hard_stop_is_one_hard_brake_point_on_its_route(profile: str) -> None:
    pings = hard_stop(50.0, 6.0, profile, seed=3)
    features, flagged = trip_features_and_events(pings, FeatureConfig())
    assert features["hard_brake_count"].to_list() == [1]
    (route,) = trip_routes(flagged)["route"].to_list()
    braked = [p for p in route if p["hard_brake"]]
    assert len(braked) == 1
    # At the braking: after the lead-in of 30 s at constant speed, before the standstill.
    offset = (braked[0]["ts"] - pings["ts"][0]).total_seconds()
    assert 30 <= offset <= 30 + 50 / 3.6 / 6.0 + 1
    assert not any(p["harsh_accel"] or p["harsh_corner"] or p["speeding"] for p in route)
    gentle = trip_routes(ping_events(hard_stop(50.0, 1.5, profile, seed=3), FeatureConfig()))
    assert not any(p["hard_brake"] for p in gentle["route"][0])


def _drive(speeds: list[float], limit: float | None = None) -> pl.DataFrame:
    """A 1 Hz drive north at the given speeds (m/s), one trip; its accelerometer reads
    nothing, so speed steps make no brake or acceleration event."""
    lat = 48.0 + np.cumsum([0.0, *speeds[:-1]]) / 111_195.0
    n = len(speeds)
    return pl.DataFrame(
        {
            "ts": [T0 + timedelta(seconds=i) for i in range(n)],
            "vehicle_id": ["v"] * n,
            "trip_id": ["t"] * n,
            "lat": lat,
            "lon": [11.0] * n,
            "speed_mps": speeds,
            "heading_deg": [0.0] * n,
            "speed_limit_mps": [limit] * n,
            "accel_long_mps2": [0.0] * n,
            "accel_lat_mps2": [0.0] * n,
        },
        schema_overrides={k: v for k, v in PING_SCHEMA.items() if k != "trip_id"},
    )


def test_speeding_flags_the_fixes_whose_time_counts_and_the_route_keeps_each_stretch() -> None:
    # 10 m/s under a 13.9 m/s limit, two stretches at 20 m/s, the last fix at 20 m/s too
    # (its state holds until no next fix: no speeding time).
    speeds = [10.0] * 20 + [20.0] * 5 + [10.0] * 20 + [20.0] * 3 + [10.0] * 20 + [20.0]
    pings = _drive(speeds, limit=13.9)
    config = FeatureConfig(speed_limit_window_m=0.0)
    features, flagged = trip_features_and_events(pings, config)
    expected = [s == 20.0 for s in speeds]
    expected[-1] = False
    assert flagged["speeding"].to_list() == expected
    assert features["speeding_share"][0] == pytest.approx(8 / (len(speeds) - 1))
    # Spacing too wide to keep anything but the ends: the stretches' first fixes are kept.
    sparse = trip_routes(flagged, RouteConfig(min_spacing_m=1e6))
    kept = [p["ts"] for p in sparse["route"][0]]
    assert kept == [pings["ts"][i] for i in (0, 20, 45, len(speeds) - 1)]
    assert [p["speeding"] for p in sparse["route"][0]] == [False, True, True, False]


def test_event_fixes_beyond_the_cap_are_not_kept_and_null_flags_are_no_event() -> None:
    n = 200
    pings = _drive([10.0] * n).with_columns(
        pl.Series("hard_brake", [i % 10 == 5 for i in range(n)]),
        pl.lit(None, dtype=pl.Boolean()).alias("harsh_accel"),
        pl.lit(value=False).alias("harsh_corner"),
        pl.lit(value=False).alias("speeding"),
    )
    wide = RouteConfig(min_spacing_m=1e6, max_event_points=7)
    routes = trip_routes(pings, wide)
    assert routes.schema == pl.Schema(ROUTE_SCHEMA)
    points = _points(routes)
    # First and last fix, then the first 7 of the 20 brakes.
    assert points["hard_brake"].to_list() == [False, *([True] * 7), False]
    assert points["ts"].to_list()[1:-1] == [T0 + timedelta(seconds=5 + 10 * k) for k in range(7)]
    assert not points["harsh_accel"].any()
    with pytest.raises(ValueError, match="event flags"):
        trip_routes(pings.drop("speeding"))
