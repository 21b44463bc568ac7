"""Routes: each trip is a chain of road segments with posted limits, turns and stops.

A trip leaves a residential street, crosses a mix of urban and arterial roads (with a
highway stretch on long trips) and ends on a residential street. Straight segments end
at junctions: a stop (red light or stop sign, with a dwell time), a turn (an arc segment
of small radius, driven at curve speed), or nothing. The driver of the trip sets, per
segment, how fast they drive (speeding offset), how hard they will brake for the
segment's end, how hard they accelerate and whether a surprise forces an emergency brake.
All arrays are flat over the segments of every trip of a chunk, so the kinematics can
gather them by segment index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from driverscore.simulation.fleet import ARTERIAL, HIGHWAY, RESIDENTIAL, URBAN

#: Phases of a trip, in order: residential, urban mix, highway, urban mix, residential.
_PHASE_MEAN_SEGMENT_M: Final = np.array([170.0, 380.0, 2500.0, 380.0, 170.0])
#: Mean straight length by road class (m).
_CLASS_MEAN_M: Final = np.array([170.0, 260.0, 650.0, 2500.0])
#: Probability that a straight of each class ends at a stop (stop sign, red light).
_STOP_P: Final = np.array([0.25, 0.30, 0.22, 0.0])
#: Probability that a straight of each class ends with a turn or curve.
_TURN_P: Final = np.array([0.40, 0.25, 0.12, 0.25])
#: Highest speed any vehicle reaches (m/s): keeps every vehicle below ~60 m/s.
_TOP_SPEED_MPS: Final = 52.0
#: Share of segments a habitual speeder drives at their margin over the limit.
_HABITUAL_SEGMENT_SHARE: Final = 0.85


@dataclass(frozen=True)
class TripDrivers:
    """Per-trip inputs of the route and kinematics: the driver, vehicle and city."""

    aggressiveness: np.ndarray
    speeding_propensity: np.ndarray
    smoothness: np.ndarray
    #: Posted limits of the trip's city by road class, shape (trips, 4), m/s.
    limits_mps: np.ndarray
    #: Trip starts in a local rush hour: more congestion.
    rush: np.ndarray
    power_per_kg: np.ndarray
    #: Habitual speeders' margin over the limit (m/s); 0 for the others.
    speeding_margin_mps: np.ndarray


@dataclass(frozen=True)
class Routes:
    """Flat segment arrays for all trips of a chunk; segments of a trip are contiguous."""

    trip: np.ndarray
    length_m: np.ndarray
    #: Signed curvature (1/m), positive to the left.
    curvature: np.ndarray
    limit_mps: np.ndarray
    #: Speed the driver aims for on the segment (limit, speeding, congestion, curve).
    target_mps: np.ndarray
    #: Speed the driver wants at the end of the segment (0 before a stop) and at the ends
    #: of the next two, shape (3, segments), and the distance beyond this segment's end.
    end_mps: np.ndarray
    end_gap_m: np.ndarray
    stop_at_end: np.ndarray
    dwell_s: np.ndarray
    #: Deceleration the driver brakes with when approaching the segment's end (m/s²).
    brake_mps2: np.ndarray
    #: Acceleration the driver uses on the segment (m/s²).
    accel_mps2: np.ndarray
    #: Distance into the segment of a surprise (inf: none), its deceleration and duration.
    emergency_at_m: np.ndarray
    emergency_mps2: np.ndarray
    emergency_s: np.ndarray
    first: np.ndarray
    last: np.ndarray


def plan_routes(
    rng: np.random.Generator,
    distance_km: np.ndarray,
    drivers: TripDrivers,
    speed_factor: np.ndarray,
) -> Routes:
    """Draw the segments of every trip from its planned distance and its driver.

    ``speed_factor`` multiplies each trip's target speeds (the seasonal drift).
    """
    n_trips = len(distance_km)
    total_m = distance_km * 1000.0
    res_start = np.minimum(0.1 * total_m, rng.uniform(200.0, 1000.0, n_trips))
    res_end = np.minimum(0.1 * total_m, rng.uniform(200.0, 1000.0, n_trips))
    rest = total_m - res_start - res_end
    takes_highway = (total_m > 12_000.0) & (rng.random(n_trips) < 0.75)
    highway = np.where(takes_highway, rest * rng.uniform(0.35, 0.8, n_trips), 0.0)
    mixed = rest - highway
    mixed_first = mixed * rng.uniform(0.3, 0.7, n_trips)
    phases = np.stack([res_start, mixed_first, highway, mixed - mixed_first, res_end], axis=1)

    per_phase = np.where(
        phases > 0, np.maximum(1, np.rint(phases / _PHASE_MEAN_SEGMENT_M)), 0
    ).astype(np.int64)
    pair = np.repeat(np.arange(phases.size), per_phase.ravel())
    trip = pair // 5
    phase = pair % 5
    n_straight = len(pair)

    road = np.full(n_straight, URBAN)
    road[(phase == 0) | (phase == 4)] = RESIDENTIAL
    road[phase == 2] = HIGHWAY
    mixed_phase = (phase == 1) | (phase == 3)
    road[mixed_phase & (rng.random(n_straight) < 0.4) & (total_m[trip] > 3000.0)] = ARTERIAL
    raw = _CLASS_MEAN_M[road] * rng.lognormal(0.0, 0.5, n_straight)
    pair_sum = np.bincount(pair, raw, minlength=phases.size)
    straight_len = raw / pair_sum[pair] * phases.ravel()[pair]

    last_straight = np.r_[trip[1:] != trip[:-1], True]
    stop = (rng.random(n_straight) < _STOP_P[road]) | last_straight
    turn = (rng.random(n_straight) < _TURN_P[road]) & ~last_straight
    is_light = road != RESIDENTIAL
    dwell = np.where(
        is_light, rng.uniform(4.0, 60.0, n_straight), rng.uniform(1.0, 4.0, n_straight)
    )
    # The final stop: parking manoeuvre and idling before the engine (and device) is off.
    dwell = np.where(last_straight, rng.uniform(2.0, 20.0, n_straight), dwell)

    # Interleave: each straight, then its arc when it ends with a turn.
    count = 1 + turn.astype(np.int64)
    pos = np.cumsum(count) - count
    n_seg = int(count.sum())
    arc_pos = pos[turn] + 1
    n_arc = len(arc_pos)

    seg_trip = np.empty(n_seg, np.int64)
    seg_trip[pos] = trip
    seg_trip[arc_pos] = trip[turn]
    seg_road = np.empty(n_seg, np.int64)
    seg_road[pos] = road
    seg_road[arc_pos] = road[turn]

    # Straights bend gently; arcs are junction turns (tight) or highway curves (wide).
    curvature = np.empty(n_seg)
    curvature[pos] = rng.normal(0.0, 1.0, n_straight) / np.where(road == HIGHWAY, 6000.0, 2500.0)
    arc_highway = road[turn] == HIGHWAY
    radius = np.where(arc_highway, rng.uniform(250.0, 900.0, n_arc), rng.uniform(7.0, 15.0, n_arc))
    angle = np.deg2rad(
        np.where(arc_highway, rng.uniform(10.0, 40.0, n_arc), rng.uniform(70.0, 100.0, n_arc))
    )
    side = np.where(rng.random(n_arc) < 0.5, 1.0, -1.0)
    curvature[arc_pos] = side / radius
    length = np.empty(n_seg)
    length[pos] = straight_len
    length[arc_pos] = radius * angle

    stop_at_end = np.zeros(n_seg, bool)
    stop_at_end[pos] = stop
    dwell_s = np.zeros(n_seg)
    dwell_s[pos] = np.where(stop, dwell, 0.0)

    agg = drivers.aggressiveness[seg_trip]
    spd = drivers.speeding_propensity[seg_trip]
    smooth = drivers.smoothness[seg_trip]
    limit = drivers.limits_mps[seg_trip, seg_road]

    # Speeding: drivers prone to it add up to ~25 % to the limit on most segments;
    # habitual speeders drive at their own margin over it on most segments (a fixed number
    # of km/h, whatever the road), and like everyone else elsewhere.
    offset = -0.06 + 0.32 * spd + rng.normal(0.0, 0.06, n_seg)
    margin = drivers.speeding_margin_mps[seg_trip]
    at_margin = (margin > 0.0) & (rng.random(n_seg) < _HABITUAL_SEGMENT_SHARE)
    desired = np.where(
        at_margin,
        limit + margin + rng.normal(0.0, 1.0, n_seg),
        limit * (1.0 + offset),
    )
    congested = (seg_road != RESIDENTIAL) & (
        rng.random(n_seg) < 0.08 + 0.3 * drivers.rush[seg_trip]
    )
    congestion = np.where(congested, rng.uniform(0.3, 0.75, n_seg), 1.0)
    lateral_pref = (1.6 + 1.8 * agg**1.5) * rng.lognormal(0.0, 0.12, n_seg)
    curve_speed = np.sqrt(lateral_pref / np.maximum(np.abs(curvature), 1e-9))
    target = np.minimum.reduce(
        [
            desired * speed_factor[seg_trip] * congestion,
            curve_speed,
            np.full(n_seg, _TOP_SPEED_MPS),
        ]
    )
    target = np.maximum(target, 2.0)

    # Braking: calm drivers anticipate (~1.3-2 m/s²); aggressive ones now and then brake
    # late and hard (3.5-6 m/s²), which is what 1 Hz hard-brake counts see.
    late = rng.random(n_seg) < 0.07 * agg**2.5
    brake = np.where(
        late,
        rng.uniform(3.5, 6.0, n_seg),
        np.clip((1.3 + 0.9 * agg) * rng.lognormal(0.0, 0.15, n_seg), 0.8, 3.2),
    )
    accel = np.clip((1.1 + 1.5 * agg**1.5) * rng.lognormal(0.0, 0.18, n_seg), 0.6, 4.5)

    # Surprises (a car cutting in, a pedestrian) per km: more for aggressive and jerky
    # drivers, who follow closer and look ahead less.
    rate_per_m = (0.0005 + 0.05 * agg**3 * (1.5 - smooth)) / 1000.0
    surprised = rng.random(n_seg) < 1.0 - np.exp(-rate_per_m * length)
    emergency_at = np.where(surprised, length * rng.uniform(0.1, 0.9, n_seg), np.inf)
    emergency_mps2 = rng.uniform(4.5, 8.0, n_seg)
    emergency_s = rng.integers(1, 4, n_seg).astype(np.float64)

    last_seg = np.r_[seg_trip[1:] != seg_trip[:-1], True]
    first_seg = np.r_[True, last_seg[:-1]]
    # Speeds wanted at the end of this segment and of the next two, with the extra
    # distance to those ends, so a short segment before a stop does not force a hard brake.
    halts = stop_at_end | last_seg
    end = np.where(halts, 0.0, np.r_[target[1:], 0.0])
    never = 1000.0  # a speed no driver reaches: no constraint
    end1 = np.where(halts, never, np.r_[end[1:], never])
    gap1 = np.r_[length[1:], 0.0]
    beyond = halts | np.r_[halts[1:], True]
    end2 = np.where(beyond, never, np.r_[end[2:], never, never])
    gap2 = gap1 + np.r_[length[2:], 0.0, 0.0]

    return Routes(
        trip=seg_trip,
        length_m=length,
        curvature=curvature,
        limit_mps=limit,
        target_mps=target,
        end_mps=np.stack([end, end1, end2]),
        end_gap_m=np.stack([np.zeros(n_seg), gap1, gap2]),
        stop_at_end=stop_at_end | last_seg,
        dwell_s=dwell_s,
        brake_mps2=brake,
        accel_mps2=accel,
        emergency_at_m=emergency_at,
        emergency_mps2=emergency_mps2,
        emergency_s=emergency_s,
        first=np.flatnonzero(first_seg),
        last=np.flatnonzero(last_seg),
    )
