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
curvature, and lateral acceleration is ``v² κ``. Everything here is the true motion: what
the devices report of it is :mod:`driverscore.simulation.gps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from driverscore.simulation.routes import Routes, TripDrivers

#: Tyre-road limit of braking (m/s²).
MAX_DECEL_MPS2: Final = 8.5
#: Throttle noise autocorrelation over 1 s.
THROTTLE_RHO: Final = 0.7
#: A trip that has not parked after this many seconds is ended (a safety net).
MAX_TRIP_S: Final = 6 * 3600

# Rows of the packed per-trip state, so compaction is a single take. Per-trip constants
# and the fields of the trip's current segment travel with the state: a segment's fields
# are gathered only when a trip enters it, not every second.
_S, _V, _A, _THETA, _X, _Y, _DWELL, _EMT, _EMA, _EMDONE, _THR, _ODO = range(12)
_FIN, _PARKED, _LAG, _THR_SIGMA, _POWER = range(12, 17)
_SEG: Final = 17
# Rows of the segment table (offset by _SEG in the state).
_LEN, _KAPPA, _LIMIT, _TARGET, _END, _GAP = 0, 1, 2, 3, 4, 7  # _END, _GAP: 3 rows each
_STOP, _DWELL_AT_END, _BRAKE, _ACCEL, _EM_AT, _EM_A, _EM_S, _IS_LAST = range(10, 18)
_N_STATE: Final = _SEG + 18
#: Parked trips are dropped from the active set once they are this share of it.
_COMPACT_SHARE: Final = 0.04


@dataclass(frozen=True)
class Trajectories:
    """1 Hz samples of all trips of a chunk, ordered by trip then second."""

    trip: np.ndarray
    step: np.ndarray
    speed_mps: np.ndarray
    accel_long_mps2: np.ndarray
    accel_lat_mps2: np.ndarray
    #: True position in local metres (east, north) from the trip's start.
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
    table = np.stack(
        [
            routes.length_m,
            routes.curvature,
            routes.limit_mps,
            routes.target_mps,
            *routes.end_mps,
            *routes.end_gap_m,
            routes.stop_at_end,
            routes.dwell_s,
            routes.brake_mps2,
            routes.accel_mps2,
            routes.emergency_at_m,
            routes.emergency_mps2,
            routes.emergency_s,
            np.isin(np.arange(len(routes.trip)), routes.last),
        ]
    ).astype(np.float64)
    trip = np.arange(n_trips)
    seg = routes.first.copy()
    state = np.zeros((_N_STATE, n_trips))
    state[_SEG:] = table[:, seg]
    state[_THETA] = start_heading_rad
    state[_DWELL] = rng.uniform(3.0, 25.0, n_trips)  # engine on, belt, mirrors
    # Aggressive drivers react faster; less smooth ones add more throttle noise.
    state[_LAG] = 0.5 + 0.4 * drivers.aggressiveness
    state[_THR_SIGMA] = 0.05 + 0.45 * (1.0 - drivers.smoothness)
    state[_POWER] = drivers.power_per_kg
    throttle_innovation = np.sqrt(1.0 - THROTTLE_RHO**2)

    recorded: list[np.ndarray] = []
    recorded_trip: list[np.ndarray] = []
    distance_m = np.zeros(n_trips)
    samples = np.zeros(n_trips, np.int64)

    step = 0
    parked_count = 0
    while len(trip) > 0:
        tab = state[_SEG:]
        s, v, a, theta = state[_S], state[_V], state[_A], state[_THETA]
        kappa = tab[_KAPPA]
        recorded_trip.append(trip)
        recorded.append(
            np.stack(
                [
                    v,
                    a,
                    v * v * kappa,
                    state[_X],
                    state[_Y],
                    theta,
                    tab[_LIMIT],
                ],
                dtype=np.float32,
            )
        )

        length = tab[_LEN]
        d_rem = length - s
        stop_end = tab[_STOP] > 0.0
        # Brake when, for this segment's end or one of the next two, the deceleration needed
        # one second from now at this speed reaches the driver's preference.
        distance = d_rem + tab[_GAP : _GAP + 3]
        v_end = tab[_END : _END + 3]
        excess = v * v - v_end * v_end
        d_next = distance - v
        trigger = (excess > 0.0) & (
            (d_next <= 0.5) | (excess >= 2.0 * tab[_BRAKE] * np.maximum(d_next, 0.1))
        )
        # Spread over at least half a second of travel: a slight overspeed right at the end of
        # a segment is eased off, not braked away at the tyre limit.
        floor = np.maximum(0.5 * v, 0.1)
        need = np.max(np.where(trigger, excess / (2.0 * np.maximum(distance, floor)), 0.0), axis=0)
        brake = trigger.any(axis=0)
        thr = THROTTLE_RHO * state[_THR] + throttle_innovation * rng.standard_normal(len(trip))
        state[_THR] = thr
        a_max = np.minimum(tab[_ACCEL], state[_POWER] / np.maximum(v, 2.0))
        a_cmd = np.clip(0.6 * (tab[_TARGET] - v), -1.5, a_max)
        a_cmd += state[_THR_SIGMA] * thr * (v > 1.0)
        a_new = np.where(brake, -np.minimum(need, MAX_DECEL_MPS2), a + state[_LAG] * (a_cmd - a))

        surprise = (state[_EMDONE] == 0.0) & (s >= tab[_EM_AT]) & (v > 6.0)
        if surprise.any():
            state[_EMT] = np.where(surprise, tab[_EM_S], state[_EMT])
            state[_EMA] = np.where(surprise, tab[_EM_A], state[_EMA])
            state[_EMDONE] = np.where(surprise, 1.0, state[_EMDONE])
        in_emergency = state[_EMT] > 0.0
        a_new = np.where(in_emergency, -state[_EMA], a_new)
        state[_EMT] -= in_emergency

        dwelling = state[_DWELL] > 0.0
        a_new = np.where(dwelling, 0.0, a_new)
        state[_DWELL] -= dwelling

        v_raw = v + a_new
        v_new = np.maximum(v_raw, 0.0)
        # Stopping within the second covers v²/2|a|, not the trapezoid.
        ds = np.where(v_raw < 0.0, v * v / (2.0 * np.maximum(-a_new, 1e-6)), 0.5 * (v + v_new))

        is_last = tab[_IS_LAST] > 0.0
        finishing = state[_FIN] > 0.0
        # A parked or waiting vehicle has already arrived at its line.
        crossing = (ds >= d_rem - 0.05 * stop_end) & ~dwelling & ~finishing
        # Only a vehicle that is all but stopped halts at the line; snapping a faster one to
        # zero would fake a hard brake in the 1 Hz speed series.
        halted = crossing & stop_end & (v_new <= 1.0)
        # Past a stop line too fast: run the light; past the last one: keep braking.
        ds = np.where(halted, np.maximum(d_rem, 0.0), ds)
        v_new = np.where(halted, 0.0, v_new)
        state[_DWELL] = np.where(halted, tab[_DWELL_AT_END], state[_DWELL])
        advance = crossing & ~is_last & (halted | ~stop_end)

        theta_mid = theta - 0.5 * ds * kappa
        state[_THETA] = theta - ds * kappa
        state[_X] += ds * np.sin(theta_mid)
        state[_Y] += ds * np.cos(theta_mid)
        state[_ODO] += ds
        state[_V] = v_new
        state[_A] = np.where(dwelling, 0.0, a_new)
        state[_S] = np.where(advance, np.where(halted, 0.0, s + ds - length), s + ds)
        state[_EMDONE] *= ~advance
        if advance.any():
            moved = np.flatnonzero(advance)
            seg[moved] += 1
            state[_SEG:, moved] = table[:, seg[moved]]
            # A long step can cross a short arc entirely.
            seg_row = state[_SEG:, moved]
            again = moved[(state[_S, moved] >= seg_row[_LEN]) & (seg_row[_IS_LAST] == 0.0)]
            if len(again):
                state[_S, again] -= state[_SEG + _LEN, again]
                seg[again] += 1
                state[_SEG:, again] = table[:, seg[again]]

        finishing |= halted & is_last
        state[_FIN] = finishing
        done = finishing & (state[_DWELL] <= 0.0) & (state[_PARKED] == 0.0)
        step += 1
        if step >= MAX_TRIP_S:
            done = state[_PARKED] == 0.0
        if done.any():
            ended = trip[done]
            distance_m[ended] = state[_ODO, done]
            samples[ended] = step
            # Parked trips wait (v = 0) until the next compaction; their extra samples are
            # dropped below.
            state[_PARKED, done] = 1.0
            state[_DWELL, done] = np.inf
            parked_count += int(done.sum())
        if parked_count >= min(max(16.0, _COMPACT_SHARE * len(trip)), len(trip)):
            keep = np.flatnonzero(state[_PARKED] == 0.0)
            trip, seg, state = trip[keep], seg[keep], np.take(state, keep, axis=1)
            parked_count = 0

    trip_all = np.concatenate(recorded_trip)
    steps = np.repeat(np.arange(len(recorded_trip)), [len(t) for t in recorded_trip])
    values = np.concatenate(recorded, axis=1)
    offset = np.cumsum(samples) - samples
    valid = np.flatnonzero(steps < samples[trip_all])
    order = np.empty(len(valid), np.int64)
    order[offset[trip_all[valid]] + steps[valid]] = valid
    # Row by row: a take along the long axis of a 2-D array is far slower.
    values = np.stack([np.take(row, order) for row in values])
    # Single precision is plenty for 1 Hz samples (mm in position over tens of km).
    return Trajectories(
        trip=np.repeat(np.arange(n_trips), samples),
        step=np.arange(len(order)) - np.repeat(offset, samples),
        speed_mps=values[0],
        accel_long_mps2=values[1],
        accel_lat_mps2=values[2],
        east_m=values[3],
        north_m=values[4],
        heading_rad=values[5],
        speed_limit_mps=values[6],
        samples=samples,
        distance_m=distance_m,
    )
