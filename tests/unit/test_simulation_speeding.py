"""Habitual speeders, and map limits that are sometimes wrong or missing."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from driverscore.simulation import DirtConfig, SimulationConfig, simulate
from driverscore.simulation.fleet import build_fleet
from driverscore.simulation.maps import (
    MISSING_LIMIT_M,
    TOO_LOW_SHARE,
    WRONG_LIMIT_M,
    map_limits,
)

CLEAN = DirtConfig.clean()
KMH = 1 / 3.6


def test_habitual_speeders_are_the_asked_share_with_a_high_speeding_trait() -> None:
    fleet = build_fleet(SimulationConfig(vehicles=4000))
    habitual = fleet.speeding_margin_mps > 0
    assert habitual.mean() == pytest.approx(0.09, abs=0.015)
    assert fleet.speeding_propensity[habitual].min() >= 0.8
    margin_kmh = fleet.speeding_margin_mps[habitual] / KMH
    assert margin_kmh.min() >= 10.0
    assert margin_kmh.max() <= 25.0
    none = build_fleet(SimulationConfig(vehicles=500, habitual_speeder_share=0.0))
    assert not (none.speeding_margin_mps > 0).any()


@pytest.fixture(scope="module")
def speeders() -> pl.DataFrame:
    """Per driver: share of moving time (limit known) more than 10 km/h over the limit."""
    sim = simulate(
        SimulationConfig(
            vehicles=40,
            days=4,
            seed=9,
            dirt=CLEAN,
            habitual_speeder_share=0.4,
            speed_limit_share=1.0,
            wrong_limit_per_100km=0.0,
            missing_limit_per_100km=0.0,
        )
    )
    over = (
        sim.pings.filter(pl.col("speed_mps") > 2.0)
        .group_by("driver_id")
        .agg(over_10kmh=(pl.col("speed_mps") > pl.col("speed_limit_mps") + 10 * KMH).mean())
    )
    risk = sim.trips.group_by("driver_id").agg(
        risk_per_km=pl.col("latent_risk").sum() / pl.col("distance_km").sum()
    )
    return over.join(risk, on="driver_id").join(sim.drivers, on="driver_id")


def test_habitual_speeders_spend_much_of_their_moving_time_well_over_the_limit(
    speeders: pl.DataFrame,
) -> None:
    habitual = speeders.filter("habitual_speeder")["over_10kmh"]
    others = speeders.filter(~pl.col("habitual_speeder"))["over_10kmh"]
    assert habitual.len() >= 8
    assert others.len() >= 8
    habitual_mean, others_mean = habitual.mean(), others.mean()
    others_median = others.median()
    assert isinstance(habitual_mean, float)
    assert isinstance(others_mean, float)
    assert isinstance(others_median, float)
    # Stops, junctions, congestion and getting up to speed take the rest of their time;
    # the others include drivers prone to mild speeding on most roads, hence a mean above
    # the median.
    assert habitual_mean > 0.25
    assert others_median < 0.08
    assert habitual_mean > 3.0 * others_mean
    assert habitual.min() > others_median


def test_habitual_speeders_carry_more_latent_risk_per_km(speeders: pl.DataFrame) -> None:
    by_kind = speeders.group_by("habitual_speeder").agg(pl.col("risk_per_km").median())
    habitual = by_kind.filter("habitual_speeder")["risk_per_km"].item()
    others = by_kind.filter(~pl.col("habitual_speeder"))["risk_per_km"].item()
    assert habitual > 1.5 * others


def _straight_trips(trips: int, seconds: int, speed_mps: float) -> tuple[np.ndarray, ...]:
    n = trips * seconds
    return np.repeat(np.arange(trips), seconds), np.full(n, speed_mps), np.full(n, 25.0)


def test_map_limits_are_wrong_on_short_stretches_mostly_too_low() -> None:
    trip, speed, limit = _straight_trips(100, 3600, 20.0)  # 7,200 km
    reported = map_limits(np.random.default_rng(0), trip, speed, limit, 2.0, 0.0)
    wrong = reported != 25.0
    starts = np.count_nonzero(wrong[1:] & ~wrong[:-1]) + int(wrong[0])
    assert starts == pytest.approx(2.0 * 72, rel=0.2)
    # 20 m per fix: stretches of 200-600 m cover 10-30 fixes.
    mean_m = np.count_nonzero(wrong) / starts * 20.0
    assert WRONG_LIMIT_M[0] <= mean_m <= WRONG_LIMIT_M[1] + 20.0
    assert np.mean(reported[wrong] < 25.0) == pytest.approx(TOO_LOW_SHARE, abs=0.12)
    assert np.isnan(reported).sum() == 0


def test_map_limits_are_missing_on_some_stretches() -> None:
    trip, speed, limit = _straight_trips(100, 3600, 20.0)
    reported = map_limits(np.random.default_rng(1), trip, speed, limit, 0.0, 3.0)
    missing = np.isnan(reported)
    starts = np.count_nonzero(missing[1:] & ~missing[:-1]) + int(missing[0])
    assert starts == pytest.approx(3.0 * 72, rel=0.2)
    mean_m = np.count_nonzero(missing) / starts * 20.0
    assert MISSING_LIMIT_M[0] <= mean_m <= MISSING_LIMIT_M[1] + 20.0
    assert (reported[~missing] == 25.0).all()


def test_map_limit_stretches_stay_within_their_trip_and_parked_cars_start_none() -> None:
    trip, speed, limit = _straight_trips(2000, 30, 20.0)  # 600 m trips
    speed[: 30 * 1000] = 0.0  # half the trips never move
    speed[::30] = 0.0  # no stretch starts at a trip's first fix: one there came from before
    reported = map_limits(np.random.default_rng(2), trip, speed, limit, 200.0, 200.0)
    per_trip = reported.reshape(2000, 30)
    assert (per_trip[:1000] == 25.0).all()
    changed = (per_trip[1000:] != 25.0) | np.isnan(per_trip[1000:])
    assert changed[:, -1].mean() > 0.3  # many stretches run to the trip's end ...
    assert not changed[:, 0].any()  # ... and none into the next trip


def test_simulated_map_limits_have_wrong_and_missing_stretches() -> None:
    sim = simulate(SimulationConfig(vehicles=10, days=3, seed=4, dirt=CLEAN, speed_limit_share=1))
    limits = sim.pings["speed_limit_mps"]
    assert 0.003 < limits.null_count() / limits.len() < 0.1
    perfect = simulate(
        SimulationConfig(
            vehicles=10,
            days=3,
            seed=4,
            dirt=CLEAN,
            speed_limit_share=1,
            wrong_limit_per_100km=0.0,
            missing_limit_per_100km=0.0,
        )
    )
    assert perfect.pings["speed_limit_mps"].null_count() == 0
    # Same trajectories, the map alone differs: a few percent of fixes carry another limit.
    assert sim.pings.height == perfect.pings.height
    differs = (limits != perfect.pings["speed_limit_mps"]).fill_null(True)
    assert 0.005 < differs.mean() < 0.1  # type: ignore[operator]
