"""The fleet simulator: schedule trips, drive them, label them, dirty the feed.

Vehicles are simulated a chunk at a time (``vehicles_per_chunk``), so memory stays
bounded however many pings are asked for; every vehicle lies entirely in one chunk.
Within a chunk everything is vectorised with numpy: trips are driven in lockstep
(:mod:`driverscore.simulation.kinematics`) and placed at their wall-clock start after.

Trips are scheduled in local time (commute peaks, midday, evening, and night trips for
night-prone drivers); local time is mean solar time of the fleet's city (longitude / 15
hours from UTC), the convention the trip features use by default.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
import polars as pl

from driverscore.domain.schema import conform_pings
from driverscore.simulation.config import SimulationConfig
from driverscore.simulation.dirt import corrupt_values, dirty_order
from driverscore.simulation.fleet import CITIES, HIGHWAY, Fleet, build_fleet
from driverscore.simulation.gps import PHONE, TRACKER, TrueTrack, report_fixes, report_imu, to_wgs84
from driverscore.simulation.kinematics import Trajectories, drive
from driverscore.simulation.labels import Incidents, draw_incidents, hazard_per_km
from driverscore.simulation.maps import map_limits
from driverscore.simulation.routes import TripDrivers, plan_routes

_DAY_S: Final = 86_400
#: Local night window used for the trips' night fraction (hours).
NIGHT_START_HOUR: Final = 22.0
NIGHT_END_HOUR: Final = 5.0
#: Shortest pause between two trips of a vehicle (s): longer than the trip gap of
#: segmentation, so trips cut by time gaps match the simulated ones.
_MIN_PAUSE_S: Final = 900.0

_UTC_US = pl.Datetime("us", "UTC")

TRIPS_SCHEMA: Final[dict[str, pl.DataType]] = {
    "sim_trip_id": pl.String(),
    "vehicle_id": pl.String(),
    "driver_id": pl.String(),
    "fleet_id": pl.String(),
    "client_id": pl.String(),
    "start_ts": _UTC_US,
    "end_ts": _UTC_US,
    "distance_km": pl.Float64(),
    "night_fraction": pl.Float64(),
    "latent_risk": pl.Float64(),
    "incident": pl.Boolean(),
}

INCIDENTS_SCHEMA: Final[dict[str, pl.DataType]] = {
    "vehicle_id": pl.String(),
    "driver_id": pl.String(),
    "incident_ts": _UTC_US,
    "reported_at": _UTC_US,
    "severity": pl.String(),
}


@dataclass(frozen=True)
class Simulation:
    """Frames of a simulated fleet.

    ``pings`` is the telemetry feed (canonical ping schema); ``incidents`` the claims
    dataset (labels); ``trips`` and ``drivers`` the ground truth, for tests and evaluation
    only, never for training.
    """

    pings: pl.DataFrame
    incidents: pl.DataFrame
    trips: pl.DataFrame
    drivers: pl.DataFrame


def simulate(config: SimulationConfig) -> Simulation:
    """Simulate the whole fleet in memory: the concatenation of :func:`iter_simulation`."""
    chunks = list(iter_simulation(config))
    if not chunks:
        return _empty(build_fleet(config))
    return Simulation(
        pings=pl.concat([c.pings for c in chunks]),
        incidents=pl.concat([c.incidents for c in chunks]),
        trips=pl.concat([c.trips for c in chunks]),
        drivers=pl.concat([c.drivers for c in chunks]),
    )


def iter_simulation(config: SimulationConfig) -> Iterator[Simulation]:
    """Simulate the fleet one chunk of vehicles at a time."""
    fleet = build_fleet(config)
    size = config.vehicles_per_chunk
    for index, lo in enumerate(range(0, len(fleet), size)):
        rng = np.random.default_rng([config.seed, 0xC4A4C, index])
        yield _simulate_chunk(rng, config, fleet, lo, min(lo + size, len(fleet)))


def _empty(fleet: Fleet) -> Simulation:
    return Simulation(
        pings=conform_pings(pl.DataFrame({"ts": [], "vehicle_id": [], "lat": [], "lon": []})),
        incidents=pl.DataFrame(schema=INCIDENTS_SCHEMA),
        trips=pl.DataFrame(schema=TRIPS_SCHEMA),
        drivers=fleet.drivers_frame(),
    )


@dataclass(frozen=True)
class _Schedule:
    vehicle: np.ndarray  # index into the fleet
    #: Planned start, seconds after ``config.start`` (UTC).
    start_s: np.ndarray
    local_hour: np.ndarray


def _schedule(
    rng: np.random.Generator, config: SimulationConfig, fleet: Fleet, lo: int, hi: int
) -> _Schedule:
    vehicles = np.arange(lo, hi)
    days = np.arange(config.days)
    weekday = (config.start.weekday() + days) % 7
    day_factor = np.where(weekday >= 5, 0.6, 1.0)
    counts = rng.poisson(config.trips_per_day * day_factor[None, :], (len(vehicles), len(days)))
    counts = np.minimum(counts, 12)
    vehicle = np.repeat(np.repeat(vehicles, len(days)), counts.ravel())
    day = np.repeat(np.tile(days, len(vehicles)), counts.ravel())
    weekend = weekday[day] >= 5
    n = len(vehicle)

    # Mixture of local start hours: morning commute, midday, evening commute, evening,
    # night; night-prone drivers weigh the night much more, weekends have no commute.
    night = fleet.night_propensity[vehicle]
    commute = np.where(weekend, 0.08, 0.3)
    weights = np.stack(
        [commute, np.full(n, 0.25), commute, np.full(n, 0.12), 0.02 + 0.4 * night**1.5], axis=1
    )
    cumulative = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    component = (rng.random(n)[:, None] > cumulative).sum(axis=1)
    hours = np.stack(
        [
            rng.normal(7.8, 0.8, n),
            rng.uniform(9.5, 16.0, n),
            rng.normal(17.4, 1.0, n),
            rng.uniform(19.0, 22.0, n),
            rng.uniform(22.0, 29.0, n),
        ],
        axis=1,
    )
    local_hour = hours[np.arange(n), np.minimum(component, 4)]
    lon = np.array([c.lon for c in CITIES])[fleet.city[vehicle]]
    start_s = day * _DAY_S + local_hour * 3600.0 - lon / 15.0 * 3600.0
    # The new fleet joins on its start day: none of its trips is planned before it.
    joined = (vehicle < config.vehicles) | _from_day(start_s, config.drift.new_fleet_start_day)
    vehicle, start_s, local_hour = vehicle[joined], start_s[joined], local_hour[joined]
    order = np.lexsort((start_s, vehicle))
    return _Schedule(vehicle[order], start_s[order], (local_hour[order]) % 24.0)


def _from_day(planned_s: np.ndarray, day: int) -> np.ndarray:
    """Trips a drift starting on ``day`` applies to; day 0 is every trip (even one planned
    just before ``start`` in UTC: local midnight is later than UTC midnight east of it)."""
    return np.asarray(planned_s >= day * _DAY_S if day > 0 else np.ones(len(planned_s), bool))


def _resolve_overlaps(
    vehicle: np.ndarray, planned_s: np.ndarray, duration_s: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Push starts later so each trip starts a pause after the vehicle's previous trip."""
    if len(vehicle) == 0:
        return planned_s
    busy = duration_s + _MIN_PAUSE_S + rng.exponential(600.0, len(vehicle))
    group_start = np.r_[True, vehicle[1:] != vehicle[:-1]]
    total = np.cumsum(busy)
    base = np.maximum.accumulate(np.where(group_start, total - busy, 0.0))
    before = total - busy - base  # busy time of earlier trips of the same vehicle
    # start_i = max(planned_i, start_{i-1} + busy_{i-1}) == before_i + running max of
    # (planned - before) within the vehicle.
    frame = pl.DataFrame({"vehicle": vehicle, "slack": planned_s - before})
    running = frame.select(pl.col("slack").cum_max().over("vehicle")).to_series().to_numpy()
    return np.asarray(running + before, dtype=np.float64)


def _simulate_chunk(
    rng: np.random.Generator, config: SimulationConfig, fleet: Fleet, lo: int, hi: int
) -> Simulation:
    plan = _schedule(rng, config, fleet, lo, hi)
    vehicle = plan.vehicle
    n_trips = len(vehicle)
    if n_trips == 0:
        empty = _empty(fleet)
        return Simulation(
            empty.pings, empty.incidents, empty.trips, fleet.drivers_frame(slice(lo, hi))
        )

    limits = np.array([c.limits_mps for c in CITIES])
    hour = plan.local_hour
    drivers = TripDrivers(
        aggressiveness=fleet.aggressiveness[vehicle],
        speeding_propensity=fleet.speeding_propensity[vehicle],
        smoothness=fleet.smoothness[vehicle],
        limits_mps=limits[fleet.city[vehicle]],
        rush=(((hour >= 7.0) & (hour < 9.5)) | ((hour >= 16.5) & (hour < 19.0))).astype(float),
        power_per_kg=fleet.power_per_kg[vehicle],
        speeding_margin_mps=fleet.speeding_margin_mps[vehicle],
    )
    planned_km = np.clip(rng.lognormal(np.log(8.0), 0.75, n_trips), 1.0, 120.0)
    drift = config.drift
    seasonal = np.where(
        _from_day(plan.start_s, drift.seasonal_start_day), drift.seasonal_speed_factor, 1.0
    )
    routes = plan_routes(rng, planned_km, drivers, seasonal)
    traj = drive(rng, routes, drivers, rng.uniform(0.0, 2.0 * np.pi, n_trips))

    start_s = _resolve_overlaps(vehicle, plan.start_s, traj.samples.astype(float), rng)
    start_s = np.rint(start_s)
    trip = traj.trip
    utc_s = start_s[trip] + traj.step
    city = fleet.city[vehicle]
    city_lat = np.array([c.lat for c in CITIES])[city]
    city_lon = np.array([c.lon for c in CITIES])[city]
    local_hour = ((utc_s + city_lon[trip] / 15.0 * 3600.0) % _DAY_S) / 3600.0
    at_night = (local_hour >= NIGHT_START_HOUR) | (local_hour < NIGHT_END_HOUR)
    night_fraction = np.bincount(trip, at_night, minlength=n_trips) / traj.samples

    distance_km = traj.distance_m / 1000.0
    outcome = draw_incidents(
        rng,
        hazard_per_km(
            drivers.aggressiveness,
            drivers.speeding_propensity,
            drivers.smoothness,
            night_fraction,
        ),
        distance_km,
        traj.samples - 1.0,
        drivers.aggressiveness,
    )

    epoch_us = int(config.start.timestamp()) * 1_000_000
    # Multipath jumps happen in the city: every road but the highway.
    urban = traj.speed_limit_mps < drivers.limits_mps[traj.trip, HIGHWAY] - 0.01
    devices = _TripDevices(
        tracker=fleet.has_imu[vehicle]
        & ~(fleet.turns_gps_only[vehicle] & _from_day(plan.start_s, drift.gps_only_start_day)),
        speed_factor=np.where(
            _from_day(plan.start_s, drift.speed_sensor_bias_start_day),
            fleet.speed_bias[vehicle],
            1.0,
        )
        * np.where(
            fleet.reports_kmh[vehicle] & _from_day(plan.start_s, drift.speed_unit_kmh_start_day),
            3.6,
            1.0,
        ),
    )
    columns, reported = _observe(
        rng, config, traj, urban, devices, fleet, vehicle, city_lat, city_lon, utc_s
    )
    columns["ts_us"] += epoch_us
    kept = np.flatnonzero(reported)
    rows = kept[dirty_order(rng, len(kept), config.dirt)]
    columns = {name: np.take(values, rows) for name, values in columns.items()}
    corrupt_values(rng, columns, config.dirt)

    trip_ids = _trip_ids(fleet, vehicle)
    return Simulation(
        pings=_pings_frame(config, fleet, columns, trip_ids),
        incidents=_incidents_frame(fleet, vehicle, start_s, outcome, epoch_us),
        trips=_trips_frame(
            fleet,
            vehicle,
            trip_ids,
            start_s,
            traj,
            distance_km,
            night_fraction,
            outcome,
            epoch_us,
        ),
        drivers=fleet.drivers_frame(slice(lo, hi)),
    )


@dataclass(frozen=True)
class _TripDevices:
    """Per trip: the device that records it, after the drifts of its day."""

    #: A tracker with an IMU; otherwise a GPS-only phone.
    tracker: np.ndarray
    #: Multiplier on the reported speed (sensor bias times a km/h unit change).
    speed_factor: np.ndarray


def _observe(
    rng: np.random.Generator,
    config: SimulationConfig,
    traj: Trajectories,
    urban: np.ndarray,
    devices: _TripDevices,
    fleet: Fleet,
    vehicle: np.ndarray,
    city_lat: np.ndarray,
    city_lon: np.ndarray,
    utc_s: np.ndarray,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """What the devices report (every fix), and which fixes they send (not lost in dropouts).

    Map-matched vehicles report the map's limit, wrong or missing on short stretches
    (:mod:`driverscore.simulation.maps`).

    Trips recorded by a tracker have its IMU columns; the others are phones, GPS only
    (:mod:`driverscore.simulation.gps`).
    """
    trip = traj.trip
    n_trips = len(vehicle)
    ping_vehicle = vehicle[trip]

    # Trips start somewhere within ~12 km of the city centre.
    radius = 12_000.0 * np.sqrt(rng.random(n_trips))
    bearing = rng.uniform(0.0, 2.0 * np.pi, n_trips)
    tracker = devices.tracker
    fixes = report_fixes(
        rng,
        TrueTrack(
            trip=trip,
            step=traj.step,
            east_m=traj.east_m,
            north_m=traj.north_m,
            course_rad=traj.heading_rad,
            speed_mps=traj.speed_mps,
            urban=urban,
        ),
        (PHONE, TRACKER),
        tracker.astype(np.int64),
    )
    lat, lon = to_wgs84(
        city_lat[trip],
        city_lon[trip],
        (radius * np.sin(bearing))[trip] + fixes.east_m,
        (radius * np.cos(bearing))[trip] + fixes.north_m,
    )
    imu = tracker[trip]
    accel_long, accel_lat = report_imu(
        rng,
        TRACKER,
        traj.accel_long_mps2,
        traj.accel_lat_mps2,
        fleet.imu_bias_long[ping_vehicle],
        fleet.imu_bias_lat[ping_vehicle],
    )
    map_limit = map_limits(
        rng,
        trip,
        traj.speed_mps,
        traj.speed_limit_mps,
        config.wrong_limit_per_100km,
        config.missing_limit_per_100km,
    )
    limit = np.where(fleet.has_speed_limit[ping_vehicle], map_limit, np.nan)
    columns = {
        "ts_us": (utc_s * 1_000_000).astype(np.int64),
        "vehicle": ping_vehicle,
        "trip": trip,
        "lat": lat,
        "lon": lon,
        "speed_mps": fixes.speed_mps * devices.speed_factor[trip],
        "heading_deg": fixes.course_deg,
        "accel_long_mps2": np.where(imu, accel_long, np.nan),
        "accel_lat_mps2": np.where(imu, accel_lat, np.nan),
        "speed_limit_mps": limit,
    }
    return columns, fixes.reported


def _trip_ids(fleet: Fleet, vehicle: np.ndarray) -> pl.Series:
    group_start = np.r_[True, vehicle[1:] != vehicle[:-1]]
    position = np.arange(len(vehicle))
    ordinal = position - np.maximum.accumulate(np.where(group_start, position, 0)) + 1
    frame = pl.DataFrame({"vehicle_id": _names(fleet.vehicle_id, vehicle), "ordinal": ordinal})
    return frame.select(
        pl.concat_str(
            [pl.col("vehicle_id"), pl.lit("-t"), pl.col("ordinal").cast(pl.String).str.zfill(4)]
        )
    ).to_series()


def _names(names: np.ndarray, index: np.ndarray) -> pl.Series:
    """Gather string ids by index without building Python strings per row."""
    lo = int(index.min()) if len(index) else 0
    hi = int(index.max()) + 1 if len(index) else 0
    return pl.Series(names[lo:hi].tolist(), dtype=pl.String).gather(index - lo)


def _pings_frame(
    config: SimulationConfig,
    fleet: Fleet,
    columns: dict[str, np.ndarray],
    trip_ids: pl.Series,
) -> pl.DataFrame:
    vehicle = columns["vehicle"]
    frame = pl.DataFrame(
        {
            "ts": pl.Series(columns["ts_us"], dtype=pl.Int64).cast(_UTC_US),
            "vehicle_id": _names(fleet.vehicle_id, vehicle),
            "driver_id": _names(fleet.driver_id, vehicle),
            "trip_id": trip_ids.gather(columns["trip"]) if config.include_trip_id else None,
            "lat": columns["lat"],
            "lon": columns["lon"],
            "speed_mps": columns["speed_mps"],
            "heading_deg": columns["heading_deg"],
            "accel_long_mps2": pl.Series(columns["accel_long_mps2"], nan_to_null=True),
            "accel_lat_mps2": pl.Series(columns["accel_lat_mps2"], nan_to_null=True),
            "speed_limit_mps": pl.Series(columns["speed_limit_mps"], nan_to_null=True),
            "fleet_id": _names(fleet.fleet_id, vehicle),
            "client_id": _names(fleet.client_id, vehicle),
        }
    )
    return conform_pings(frame)


def _incidents_frame(
    fleet: Fleet,
    vehicle: np.ndarray,
    start_s: np.ndarray,
    outcome: Incidents,
    epoch_us: int,
) -> pl.DataFrame:
    hit = np.flatnonzero(outcome.incident)
    incident_us = epoch_us + np.rint((start_s[hit] + outcome.incident_offset_s) * 1e6).astype(
        np.int64
    )
    reported_us = incident_us + np.rint(outcome.report_delay_s * 1e6).astype(np.int64)
    return pl.DataFrame(
        {
            "vehicle_id": _names(fleet.vehicle_id, vehicle[hit]) if len(hit) else [],
            "driver_id": _names(fleet.driver_id, vehicle[hit]) if len(hit) else [],
            "incident_ts": pl.Series(incident_us, dtype=pl.Int64).cast(_UTC_US),
            "reported_at": pl.Series(reported_us, dtype=pl.Int64).cast(_UTC_US),
            "severity": np.where(outcome.major, "major", "minor").tolist(),
        },
        schema=INCIDENTS_SCHEMA,
    )


def _trips_frame(
    fleet: Fleet,
    vehicle: np.ndarray,
    trip_ids: pl.Series,
    start_s: np.ndarray,
    traj: Trajectories,
    distance_km: np.ndarray,
    night_fraction: np.ndarray,
    outcome: Incidents,
    epoch_us: int,
) -> pl.DataFrame:
    start_us = epoch_us + (start_s * 1_000_000).astype(np.int64)
    end_us = start_us + (traj.samples - 1) * 1_000_000
    return pl.DataFrame(
        {
            "sim_trip_id": trip_ids,
            "vehicle_id": _names(fleet.vehicle_id, vehicle),
            "driver_id": _names(fleet.driver_id, vehicle),
            "fleet_id": _names(fleet.fleet_id, vehicle),
            "client_id": _names(fleet.client_id, vehicle),
            "start_ts": pl.Series(start_us, dtype=pl.Int64).cast(_UTC_US),
            "end_ts": pl.Series(end_us, dtype=pl.Int64).cast(_UTC_US),
            "distance_km": distance_km,
            "night_fraction": night_fraction,
            "latent_risk": outcome.latent_risk,
            "incident": outcome.incident,
        },
        schema=TRIPS_SCHEMA,
    )
