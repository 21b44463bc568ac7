"""The fleet simulator: determinism, contracts, physics, behaviours, labels, dirt and drift."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

import driverscore.simulation as simulation
from driverscore.domain.schema import PING_SCHEMA
from driverscore.simulation import (
    DirtConfig,
    DriftConfig,
    Simulation,
    SimulationConfig,
    iter_simulation,
    simulate,
)

CLEAN = DirtConfig.clean()
HARD_MPS2 = 3.0


@pytest.fixture(scope="module")
def clean() -> Simulation:
    """A clean fleet big enough for behaviour statistics (~0.8M pings)."""
    return simulate(
        SimulationConfig(vehicles=40, days=7, seed=11, include_trip_id=True, dirt=CLEAN)
    )


def _steps(pings: pl.DataFrame) -> pl.DataFrame:
    """Per-fix speed change and time step within each trip (clean pings with trip_id)."""
    return (
        pings.sort("trip_id", "ts")
        .with_columns(
            dt_s=pl.col("ts").diff().dt.total_microseconds().over("trip_id") / 1e6,
            dv=pl.col("speed_mps").diff().over("trip_id"),
        )
        .filter(pl.col("dt_s").is_not_null())
    )


def _per_driver_rates(sim: Simulation) -> pl.DataFrame:
    steps = _steps(sim.pings).filter(pl.col("dt_s") == 1.0)
    hard = steps.with_columns(
        hard=(pl.col("dv") <= -HARD_MPS2)
        & ~(pl.col("dv").shift(1).over("trip_id") <= -HARD_MPS2).fill_null(False),
        over=pl.col("speed_mps") > pl.col("speed_limit_mps") + 2.0,
    )
    per_driver = hard.group_by("driver_id").agg(
        hard_per_100km=pl.col("hard").sum() / (pl.col("speed_mps").sum() / 1000.0) * 100.0,
        over_share=pl.col("over").filter(pl.col("speed_limit_mps").is_not_null()).mean(),
    )
    return per_driver.join(sim.drivers, on="driver_id")


def test_public_api_is_explicit() -> None:
    assert sorted(simulation.__all__) == sorted(
        [
            "PHONE",
            "TRACKER",
            "DirtConfig",
            "DriftConfig",
            "GpsProfile",
            "Simulation",
            "SimulationConfig",
            "constant_turn",
            "hard_stop",
            "iter_simulation",
            "simulate",
            "straight_drive",
            "vehicles_per_chunk_for",
        ]
    )


def test_chunk_size_keeps_chunks_near_the_ping_budget() -> None:
    assert simulation.vehicles_per_chunk_for(1) == 200
    assert simulation.vehicles_per_chunk_for(29) * 29 * 3_000 <= 2_000_000
    assert simulation.vehicles_per_chunk_for(10_000) == 1


def test_same_seed_gives_identical_frames_and_another_seed_differs() -> None:
    config = SimulationConfig(vehicles=4, days=1, seed=3)
    first, second = simulate(config), simulate(config)
    other = simulate(config.model_copy(update={"seed": 4}))
    for name in ("pings", "incidents", "trips", "drivers"):
        assert getattr(first, name).equals(getattr(second, name)), name
    assert not first.pings.equals(other.pings)
    assert not first.drivers.equals(other.drivers)


def test_pings_have_the_canonical_schema_and_identities(clean: Simulation) -> None:
    assert clean.pings.schema == PING_SCHEMA
    for column in ("driver_id", "fleet_id", "client_id", "trip_id", "speed_mps", "heading_deg"):
        assert clean.pings[column].null_count() == 0, column
    without_trip_id = simulate(SimulationConfig(vehicles=2, days=1, seed=1))
    assert without_trip_id.pings.schema == PING_SCHEMA
    assert without_trip_id.pings["trip_id"].null_count() == without_trip_id.pings.height


def test_clean_pings_are_sorted_by_vehicle_then_time(clean: Simulation) -> None:
    keys = clean.pings.select("vehicle_id", "ts")
    assert keys.equals(keys.sort("vehicle_id", "ts"))


def test_pings_are_1hz_within_trips_with_short_dropouts(clean: Simulation) -> None:
    dt = _steps(clean.pings)["dt_s"]
    assert dt.min() == 1.0
    assert (dt == 1.0).mean() > 0.99
    assert dt.max() <= 20.0
    # Devices are off when parked: trips of a vehicle are separated by more than 5 min.
    trips = clean.trips.sort("vehicle_id", "start_ts")
    pause = trips.select(
        (pl.col("start_ts") - pl.col("end_ts").shift(1)).over("vehicle_id").dt.total_seconds()
    ).to_series()
    assert pause.drop_nulls().min() > 300


def test_trip_ids_in_pings_are_the_simulated_trips(clean: Simulation) -> None:
    assert set(clean.pings["trip_id"].unique()) == set(clean.trips["sim_trip_id"])


def test_motion_stays_within_physical_bounds(clean: Simulation) -> None:
    assert clean.pings["speed_mps"].max() < 60.0
    assert clean.pings["speed_mps"].min() >= 0.0
    steps = _steps(clean.pings).filter(pl.col("dt_s") == 1.0)
    # 8.5 m/s² tyre limit plus Doppler noise.
    assert steps["dv"].min() > -9.5
    assert steps["dv"].max() < 6.0
    imu = clean.pings["accel_long_mps2"].drop_nulls()
    assert imu.len() > 0
    assert imu.min() > -9.5
    heading = clean.pings["heading_deg"]
    assert heading.min() >= 0.0
    assert heading.max() < 360.0


def test_trips_stay_near_their_city(clean: Simulation) -> None:
    lat = clean.pings["lat"]
    lon = clean.pings["lon"]
    assert lat.min() > -60.0
    assert lat.max() < 60.0
    assert lon.min() > -180.0
    assert lon.max() < 180.0
    per_trip = clean.pings.group_by("trip_id").agg(
        lat_span=pl.col("lat").max() - pl.col("lat").min()
    )
    # 1 degree of latitude is 111 km: no trip spans more than that.
    assert per_trip["lat_span"].max() < 1.0


def test_aggressive_drivers_brake_hard_more_often_per_km(clean: Simulation) -> None:
    rates = _per_driver_rates(clean)
    calm = rates.filter(pl.col("aggressiveness") < 0.3)["hard_per_100km"]
    aggressive = rates.filter(pl.col("aggressiveness") > 0.6)["hard_per_100km"]
    assert calm.len() > 0
    assert aggressive.len() > 0
    calm_mean = calm.mean()
    aggressive_mean = aggressive.mean()
    assert isinstance(calm_mean, float)
    assert isinstance(aggressive_mean, float)
    assert calm_mean < 1.0
    assert aggressive_mean > 3.0
    assert aggressive_mean > 4.0 * calm_mean


def test_speeding_drivers_spend_more_time_over_the_limit(clean: Simulation) -> None:
    rates = _per_driver_rates(clean).drop_nulls("over_share")
    lawful = rates.filter(pl.col("speeding_propensity") < 0.3)["over_share"].mean()
    speeders = rates.filter(pl.col("speeding_propensity") > 0.6)["over_share"].mean()
    assert isinstance(lawful, float)
    assert isinstance(speeders, float)
    assert lawful < 0.05
    assert speeders > 0.15


def test_night_prone_drivers_drive_more_at_night(clean: Simulation) -> None:
    trips = clean.trips.join(clean.drivers.select("driver_id", "night_propensity"), "driver_id")
    owls = trips.filter(pl.col("night_propensity") > 0.5)["night_fraction"].mean()
    larks = trips.filter(pl.col("night_propensity") < 0.3)["night_fraction"].mean()
    assert isinstance(owls, float)
    assert isinstance(larks, float)
    assert owls > 2.0 * larks


def test_incidents_are_rare_and_ranked_by_latent_risk() -> None:
    sim = simulate(SimulationConfig(vehicles=50, days=12, seed=5, dirt=CLEAN))
    rate = sim.trips["incident"].mean()
    assert isinstance(rate, float)
    assert 0.02 <= rate <= 0.05
    auc = roc_auc_score(sim.trips["incident"].to_numpy(), sim.trips["latent_risk"].to_numpy())
    assert auc >= 0.8
    assert sim.incidents.height == sim.trips["incident"].sum()


def test_incidents_fall_inside_their_trip_and_are_reported_later(clean: Simulation) -> None:
    incidents = clean.incidents
    assert incidents.height > 0
    assert set(incidents["severity"].unique()) <= {"minor", "major"}
    delay = (incidents["reported_at"] - incidents["incident_ts"]).dt.total_seconds()
    assert delay.min() > 0
    assert delay.max() <= 30 * 86_400
    inside = incidents.join(
        clean.trips.filter("incident").select("vehicle_id", "start_ts", "end_ts"),
        on="vehicle_id",
    ).filter(pl.col("incident_ts").is_between(pl.col("start_ts"), pl.col("end_ts")))
    assert inside.height == incidents.height


def test_drivers_traits_lie_in_unit_interval(clean: Simulation) -> None:
    traits = clean.drivers.select(
        "aggressiveness", "speeding_propensity", "night_propensity", "smoothness"
    )
    assert traits.min().min_horizontal().item() >= 0.0
    assert traits.max().max_horizontal().item() <= 1.0
    assert clean.drivers["vehicle_id"].n_unique() == clean.drivers.height


def test_kmh_unit_drift_multiplies_reported_speeds_by_3_6() -> None:
    base = SimulationConfig(vehicles=3, days=1, seed=2, dirt=CLEAN)
    kmh = base.model_copy(update={"drift": DriftConfig(speed_unit_kmh_share=1.0)})
    ratio = simulate(kmh).pings["speed_mps"] / simulate(base).pings["speed_mps"]
    assert np.allclose(ratio.drop_nans().to_numpy(), 3.6)


def test_speed_sensor_bias_scales_reported_speeds() -> None:
    base = SimulationConfig(vehicles=3, days=1, seed=2, dirt=CLEAN)
    biased = base.model_copy(update={"drift": DriftConfig(speed_sensor_bias=1.1)})
    ratio = simulate(biased).pings["speed_mps"] / simulate(base).pings["speed_mps"]
    assert np.allclose(ratio.drop_nans().to_numpy(), 1.1)


def test_seasonal_factor_slows_the_drivers() -> None:
    base = SimulationConfig(vehicles=6, days=2, seed=2, dirt=CLEAN)
    winter = base.model_copy(update={"drift": DriftConfig(seasonal_speed_factor=0.8)})
    p95 = simulate(base).pings["speed_mps"].quantile(0.95)
    p95_winter = simulate(winter).pings["speed_mps"].quantile(0.95)
    assert p95 is not None
    assert p95_winter is not None
    assert p95_winter < 0.9 * p95


def test_new_fleet_brings_riskier_drivers() -> None:
    sim = simulate(
        SimulationConfig(vehicles=20, days=1, seed=2, drift=DriftConfig(new_fleet_vehicles=20))
    )
    by_fleet = sim.drivers.group_by(pl.col("fleet_id") == "fleet-new").agg(
        pl.col("aggressiveness").mean()
    )
    new = by_fleet.filter(pl.col("fleet_id"))["aggressiveness"].item()
    old = by_fleet.filter(~pl.col("fleet_id"))["aggressiveness"].item()
    assert new > old + 0.1
    assert sim.drivers.filter(pl.col("fleet_id") == "fleet-new").height == 20
    assert "fleet-new" in set(sim.pings["fleet_id"].unique())


def test_chunks_hold_whole_vehicles() -> None:
    config = SimulationConfig(vehicles=7, days=1, seed=2, vehicles_per_chunk=3)
    chunks = list(iter_simulation(config))
    assert len(chunks) == 3
    seen: set[str] = set()
    for chunk in chunks:
        vehicles = set(chunk.drivers["vehicle_id"])
        assert set(chunk.pings["vehicle_id"].unique()) <= vehicles
        assert set(chunk.trips["vehicle_id"].unique()) <= vehicles
        assert set(chunk.incidents["vehicle_id"].unique()) <= vehicles
        assert not vehicles & seen
        seen |= vehicles
    assert len(seen) == 7


def test_simulate_concatenates_the_chunks() -> None:
    config = SimulationConfig(vehicles=2, days=1, seed=2, vehicles_per_chunk=1)
    chunks = list(iter_simulation(config))
    whole = simulate(config)
    assert whole.pings.equals(pl.concat([c.pings for c in chunks]))
    assert whole.drivers.height == 2


def test_clean_config_has_no_defects(clean: Simulation) -> None:
    pings = clean.pings
    assert pings.select("vehicle_id", "ts").is_duplicated().sum() == 0
    assert pings.filter((pl.col("lat") == 0) & (pl.col("lon") == 0)).height == 0
    assert pings["ts"].min() > datetime.fromisoformat("2020-01-01T00:00:00+00:00")
    assert pings["speed_mps"].max() < 60.0


def test_dirt_injects_each_defect() -> None:
    dirt = DirtConfig(
        duplicate_rate=0.01,
        out_of_order_rate=0.01,
        zero_coordinate_rate=0.01,
        gps_spike_rate=0.01,
        impossible_speed_rate=0.01,
        bad_timestamp_rate=0.01,
    )
    pings = simulate(SimulationConfig(vehicles=3, days=2, seed=2, dirt=dirt)).pings
    assert pings.schema == PING_SCHEMA
    assert pings.is_duplicated().sum() > 0
    assert pings.filter((pl.col("lat") == 0) & (pl.col("lon") == 0)).height > 0
    assert pings.filter(pl.col("speed_mps") == 150.0).height > 0
    assert pings.filter(pl.col("ts").dt.epoch("s") == 0).height > 0
    valid = pings.filter(pl.col("ts").dt.epoch("s") > 0)
    backwards = valid.select((pl.col("ts").diff().over("vehicle_id").dt.total_seconds() < 0).sum())
    assert backwards.item() > 0
    jump = valid.filter(pl.col("lat") != 0).select(
        pl.col("lat").diff().abs().over("vehicle_id").max()
    )
    assert jump.item() > 0.015


def test_device_capabilities_follow_the_shares() -> None:
    base = SimulationConfig(vehicles=3, days=1, seed=3)
    bare = simulate(base.model_copy(update={"imu_share": 0.0, "speed_limit_share": 0.0}))
    for column in ("accel_long_mps2", "accel_lat_mps2", "speed_limit_mps"):
        assert bare.pings[column].null_count() == bare.pings.height
    # Without the map's missing stretches, every fix of a map-matched vehicle has a limit.
    full = simulate(
        base.model_copy(
            update={"imu_share": 1.0, "speed_limit_share": 1.0, "missing_limit_per_100km": 0.0}
        )
    )
    for column in ("accel_long_mps2", "accel_lat_mps2", "speed_limit_mps"):
        assert full.pings[column].null_count() == 0


def test_no_vehicles_gives_empty_frames_with_their_schema() -> None:
    sim = simulate(SimulationConfig(vehicles=0, days=1))
    assert sim.pings.height == 0
    assert sim.pings.schema == PING_SCHEMA
    assert sim.trips.height == 0
    assert sim.incidents.height == 0


def test_config_requires_an_aware_start() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        SimulationConfig(start=datetime(2026, 1, 5))
