"""Cities, fleets, vehicles and their drivers.

One driver per vehicle. Driver traits are latent (0..1) and drive both the kinematics
(what the pings show) and the incident hazard (what the labels show); they are drawn
from correlated normals squashed by a logistic, so that aggressive drivers also tend to
speed and to be less smooth, as in telematics studies. A share of drivers are habitual
speeders: a personal margin of 10-25 km/h over the limit on most roads, and a high
speeding trait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import polars as pl

from driverscore.simulation.config import SimulationConfig
from driverscore.simulation.gps import TRACKER

KMH: Final = 1 / 3.6
MPH: Final = 0.44704

#: Road classes, index into :attr:`City.limits_mps`.
RESIDENTIAL: Final = 0
URBAN: Final = 1
ARTERIAL: Final = 2
HIGHWAY: Final = 3


@dataclass(frozen=True)
class City:
    """A fleet's base: where its vehicles drive and the posted limits of its roads."""

    name: str
    lat: float
    lon: float
    #: Posted limits of residential, urban, arterial and highway roads (m/s).
    limits_mps: tuple[float, float, float, float]


CITIES: Final[tuple[City, ...]] = (
    City("Lyon", 45.76, 4.84, (30 * KMH, 50 * KMH, 70 * KMH, 130 * KMH)),
    City("Chicago", 41.88, -87.63, (25 * MPH, 30 * MPH, 45 * MPH, 65 * MPH)),
    City("São Paulo", -23.55, -46.63, (30 * KMH, 50 * KMH, 70 * KMH, 110 * KMH)),
    City("Bangalore", 12.97, 77.59, (30 * KMH, 40 * KMH, 60 * KMH, 100 * KMH)),
    City("Melbourne", -37.81, 144.96, (40 * KMH, 50 * KMH, 70 * KMH, 110 * KMH)),
    City("Berlin", 52.52, 13.40, (30 * KMH, 50 * KMH, 60 * KMH, 130 * KMH)),
)

NEW_FLEET_ID: Final = "fleet-new"
#: Habitual speeders' personal margin over the limit, drawn uniformly per driver (km/h).
HABITUAL_MARGIN_KMH: Final = (10.0, 25.0)


@dataclass(frozen=True)
class Fleet:
    """Every vehicle of the simulation with its driver's latent traits (arrays by vehicle)."""

    vehicle_id: np.ndarray
    driver_id: np.ndarray
    fleet_id: np.ndarray
    client_id: np.ndarray
    city: np.ndarray  # index into CITIES
    aggressiveness: np.ndarray
    speeding_propensity: np.ndarray
    night_propensity: np.ndarray
    smoothness: np.ndarray
    #: Habitual speeders' margin over the limit (m/s); 0 for every other driver.
    speeding_margin_mps: np.ndarray
    has_imu: np.ndarray
    has_speed_limit: np.ndarray
    #: Vehicle power over mass (W/kg): caps acceleration as speed rises.
    power_per_kg: np.ndarray
    #: Drifts, each from its start day: speed sensor bias (multiplier, 1 when unbiased),
    #: km/h numbers sent as m/s, tracker replaced by a GPS-only device.
    speed_bias: np.ndarray
    reports_kmh: np.ndarray
    turns_gps_only: np.ndarray
    #: IMU mount bias, longitudinal and lateral (m/s²).
    imu_bias_long: np.ndarray
    imu_bias_lat: np.ndarray

    def __len__(self) -> int:
        return len(self.vehicle_id)

    def drivers_frame(self, rows: slice | None = None) -> pl.DataFrame:
        """The ``drivers`` ground-truth frame."""
        sel = rows if rows is not None else slice(None)
        return pl.DataFrame(
            {
                "driver_id": self.driver_id[sel].tolist(),
                "vehicle_id": self.vehicle_id[sel].tolist(),
                "fleet_id": self.fleet_id[sel].tolist(),
                "client_id": self.client_id[sel].tolist(),
                "aggressiveness": self.aggressiveness[sel],
                "speeding_propensity": self.speeding_propensity[sel],
                "night_propensity": self.night_propensity[sel],
                "smoothness": self.smoothness[sel],
                "habitual_speeder": self.speeding_margin_mps[sel] > 0.0,
            },
            schema={
                "driver_id": pl.String(),
                "vehicle_id": pl.String(),
                "fleet_id": pl.String(),
                "client_id": pl.String(),
                "aggressiveness": pl.Float64(),
                "speeding_propensity": pl.Float64(),
                "night_propensity": pl.Float64(),
                "smoothness": pl.Float64(),
                "habitual_speeder": pl.Boolean(),
            },
        )


def _squash(z: np.ndarray) -> np.ndarray:
    # Logistic with slope 1.7 approximates the normal CDF: a trait in 0..1.
    return np.asarray(1.0 / (1.0 + np.exp(-1.7 * z)), dtype=np.float64)


def build_fleet(config: SimulationConfig) -> Fleet:
    """Draw all vehicles and drivers; independent of chunking so chunks agree."""
    rng = np.random.default_rng([config.seed, 0xF1EE7])
    n_regular = config.vehicles
    n = config.total_vehicles
    index = np.arange(n)
    is_new = index >= n_regular

    fleet_index = np.where(is_new, config.fleets, index % config.fleets)
    city = fleet_index % len(CITIES)
    client_index = rng.integers(0, config.clients_per_fleet, size=n)

    # Trait correlations: aggressive drivers speed more, are less smooth, drive a bit more
    # at night.
    corr = np.array(
        [
            [1.0, 0.5, 0.2, -0.6],
            [0.5, 1.0, 0.2, -0.3],
            [0.2, 0.2, 1.0, -0.1],
            [-0.6, -0.3, -0.1, 1.0],
        ]
    )
    z = rng.standard_normal((n, 4)) @ np.linalg.cholesky(corr).T
    # Offsets skew the mix towards calm, law-abiding, daytime, smooth drivers.
    aggressiveness = _squash(z[:, 0] - 0.45)
    speeding = _squash(z[:, 1] - 0.35)
    night = _squash(z[:, 2] - 0.6)
    smoothness = _squash(z[:, 3] + 0.45)
    shift = config.drift.new_fleet_aggressiveness_shift
    aggressiveness = np.where(is_new, np.clip(aggressiveness + shift, 0.0, 1.0), aggressiveness)
    smoothness = np.where(is_new, np.clip(smoothness - 0.5 * shift, 0.0, 1.0), smoothness)
    speeding = np.where(is_new, np.clip(speeding + 0.5 * shift, 0.0, 1.0), speeding)

    has_imu = rng.random(n) < config.imu_share
    has_limit = rng.random(n) < config.speed_limit_share
    power = rng.uniform(22.0, 45.0, n)

    drift = config.drift
    biased = rng.random(n) < drift.speed_sensor_bias_share
    kmh = rng.random(n) < drift.speed_unit_kmh_share

    # One string per vehicle (not per ping): a plain comprehension is clearest.
    vehicle_ids = np.array([f"veh-{i + 1:05d}" for i in index], dtype=object)
    driver_ids = np.array([f"drv-{i + 1:05d}" for i in index], dtype=object)
    fleet_names = np.array(
        [NEW_FLEET_ID if new else f"fleet-{f}" for new, f in zip(is_new, fleet_index, strict=True)],
        dtype=object,
    )
    client_names = np.array(
        [f"{f}-client-{c}" for f, c in zip(fleet_names, client_index, strict=True)], dtype=object
    )
    imu_bias_long = rng.normal(0.0, TRACKER.imu_bias_sigma_mps2, n)
    imu_bias_lat = rng.normal(0.0, TRACKER.imu_bias_sigma_mps2, n)
    # Drawn after the others, so these knobs leave every earlier draw of the fleet as it was.
    turns_gps_only = has_imu & (rng.random(n) < drift.gps_only_share)
    habitual = rng.random(n) < config.habitual_speeder_share
    margin = np.where(habitual, rng.uniform(*HABITUAL_MARGIN_KMH, n) * KMH, 0.0)
    # Their latent trait is high: the label model sees the risk through the traits only.
    speeding = np.where(habitual, np.maximum(speeding, rng.uniform(0.8, 0.95, n)), speeding)
    return Fleet(
        vehicle_id=vehicle_ids,
        driver_id=driver_ids,
        fleet_id=fleet_names,
        client_id=client_names,
        city=city,
        aggressiveness=aggressiveness,
        speeding_propensity=speeding,
        night_propensity=night,
        smoothness=smoothness,
        speeding_margin_mps=margin,
        has_imu=has_imu,
        has_speed_limit=has_limit,
        power_per_kg=power,
        speed_bias=np.where(biased, drift.speed_sensor_bias, 1.0),
        reports_kmh=kmh,
        imu_bias_long=imu_bias_long,
        imu_bias_lat=imu_bias_lat,
        turns_gps_only=turns_gps_only,
    )
