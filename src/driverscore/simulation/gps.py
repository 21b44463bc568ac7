"""What a GPS device reports of a true trajectory: the one noise model of the simulator.

A device class is a :class:`GpsProfile`; :data:`PHONE` (a smartphone app, GPS only) and
:data:`TRACKER` (a hard-wired tracker with a roof or dashboard antenna and an IMU) are the
two the simulator uses. Per 1 Hz fix the device reports:

- **position**: the true position plus an error that is an AR(1) process per axis
  (stationary σ ``position_sigma_m``, 1-s autocorrelation ``position_rho``: errors from the
  atmosphere, orbits and multipath drift over tens of seconds, they are not white), plus,
  on urban roads only, rare **multipath jumps** (a constant offset of tens of metres for a
  few seconds, the reflection off a building taking over);
- **speed**: Doppler speed, the true speed plus white noise ``speed_sigma_mps``, never
  negative;
- **course**: the Doppler course, true course plus an AR(1) error whose σ is
  ``sqrt(course_floor² + (speed_sigma / v)²)``: a velocity error of fixed size turns the
  course by more as the speed falls; the floor is what remains at speed (the receiver's
  and, on phones, the location provider's filtering). Rare **course glitches** add a few
  seconds of an offset of tens of degrees;
- **dropouts**: runs of fixes that are never sent (tunnels, urban canyons, a device busy).

Every random number is drawn per fix in an order that depends on the trajectory only,
never on the profiles, so a trip whose device changes class does not change the noise of
any other trip (a drift that starts on day N leaves the days before it identical).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from driverscore.simulation.spans import span_rows

#: Metres per degree of latitude (and of longitude at the equator), spherical earth.
METRES_PER_DEGREE: Final = 111_195.0
#: Below this speed the Doppler course is not divided by less (m/s): it is noise anyway.
_COURSE_MIN_SPEED_MPS: Final = 0.5
#: Course glitches only happen while moving (m/s).
_GLITCH_MIN_SPEED_MPS: Final = 2.0
#: A dropout never takes the first nor the last fixes of a trip (the trip keeps its ends).
_DROPOUT_FIRST_STEP: Final = 5
_DROPOUT_LAST_KEPT: Final = 5


class GpsProfile(BaseModel):
    """Noise figures of one device class (see ``docs/simulator.md`` for their sources)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Device class, as it appears in the docs and tests.")
    position_sigma_m: float = Field(
        ge=0, description="Stationary standard deviation of the position error per axis (m)."
    )
    position_rho: float = Field(
        ge=0, lt=1, description="Autocorrelation of the position error over 1 s."
    )
    speed_sigma_mps: float = Field(
        ge=0, description="Standard deviation of the Doppler speed error (m/s)."
    )
    course_floor_deg: float = Field(
        ge=0, description="Standard deviation of the course error at high speed (degrees)."
    )
    course_rho: float = Field(
        ge=0, lt=1, description="Autocorrelation of the course error over 1 s."
    )
    course_glitch_per_h: float = Field(
        ge=0, description="Course glitches per hour of moving (events/h)."
    )
    course_glitch_min_deg: float = Field(ge=0, description="Smallest glitch offset (degrees).")
    course_glitch_max_deg: float = Field(ge=0, description="Largest glitch offset (degrees).")
    course_glitch_max_s: int = Field(ge=1, description="Longest glitch (s); the shortest is 1 s.")
    multipath_per_h: float = Field(
        ge=0, description="Multipath position jumps per hour of urban driving (events/h)."
    )
    multipath_min_m: float = Field(ge=0, description="Smallest multipath jump (m).")
    multipath_max_m: float = Field(ge=0, description="Largest multipath jump (m).")
    multipath_min_s: int = Field(ge=1, description="Shortest multipath jump (s).")
    multipath_max_s: int = Field(ge=1, description="Longest multipath jump (s).")
    dropout_per_h: float = Field(ge=0, description="Dropouts per hour of driving (events/h).")
    dropout_min_s: int = Field(ge=1, description="Shortest dropout (fixes missing).")
    dropout_max_s: int = Field(ge=1, description="Longest dropout (fixes missing).")
    has_imu: bool = Field(description="The device reports longitudinal and lateral acceleration.")
    imu_sigma_mps2: float = Field(
        ge=0, description="Standard deviation of the accelerometer noise per fix (m/s²)."
    )
    imu_bias_sigma_mps2: float = Field(
        ge=0, description="Standard deviation of the per-vehicle mount bias per axis (m/s²)."
    )


#: A smartphone app, GPS only. Position: GPS.gov (smartphones typically within 4.9 m under
#: open sky). Course floor and glitches: calibrated so that the 1-s heading-step cornering
#: rule finds 30-40 harsh corners per 100 km on a straight drive at 120 km/h, as it does on
#: real phone trips driven calmly on motorways (issue 15).
PHONE: Final = GpsProfile(
    name="phone",
    position_sigma_m=4.5,
    position_rho=0.95,
    speed_sigma_mps=0.2,
    course_floor_deg=1.68,
    course_rho=0.3,
    course_glitch_per_h=2.0,
    course_glitch_min_deg=10.0,
    course_glitch_max_deg=40.0,
    course_glitch_max_s=3,
    multipath_per_h=6.0,
    multipath_min_m=15.0,
    multipath_max_m=50.0,
    multipath_min_s=3,
    multipath_max_s=10,
    dropout_per_h=2.4,
    dropout_min_s=2,
    dropout_max_s=8,
    has_imu=False,
    imu_sigma_mps2=0.0,
    imu_bias_sigma_mps2=0.0,
)

#: A hard-wired tracker: u-blox M8-class receiver (2.5 m CEP, 0.05 m/s speed and 0.3°
#: heading accuracy at 50 %, from its data sheet) with an external antenna, and an IMU.
TRACKER: Final = GpsProfile(
    name="tracker",
    position_sigma_m=2.5,
    position_rho=0.97,
    speed_sigma_mps=0.08,
    course_floor_deg=0.4,
    course_rho=0.3,
    course_glitch_per_h=0.2,
    course_glitch_min_deg=5.0,
    course_glitch_max_deg=20.0,
    course_glitch_max_s=2,
    multipath_per_h=2.0,
    multipath_min_m=10.0,
    multipath_max_m=30.0,
    multipath_min_s=2,
    multipath_max_s=6,
    dropout_per_h=1.0,
    dropout_min_s=2,
    dropout_max_s=6,
    has_imu=True,
    imu_sigma_mps2=0.2,
    imu_bias_sigma_mps2=0.12,
)

GPS_PROFILES: Final[dict[str, GpsProfile]] = {PHONE.name: PHONE, TRACKER.name: TRACKER}


@dataclass(frozen=True)
class TrueTrack:
    """The true motion at each 1 Hz fix.

    Fixes of a trip are contiguous and in time order, one second apart (``step`` 0, 1, 2,
    ...); trips are numbered 0, 1, 2, ... in row order.
    """

    trip: np.ndarray
    step: np.ndarray
    #: Local metres from the trip's origin.
    east_m: np.ndarray
    north_m: np.ndarray
    #: Course, radians clockwise from north.
    course_rad: np.ndarray
    speed_mps: np.ndarray
    #: The fix is on a city road (multipath jumps happen there only).
    urban: np.ndarray


@dataclass(frozen=True)
class DeviceFixes:
    """What the device reports at each fix of the track (the dropped fixes included)."""

    east_m: np.ndarray
    north_m: np.ndarray
    speed_mps: np.ndarray
    #: Course over ground, degrees clockwise from north, in [0, 360).
    course_deg: np.ndarray
    #: False for fixes lost in a dropout.
    reported: np.ndarray


def report_fixes(
    rng: np.random.Generator,
    track: TrueTrack,
    profiles: Sequence[GpsProfile],
    device: np.ndarray | None = None,
) -> DeviceFixes:
    """Turn a true track into the fixes its devices report.

    ``device`` gives, per trip, the index into ``profiles`` of the device that recorded
    it (a device does not change class within a trip); ``None`` means ``profiles[0]``
    for every trip.
    """
    n = len(track.trip)
    samples = np.bincount(track.trip).astype(np.int64) if n else np.zeros(0, np.int64)
    n_trips = len(samples)
    kind = np.zeros(n_trips, np.int64) if device is None else np.asarray(device, np.int64)
    table = _profile_table(profiles)
    trip_par = table[:, kind]  # (field, trip)

    def per_fix(field: int) -> np.ndarray | np.float64:
        # One profile for every trip (scenarios, single-class fleets): a scalar, no gather.
        # Double precision either way, so a fix's value does not depend on the other trips.
        values = trip_par[field]
        if n == 0 or (values == values[0]).all():
            return np.float64(values[0] if len(values) else 0.0)
        return np.asarray(values[track.trip], np.float64)

    # Unit-variance AR(1) errors: east, north, course.
    rho = np.stack([trip_par[_POS_RHO], trip_par[_POS_RHO], trip_par[_COURSE_RHO]])
    unit = _ar1(rng, rho, samples, track.trip, track.step)
    speed_noise = rng.standard_normal(n, np.float32)
    start_draw = rng.random(n)
    # Per fix, though only an event's first fix reads them: the parameters a fix gets do
    # not depend on how many events start elsewhere.
    param_a = rng.random(n, np.float32)
    param_b = rng.random(n, np.float32)

    position_sigma = per_fix(_POS_SIGMA)
    speed_sigma = per_fix(_SPEED_SIGMA)
    east = track.east_m + position_sigma * unit[0]
    north = track.north_m + position_sigma * unit[1]
    speed = np.abs(track.speed_mps + speed_sigma * speed_noise)
    course_sigma = np.hypot(
        np.deg2rad(per_fix(_COURSE_FLOOR)),
        speed_sigma / np.maximum(track.speed_mps, _COURSE_MIN_SPEED_MPS),
    )
    course = track.course_rad + course_sigma * unit[2]

    # One uniform per fix decides which event (if any) starts there: the three hazards are
    # tiny, so treating them as exclusive changes nothing measurable; the position of the
    # draw inside its event's slice is itself uniform and sets the event's length. Only
    # fixes under the highest total hazard of the profiles can start one: a bound set by
    # the profiles offered, not by which trip has which, so the draws stay independent
    # of the devices.
    bound = float(table[[_GLITCH_RATE, _MULTIPATH_RATE, _DROPOUT_RATE]].sum(axis=0).max(initial=0))
    candidate = np.flatnonzero(start_draw < bound / 3600.0)
    param_a, param_b = param_a[candidate], param_b[candidate]
    draw = start_draw[candidate]
    par = trip_par[:, track.trip[candidate]]  # (field, candidate)
    end_of_trip = np.cumsum(samples)
    trip_end = end_of_trip[track.trip[candidate]]
    step = track.step[candidate]
    p_glitch = np.where(
        track.speed_mps[candidate] >= _GLITCH_MIN_SPEED_MPS, par[_GLITCH_RATE] / 3600.0, 0.0
    )
    p_multipath = np.where(track.urban[candidate], par[_MULTIPATH_RATE] / 3600.0, 0.0)
    p_dropout = np.where(
        (step >= _DROPOUT_FIRST_STEP) & (trip_end - candidate > _DROPOUT_LAST_KEPT),
        par[_DROPOUT_RATE] / 3600.0,
        0.0,
    )
    low = np.zeros(len(candidate))
    spans: list[tuple[np.ndarray, np.ndarray]] = []
    for p in (p_glitch, p_multipath, p_dropout):
        hit = np.flatnonzero((draw >= low) & (draw < low + p))
        spans.append((hit, (draw[hit] - low[hit]) / p[hit]))
        low = low + p

    hit, within = spans[0]
    length = 1 + np.floor(within * par[_GLITCH_MAX_S, hit]).astype(np.int64)
    size = _between(param_a[hit], par[_GLITCH_MIN_DEG, hit], par[_GLITCH_MAX_DEG, hit])
    sign = np.where(param_b[hit] < 0.5, -1.0, 1.0)
    rows, span = span_rows(candidate[hit], np.minimum(candidate[hit] + length, trip_end[hit]))
    np.add.at(course, rows, np.deg2rad(sign * size)[span])

    hit, within = spans[1]
    length = _length(within, par[_MULTIPATH_MIN_S, hit], par[_MULTIPATH_MAX_S, hit])
    size = _between(param_a[hit], par[_MULTIPATH_MIN_M, hit], par[_MULTIPATH_MAX_M, hit])
    bearing = 2.0 * np.pi * param_b[hit]
    rows, span = span_rows(candidate[hit], np.minimum(candidate[hit] + length, trip_end[hit]))
    np.add.at(east, rows, (size * np.sin(bearing))[span])
    np.add.at(north, rows, (size * np.cos(bearing))[span])

    hit, within = spans[2]
    length = _length(within, par[_DROPOUT_MIN_S, hit], par[_DROPOUT_MAX_S, hit])
    rows, _ = span_rows(
        candidate[hit], np.minimum(candidate[hit] + length, trip_end[hit] - _DROPOUT_LAST_KEPT)
    )
    reported = np.ones(n, bool)
    reported[rows] = False

    course_deg = np.rad2deg(course) % 360.0
    # x % 360 of a tiny negative x is 360.0 in floating point.
    course_deg = np.where(course_deg >= 360.0, 0.0, course_deg)
    return DeviceFixes(
        east_m=east,
        north_m=north,
        speed_mps=speed,
        course_deg=course_deg,
        reported=reported,
    )


def report_imu(
    rng: np.random.Generator,
    profile: GpsProfile,
    accel_long_mps2: np.ndarray,
    accel_lat_mps2: np.ndarray,
    bias_long_mps2: np.ndarray,
    bias_lat_mps2: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Accelerometer readings: truth plus the vehicle's mount bias plus white noise."""
    noise = rng.standard_normal((2, len(accel_long_mps2)), np.float32)
    return (
        accel_long_mps2 + bias_long_mps2 + profile.imu_sigma_mps2 * noise[0],
        accel_lat_mps2 + bias_lat_mps2 + profile.imu_sigma_mps2 * noise[1],
    )


def to_wgs84(
    lat0_deg: np.ndarray | float,
    lon0_deg: np.ndarray | float,
    east_m: np.ndarray,
    north_m: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude of local metres from an origin (flat earth: trips are small)."""
    lat = lat0_deg + north_m / METRES_PER_DEGREE
    lon = lon0_deg + east_m / (METRES_PER_DEGREE * np.cos(np.deg2rad(lat0_deg)))
    return np.asarray(lat, np.float64), np.asarray(lon, np.float64)


# Rows of the per-profile parameter table.
(
    _POS_SIGMA,
    _POS_RHO,
    _SPEED_SIGMA,
    _COURSE_FLOOR,
    _COURSE_RHO,
    _GLITCH_RATE,
    _GLITCH_MIN_DEG,
    _GLITCH_MAX_DEG,
    _GLITCH_MAX_S,
    _MULTIPATH_RATE,
    _MULTIPATH_MIN_M,
    _MULTIPATH_MAX_M,
    _MULTIPATH_MIN_S,
    _MULTIPATH_MAX_S,
    _DROPOUT_RATE,
    _DROPOUT_MIN_S,
    _DROPOUT_MAX_S,
) = range(17)


def _profile_table(profiles: Sequence[GpsProfile]) -> np.ndarray:
    return np.array(
        [
            [
                p.position_sigma_m,
                p.position_rho,
                p.speed_sigma_mps,
                p.course_floor_deg,
                p.course_rho,
                p.course_glitch_per_h,
                p.course_glitch_min_deg,
                p.course_glitch_max_deg,
                p.course_glitch_max_s,
                p.multipath_per_h,
                p.multipath_min_m,
                p.multipath_max_m,
                p.multipath_min_s,
                p.multipath_max_s,
                p.dropout_per_h,
                p.dropout_min_s,
                p.dropout_max_s,
            ]
            for p in profiles
        ],
        dtype=np.float64,
    ).T


def _between(u: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return np.asarray(low + (high - low) * u, np.float64)


def _length(within: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Whole seconds uniform in [low, high] from a uniform in [0, 1)."""
    return np.asarray(low + np.floor(within * (high - low + 1.0)), np.int64)


def _ar1(
    rng: np.random.Generator,
    rho: np.ndarray,
    samples: np.ndarray,
    trip: np.ndarray,
    step: np.ndarray,
) -> np.ndarray:
    """Stationary unit-variance AR(1) series, independent per trip, for each row of ``rho``.

    ``rho`` is (series, trips). The recursion runs over the steps of all trips at once:
    rows are laid out step-major with trips longest first, so the trips still running at
    a step are a leading slice of it, and each step is a few operations on contiguous
    slices. Returns (series, fixes) in the track's (trip-major) order.
    """
    n_series = rho.shape[0]
    n = int(samples.sum())
    if n == 0:
        return np.zeros((n_series, 0))
    rank_order = np.argsort(-samples, kind="stable")
    rank = np.empty_like(rank_order)
    rank[rank_order] = np.arange(len(samples))
    longest = int(samples.max())
    # Trips still running at each step, and where each step's slice starts.
    active = len(samples) - np.searchsorted(np.sort(samples), np.arange(longest), side="right")
    offset = np.cumsum(active) - active
    position = offset[step] + rank[trip]

    innovation = rng.standard_normal((n_series, n))
    rho_ranked = rho[:, rank_order]
    # Step 0 is a stationary draw; later innovations keep the variance at 1.
    x = innovation
    scale = np.sqrt(1.0 - rho_ranked**2)
    for k in range(1, longest):
        m = int(active[k])
        lo, prev = int(offset[k]), int(offset[k - 1])
        x[:, lo : lo + m] = (
            rho_ranked[:, :m] * x[:, prev : prev + m] + scale[:, :m] * x[:, lo : lo + m]
        )
    return np.asarray(x[:, position])
