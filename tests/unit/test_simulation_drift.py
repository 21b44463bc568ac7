"""Drifts that start on a given day, and devices turning GPS-only."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from driverscore.simulation import DirtConfig, DriftConfig, SimulationConfig, simulate
from driverscore.simulation.fleet import build_fleet

CLEAN = DirtConfig.clean()


def _split(pings: pl.DataFrame, config: SimulationConfig, day: int) -> tuple[pl.DataFrame, ...]:
    boundary = config.start + timedelta(days=day)
    return pings.filter(pl.col("ts") < boundary), pings.filter(pl.col("ts") >= boundary)


@pytest.mark.parametrize(
    ("drift", "factor"),
    [
        (DriftConfig(speed_unit_kmh_share=1.0, speed_unit_kmh_start_day=2), 3.6),
        (DriftConfig(speed_sensor_bias=1.1, speed_sensor_bias_start_day=2), 1.1),
    ],
    ids=["kmh", "bias"],
)
def test_speed_drift_starts_on_its_day(drift: DriftConfig, factor: float) -> None:
    base = SimulationConfig(vehicles=4, days=4, seed=2, dirt=CLEAN)
    undrifted = simulate(base).pings
    drifted = simulate(base.model_copy(update={"drift": drift})).pings
    before, after = _split(drifted, base, 2)
    base_before, base_after = _split(undrifted, base, 2)
    assert before.height > 0
    assert before.equals(base_before)
    ratio = (after["speed_mps"] / base_after["speed_mps"]).drop_nans().to_numpy()
    assert np.mean(np.isclose(ratio, factor)) > 0.95
    assert after.drop("speed_mps").equals(base_after.drop("speed_mps"))


def test_devices_turn_gps_only_on_their_day_and_the_days_before_are_unchanged() -> None:
    base = SimulationConfig(vehicles=4, days=4, seed=3, dirt=CLEAN, imu_share=1.0)
    undrifted = simulate(base).pings
    config = base.model_copy(
        update={"drift": DriftConfig(gps_only_share=1.0, gps_only_start_day=2)}
    )
    before, after = _split(simulate(config).pings, config, 2)
    assert before.height > 0
    assert before.equals(_split(undrifted, base, 2)[0])
    assert before["accel_lat_mps2"].null_count() == 0
    assert after["accel_lat_mps2"].null_count() > 0.95 * after.height
    assert after["accel_long_mps2"].null_count() == after["accel_lat_mps2"].null_count()


def test_gps_only_devices_report_phone_grade_course() -> None:
    # A phone's course jitters more than a tracker's at the same speed.
    base = SimulationConfig(vehicles=6, days=2, seed=4, dirt=CLEAN, imu_share=1.0)
    gps_only = base.model_copy(update={"drift": DriftConfig(gps_only_share=1.0)})

    def course_step_std(pings: pl.DataFrame) -> float:
        fast = (
            pings.sort("vehicle_id", "ts")
            .with_columns(
                turn=(pl.col("heading_deg").diff().over("vehicle_id") + 180.0) % 360.0 - 180.0
            )
            .filter(pl.col("speed_mps") > 25.0)
        )
        value = fast["turn"].std()
        assert isinstance(value, float)
        return value

    assert course_step_std(simulate(gps_only).pings) > 1.5 * course_step_std(simulate(base).pings)


@pytest.mark.parametrize("imu_share", [1.0, 0.5])
def test_gps_only_share_is_a_share_of_the_vehicles_with_an_imu(imu_share: float) -> None:
    config = SimulationConfig(
        vehicles=4000, imu_share=imu_share, drift=DriftConfig(gps_only_share=0.3)
    )
    fleet = build_fleet(config)
    assert not (fleet.turns_gps_only & ~fleet.has_imu).any()
    share = fleet.turns_gps_only.sum() / fleet.has_imu.sum()
    assert share == pytest.approx(0.3, abs=0.03)


def test_gps_only_share_in_the_pings_follows_the_knob() -> None:
    config = SimulationConfig(
        vehicles=60,
        days=1,
        seed=5,
        imu_share=1.0,
        dirt=CLEAN,
        drift=DriftConfig(gps_only_share=0.3),
    )
    per_vehicle = (
        simulate(config)
        .pings.group_by("vehicle_id")
        .agg(gps_only=pl.col("accel_lat_mps2").is_null().all())
    )
    share = per_vehicle["gps_only"].mean()
    assert isinstance(share, float)
    assert share == pytest.approx(0.3, abs=0.12)


def test_seasonal_speed_change_starts_on_its_day() -> None:
    base = SimulationConfig(vehicles=10, days=6, seed=6, dirt=CLEAN)
    winter = base.model_copy(
        update={"drift": DriftConfig(seasonal_speed_factor=0.8, seasonal_start_day=3)}
    )

    def moving_speed(pings: pl.DataFrame) -> float:
        value = pings.filter(pl.col("speed_mps") > 2.0)["speed_mps"].mean()
        assert isinstance(value, float)
        return value

    base_before, base_after = _split(simulate(base).pings, base, 3)
    before, after = _split(simulate(winter).pings, winter, 3)
    # The same routes before the change (only the throttle noise differs), slower after.
    assert moving_speed(before) == pytest.approx(moving_speed(base_before), rel=0.03)
    assert moving_speed(after) < 0.9 * moving_speed(base_after)


def test_new_fleet_joins_on_its_day() -> None:
    config = SimulationConfig(
        vehicles=6,
        days=4,
        seed=7,
        dirt=CLEAN,  # a bad timestamp (epoch 0) would sit before any day
        drift=DriftConfig(new_fleet_vehicles=6, new_fleet_start_day=2),
    )
    sim = simulate(config)
    before, after = _split(sim.pings, config, 2)
    assert "fleet-new" not in set(before["fleet_id"].unique())
    assert "fleet-new" in set(after["fleet_id"].unique())
    assert before.height > 0
    new_trips = sim.trips.filter(pl.col("fleet_id") == "fleet-new")
    assert new_trips["start_ts"].min() >= config.start + timedelta(days=2)
