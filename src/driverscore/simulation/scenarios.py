"""Small driving scenarios with known geometry, seen through the simulator's device model.

For tests of the feature rules elsewhere: a straight drive at constant speed, a turn at
constant lateral acceleration and a hard stop (one braking), each one trip of one vehicle
at 1 Hz in canonical pings (``trip_id`` filled), reported by a
:class:`~driverscore.simulation.gps.GpsProfile` through the same noise model as the fleet
simulator (:func:`report_fixes`). A tracker profile also fills the accelerometer columns;
a phone leaves them null.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import numpy as np
import polars as pl

from driverscore.domain.schema import conform_pings
from driverscore.simulation.gps import (
    GPS_PROFILES,
    GpsProfile,
    TrueTrack,
    report_fixes,
    report_imu,
    to_wgs84,
)

#: Standard gravity as the brief for lateral g uses it (m/s²).
G_MPS2: Final = 9.81
#: Where scenarios drive: Lyon's centre, far from the poles and the antimeridian.
ORIGIN_LAT: Final = 45.76
ORIGIN_LON: Final = 4.84
#: A weekday morning in UTC: neither night nor a rush-hour question.
DEFAULT_START: Final = datetime(2026, 1, 6, 10, 0, tzinfo=UTC)
_UTC_US = pl.Datetime("us", "UTC")


def straight_drive(
    speed_kmh: float,
    distance_km: float,
    profile: GpsProfile | str,
    seed: int,
    *,
    speed_limit_mps: float | None = None,
    heading_deg: float = 30.0,
    urban: bool = False,
    vehicle_id: str = "veh-scenario",
    start: datetime = DEFAULT_START,
) -> pl.DataFrame:
    """A straight drive at constant speed over ``distance_km``, one fix per second."""
    if speed_kmh <= 0 or distance_km <= 0:
        raise ValueError("straight_drive needs a positive speed_kmh and distance_km")
    v = speed_kmh / 3.6
    t = np.arange(int(np.floor(distance_km * 1000.0 / v)) + 1, dtype=np.float64)
    heading = np.full(len(t), np.deg2rad(heading_deg))
    travelled = v * t
    return _pings(
        t,
        travelled * np.sin(heading),
        travelled * np.cos(heading),
        heading,
        np.full(len(t), v),
        np.zeros(len(t)),
        _profile(profile),
        seed,
        speed_limit_mps=speed_limit_mps,
        urban=urban,
        vehicle_id=vehicle_id,
        start=start,
    )


def constant_turn(
    speed_kmh: float,
    lateral_g: float,
    turn_deg: float,
    profile: GpsProfile | str,
    seed: int,
    *,
    speed_limit_mps: float | None = None,
    heading_deg: float = 30.0,
    lead_s: float = 30.0,
    urban: bool = False,
    vehicle_id: str = "veh-scenario",
    start: datetime = DEFAULT_START,
) -> pl.DataFrame:
    """A straight lead-in of ``lead_s``, a turn by ``turn_deg`` at constant speed with
    lateral acceleration ``lateral_g × 9.81`` m/s², then a straight lead-out of ``lead_s``.

    Positive ``turn_deg`` turns left (course decreases), as positive lateral acceleration
    is to the left in the ping contract; negative turns right.
    """
    if speed_kmh <= 0 or lateral_g <= 0 or turn_deg == 0 or lead_s < 0:
        raise ValueError(
            "constant_turn needs a positive speed_kmh and lateral_g, a non-zero turn_deg "
            "and a lead_s of at least 0"
        )
    v = speed_kmh / 3.6
    accel = lateral_g * G_MPS2
    side = 1.0 if turn_deg > 0 else -1.0
    rate = side * accel / v  # rad/s, left positive
    turn_s = abs(np.deg2rad(turn_deg)) / abs(rate)
    t = np.arange(int(np.floor(2.0 * lead_s + turn_s)) + 1, dtype=np.float64)
    h0 = np.deg2rad(heading_deg)
    h1 = h0 - rate * turn_s
    # Position at the turn's start and end, then each phase in closed form.
    in_turn = np.clip(t - lead_s, 0.0, turn_s)
    before = np.minimum(t, lead_s)
    after = np.maximum(t - lead_s - turn_s, 0.0)
    heading = h0 - rate * in_turn
    east = (
        v * before * np.sin(h0)
        + (v / rate) * (np.cos(heading) - np.cos(h0))
        + v * after * np.sin(h1)
    )
    north = (
        v * before * np.cos(h0)
        - (v / rate) * (np.sin(heading) - np.sin(h0))
        + v * after * np.cos(h1)
    )
    turning = (t > lead_s) & (t < lead_s + turn_s)
    return _pings(
        t,
        east,
        north,
        heading,
        np.full(len(t), v),
        np.where(turning, side * accel, 0.0),
        _profile(profile),
        seed,
        speed_limit_mps=speed_limit_mps,
        urban=urban,
        vehicle_id=vehicle_id,
        start=start,
    )


def hard_stop(
    speed_kmh: float,
    decel_mps2: float,
    profile: GpsProfile | str,
    seed: int,
    *,
    lead_s: float = 30.0,
    standstill_s: float = 10.0,
    heading_deg: float = 30.0,
    vehicle_id: str = "veh-scenario",
    start: datetime = DEFAULT_START,
) -> pl.DataFrame:
    """A straight drive at constant speed for ``lead_s``, one braking at a constant
    ``decel_mps2`` to a standstill, then ``standstill_s`` standing: one hard brake when
    the deceleration is beyond the threshold, none otherwise."""
    if speed_kmh <= 0 or decel_mps2 <= 0 or lead_s < 0 or standstill_s < 0:
        raise ValueError(
            "hard_stop needs a positive speed_kmh and decel_mps2, and a lead_s and "
            "standstill_s of at least 0"
        )
    v = speed_kmh / 3.6
    brake_s = v / decel_mps2
    t = np.arange(int(np.floor(lead_s + brake_s + standstill_s)) + 1, dtype=np.float64)
    braking = np.clip(t - lead_s, 0.0, brake_s)
    speed = v - decel_mps2 * braking
    travelled = v * np.minimum(t, lead_s) + v * braking - 0.5 * decel_mps2 * braking**2
    heading = np.full(len(t), np.deg2rad(heading_deg))
    in_brake = (t > lead_s) & (t < lead_s + brake_s)
    return _pings(
        t,
        travelled * np.sin(heading),
        travelled * np.cos(heading),
        heading,
        speed,
        np.zeros(len(t)),
        _profile(profile),
        seed,
        speed_limit_mps=None,
        urban=False,
        vehicle_id=vehicle_id,
        start=start,
        accel_long_mps2=np.where(in_brake, -decel_mps2, 0.0),
    )


def _profile(profile: GpsProfile | str) -> GpsProfile:
    if isinstance(profile, GpsProfile):
        return profile
    if profile not in GPS_PROFILES:
        raise ValueError(f"unknown GPS profile {profile!r}; use one of {sorted(GPS_PROFILES)}")
    return GPS_PROFILES[profile]


def _pings(
    t: np.ndarray,
    east_m: np.ndarray,
    north_m: np.ndarray,
    course_rad: np.ndarray,
    speed_mps: np.ndarray,
    accel_lat_mps2: np.ndarray,
    profile: GpsProfile,
    seed: int,
    *,
    speed_limit_mps: float | None,
    urban: bool,
    vehicle_id: str,
    start: datetime,
    accel_long_mps2: np.ndarray | None = None,
) -> pl.DataFrame:
    rng = np.random.default_rng([seed, 0x5CE9A])
    n = len(t)
    track = TrueTrack(
        trip=np.zeros(n, np.int64),
        step=t.astype(np.int64),
        east_m=east_m,
        north_m=north_m,
        course_rad=course_rad,
        speed_mps=speed_mps,
        urban=np.full(n, urban),
    )
    fixes = report_fixes(rng, track, [profile])
    if profile.has_imu:
        bias = rng.normal(0.0, profile.imu_bias_sigma_mps2, 2)
        # Without a given one, constant speed: the true longitudinal acceleration is zero.
        true_long = np.zeros(n) if accel_long_mps2 is None else accel_long_mps2
        accel_long, accel_lat = report_imu(
            rng, profile, true_long, accel_lat_mps2, bias[:1], bias[1:]
        )
    else:
        accel_long = accel_lat = np.full(n, np.nan)
    lat, lon = to_wgs84(ORIGIN_LAT, ORIGIN_LON, fixes.east_m, fixes.north_m)
    start_us = int(start.astimezone(UTC).timestamp() * 1_000_000)
    kept = fixes.reported
    limit = np.full(n, np.nan if speed_limit_mps is None else speed_limit_mps)
    frame = pl.DataFrame(
        {
            "ts": pl.Series(start_us + t[kept].astype(np.int64) * 1_000_000).cast(_UTC_US),
            "vehicle_id": vehicle_id,
            "driver_id": vehicle_id,
            "trip_id": f"{vehicle_id}-t0001",
            "lat": lat[kept],
            "lon": lon[kept],
            "speed_mps": fixes.speed_mps[kept],
            "heading_deg": fixes.course_deg[kept],
            "accel_long_mps2": pl.Series(accel_long[kept], nan_to_null=True),
            "accel_lat_mps2": pl.Series(accel_lat[kept], nan_to_null=True),
            "speed_limit_mps": pl.Series(limit[kept], nan_to_null=True),
            "fleet_id": "fleet-scenario",
            "client_id": "fleet-scenario-client-0",
        }
    )
    return conform_pings(frame)
