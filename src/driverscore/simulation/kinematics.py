"""Second-by-second driving of every trip of a chunk, in lockstep.

All trips start at trip-local second 0 and advance together; a trip leaves the active set
when it has parked, so the arrays shrink as the chunk runs. Per second and per trip the
driver:

- waits while dwelling at a stop (red light, stop sign, start and end of the trip);
- brakes when the deceleration needed to reach the segment's end speed, ``(v² − v_end²)
  / 2d``, reaches the deceleration the driver brakes with on this approach;
- otherwise tracks the segment's target speed, with acceleration capped by the driver's
  preference and by the vehicle's power (``P/m / v``), through a first-order lag
  (aggressive drivers react faster) plus throttle noise (less smooth drivers more);
- brakes at 4.5–8.5 m/s² for 1–3 s when a surprise occurs.

Position integrates in local metres (east, north); heading follows the segment's
curvature, and lateral acceleration is ``v² κ``. GPS position error is an AR(1) process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from driverscore.simulation.routes import Routes, TripDrivers

#: Tyre-road limit of braking (m/s²).
MAX_DECEL_MPS2: Final = 8.5
#: GPS position error: stationary std (m) and 1 s autocorrelation.
GPS_SIGMA_M: Final = 3.0
GPS_RHO: Final = 0.95
#: Throttle noise autocorrelation over 1 s.
THROTTLE_RHO: Final = 0.7
#: A trip that has not parked after this many seconds is ended (a safety net).
MAX_TRIP_S: Final = 6 * 3600

# Rows of the packed state, so compaction is a single fancy index.
_S, _V, _A, _THETA, _X, _Y, _DWELL, _EMT, _EMA, _EMDONE, _THR, _GX, _GY, _ODO = range(14)
_N_STATE: Final = 14


@dataclass(frozen=True)
class Trajectories:
    """1 Hz samples of all trips of a chunk, ordered by trip then second."""

    trip: np.ndarray
    step: np.ndarray
    speed_mps: np.ndarray
    accel_long_mps2: np.ndarray
    accel_lat_mps2: np.ndarray
    #: Position in local metres (east, north) from the trip's start, with GPS error.
    east_m: np.ndarray
    north_m: np.ndarray
    #: True course, radians clockwise from north.
    heading_rad: np.ndarray
    speed_limit_mps: np.ndarray
    #: Per trip: samples and distance driven (m).
    samples: np.ndarray
    distance_m: np.ndarray


def drive(
    rng: np.random.Generator,
    routes: Routes,
    drivers: TripDrivers,
    start_heading_rad: np.ndarray,
) -> Trajectories:
    """Drive every trip from its first segment until it has parked after the last."""
    n_trips = len(routes.first)
    trip = np.arange(n_trips)
    seg = routes.first.copy()
    last = routes.last
    state = np.zeros((_N_STATE, n_trips))
    state[_THETA] = start_heading_rad
    state[_DWELL] = rng.uniform(3.0, 25.0, n_trips)  # engine on, belt, mirrors
    state[_GX] = rng.normal(0.0, GPS_SIGMA_M, n_trips)
    state[_GY] = rng.normal(0.0, GPS_SIGMA_M, n_trips)
    finishing = np.zeros(n_trips, bool)

    agg = drivers.aggressiveness
    lag = 0.5 + 0.4 * agg
    throttle_sigma = 0.05 + 0.45 * (1.0 - drivers.smoothness)
    power = drivers.power_per_kg
    gps_innovation = GPS_SIGMA_M * np.sqrt(1.0 - GPS_RHO**2)
    throttle_innovation = np.sqrt(1.0 - THROTTLE_RHO**2)

    recorded: list[np.ndarray] = []
    recorded_trip: list[np.ndarray] = []
    distance_m = np.zeros(n_trips)
    samples = np.zeros(n_trips, np.int64)

    step = 0
    while len(trip) > 0:
        s, v, a, theta = state[_S], state[_V], state[_A], state[_THETA]
        kappa = routes.curvature[seg]
        recorded_trip.append(trip)
        recorded.append(
            np.stack(
                [
                    v,
                    a,
                    v * v * kappa,
                    state[_X] + state[_GX],
                    state[_Y] + state[_GY],
                    theta,
                    routes.limit_mps[seg],
                ]
            ).astype(np.float32)
        )

        length = routes.length_m[seg]
        d_rem = length - s
        v_end = routes.end_mps[seg]
        stop_end = routes.stop_at_end[seg]
        excess = v * v - v_end * v_end
        need = excess / (2.0 * np.maximum(d_rem, 0.1))
        # Brake when the need, one second from now at this speed, reaches the preference.
        d_next = d_rem - v
        brake = (v > v_end) & (
            (d_next <= 0.5) | (excess >= 2.0 * routes.brake_mps2[seg] * np.maximum(d_next, 0.1))
        )
        noise = rng.standard_normal((3, len(trip)))
        state[_THR] = THROTTLE_RHO * state[_THR] + throttle_innovation * noise[0]
        a_max = np.minimum(routes.accel_mps2[seg], power[trip] / np.maximum(v, 2.0))
        a_cmd = np.clip(0.6 * (routes.target_mps[seg] - v), -1.5, a_max)
        a_cmd += throttle_sigma[trip] * state[_THR] * (v > 1.0)
        a_new = np.where(brake, -np.minimum(need, MAX_DECEL_MPS2), a + lag[trip] * (a_cmd - a))

        surprise = (state[_EMDONE] == 0.0) & (s >= routes.emergency_at_m[seg]) & (v > 6.0)
        state[_EMT] = np.where(surprise, routes.emergency_s[seg], state[_EMT])
        state[_EMA] = np.where(surprise, routes.emergency_mps2[seg], state[_EMA])
        state[_EMDONE] = np.where(surprise, 1.0, state[_EMDONE])
        in_emergency = state[_EMT] > 0.0
        a_new = np.where(in_emergency, -state[_EMA], a_new)
        state[_EMT] -= in_emergency

        dwelling = state[_DWELL] > 0.0
        a_new = np.where(dwelling, 0.0, a_new)
        state[_DWELL] -= dwelling

        v_raw = v + a_new
        v_new = np.clip(v_raw, 0.0, None)
        # Stopping within the second covers v²/2|a|, not the trapezoid.
        ds = np.where(v_raw < 0.0, v * v / (2.0 * np.maximum(-a_new, 1e-6)), 0.5 * (v + v_new))

        is_last = seg == last[trip]
        # A parked or waiting vehicle has already arrived at its line.
        crossing = (ds >= d_rem - np.where(stop_end, 0.5, 0.0)) & ~dwelling & ~finishing[trip]
        halted = crossing & stop_end & (v_new <= 2.5)
        # Past a stop line too fast: run the light; past the last one: keep braking.
        ds = np.where(halted, np.maximum(d_rem, 0.0), ds)
        v_new = np.where(halted, 0.0, v_new)
        state[_DWELL] = np.where(halted, routes.dwell_s[seg], state[_DWELL])
        parks = halted & is_last
        advance = crossing & ~is_last & (halted | ~stop_end)

        theta_mid = theta - 0.5 * ds * kappa
        state[_THETA] = theta - ds * kappa
        state[_X] += ds * np.sin(theta_mid)
        state[_Y] += ds * np.cos(theta_mid)
        state[_ODO] += ds
        state[_V] = v_new
        state[_A] = np.where(dwelling, 0.0, a_new)
        state[_S] = np.where(advance, np.where(halted, 0.0, s + ds - length), s + ds)
        state[_EMDONE] = np.where(advance, 0.0, state[_EMDONE])
        seg = seg + advance
        # A long step can cross a short arc entirely.
        again = advance & (state[_S] >= routes.length_m[seg]) & (seg != last[trip])
        if again.any():
            state[_S] = np.where(again, state[_S] - routes.length_m[seg], state[_S])
            seg = seg + again

        state[_GX] = GPS_RHO * state[_GX] + gps_innovation * noise[1]
        state[_GY] = GPS_RHO * state[_GY] + gps_innovation * noise[2]

        finishing_now = finishing[trip] | parks
        finishing[trip] = finishing_now
        done = (finishing_now & (state[_DWELL] <= 0.0)) | (step >= MAX_TRIP_S)
        step += 1
        if done.any():
            ended = trip[done]
            distance_m[ended] = state[_ODO, done]
            samples[ended] = step
            keep = ~done
            trip, seg, state = trip[keep], seg[keep], state[:, keep]

    trip_all = np.concatenate(recorded_trip)
    steps = np.repeat(np.arange(len(recorded_trip)), [len(t) for t in recorded_trip])
    values = np.concatenate(recorded, axis=1)
    offset = np.cumsum(samples) - samples
    order = np.empty(len(trip_all), np.int64)
    order[offset[trip_all] + steps] = np.arange(len(trip_all))
    values = values[:, order]
    return Trajectories(
        trip=trip_all[order],
        step=steps[order],
        speed_mps=values[0].astype(np.float64),
        accel_long_mps2=values[1].astype(np.float64),
        accel_lat_mps2=values[2].astype(np.float64),
        east_m=values[3].astype(np.float64),
        north_m=values[4].astype(np.float64),
        heading_rad=values[5].astype(np.float64),
        speed_limit_mps=values[6].astype(np.float64),
        samples=samples,
        distance_m=distance_m,
    )
