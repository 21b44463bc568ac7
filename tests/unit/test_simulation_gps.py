"""The device noise model (simulation/gps.py) and the scenario builders on top of it."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from driverscore.domain.cleaning import haversine_m
from driverscore.domain.config import FeatureConfig
from driverscore.domain.features import trip_features
from driverscore.domain.schema import PING_SCHEMA
from driverscore.simulation.gps import (
    PHONE,
    TRACKER,
    DeviceFixes,
    GpsProfile,
    TrueTrack,
    report_fixes,
)
from driverscore.simulation.scenarios import constant_turn, straight_drive


def _heading_step_rule() -> FeatureConfig:
    """The cornering rule the real-trip figure (31-39 per 100 km) was measured with.

    Lateral acceleration is speed x the heading change of one fix; when FeatureConfig
    offers other rules, this one is selected by name.
    """
    if "cornering" in FeatureConfig.model_fields:
        return FeatureConfig.model_validate({"cornering": "heading_step"})
    return FeatureConfig()


def _quiet(profile: GpsProfile, **changes: float) -> GpsProfile:
    """The profile without its rare events, so the continuous errors can be measured."""
    update: dict[str, float] = {
        "course_glitch_per_h": 0.0,
        "multipath_per_h": 0.0,
        "dropout_per_h": 0.0,
    }
    update.update(changes)
    return profile.model_copy(update=update)


def _track(trips: int, seconds: int, speed_mps: float, *, urban: bool = False) -> TrueTrack:
    """``trips`` parked-in-place trips of ``seconds`` fixes at a constant speed, heading north."""
    n = trips * seconds
    step = np.tile(np.arange(seconds), trips)
    return TrueTrack(
        trip=np.repeat(np.arange(trips), seconds),
        step=step,
        east_m=np.zeros(n),
        north_m=speed_mps * step.astype(np.float64),
        course_rad=np.zeros(n),
        speed_mps=np.full(n, speed_mps),
        urban=np.full(n, urban),
    )


def _report(
    track: TrueTrack, profiles: list[GpsProfile], seed: int = 0, device: np.ndarray | None = None
) -> DeviceFixes:
    return report_fixes(np.random.default_rng(seed), track, profiles, device)


def _course_error_deg(fixes: DeviceFixes) -> np.ndarray:
    # True course is 0: wrap the reported course to ±180.
    return np.asarray((fixes.course_deg + 180.0) % 360.0 - 180.0)


@pytest.mark.parametrize("profile", [PHONE, TRACKER], ids=lambda p: p.name)
def test_position_error_has_the_profiles_sigma_and_correlation(profile: GpsProfile) -> None:
    track = _track(200, 600, 20.0)
    fixes = _report(track, [_quiet(profile)])
    error = (fixes.east_m - track.east_m).reshape(200, 600)
    assert np.std(error) == pytest.approx(profile.position_sigma_m, rel=0.1)
    lag1 = np.mean(error[:, 1:] * error[:, :-1]) / np.mean(error * error)
    assert lag1 == pytest.approx(profile.position_rho, abs=0.02)
    # Trips are independent: the first fix of a trip does not follow the last of the one before.
    first, last = error[1:, 0], error[:-1, -1]
    assert abs(np.corrcoef(first, last)[0, 1]) < 0.2


def test_phone_positions_are_worse_than_trackers() -> None:
    track = _track(50, 600, 20.0)
    phone = _report(track, [_quiet(PHONE)])
    tracker = _report(track, [_quiet(TRACKER)])
    assert np.std(phone.north_m - track.north_m) > 1.5 * np.std(tracker.north_m - track.north_m)


def test_course_jitter_grows_as_speed_falls_and_is_time_correlated() -> None:
    fast = _course_error_deg(_report(_track(20, 600, 33.0), [_quiet(PHONE)]))
    slow = _course_error_deg(_report(_track(20, 600, 3.0), [_quiet(PHONE)]))
    assert np.std(fast) == pytest.approx(np.hypot(1.68, np.rad2deg(0.2 / 33.0)), rel=0.1)
    assert np.std(slow) > 2.0 * np.std(fast)
    per_trip = fast.reshape(20, 600)
    lag1 = np.mean(per_trip[:, 1:] * per_trip[:, :-1]) / np.mean(per_trip * per_trip)
    assert lag1 == pytest.approx(PHONE.course_rho, abs=0.05)


def test_course_glitches_are_rare_short_and_large() -> None:
    profile = _quiet(PHONE, course_glitch_per_h=60.0, course_floor_deg=0.0, speed_sigma_mps=0.0)
    error = np.abs(_course_error_deg(_report(_track(20, 3600, 30.0), [profile])))
    glitching = error > 1.0
    starts = np.count_nonzero(glitching[1:] & ~glitching[:-1])
    assert starts == pytest.approx(20 * 60, rel=0.15)
    assert error.max() <= PHONE.course_glitch_max_deg * 2.0  # two glitches may overlap
    assert np.mean(glitching) < 0.05


def test_multipath_jumps_only_on_urban_roads() -> None:
    profile = _quiet(PHONE, multipath_per_h=30.0, position_sigma_m=0.0)
    open_road = _report(_track(10, 3600, 15.0), [profile])
    assert np.max(np.abs(open_road.east_m)) < 1e-9
    city_track = _track(10, 3600, 15.0, urban=True)
    city = _report(city_track, [profile])
    jump = np.hypot(city.east_m - city_track.east_m, city.north_m - city_track.north_m)
    jumping = jump > 1.0
    starts = np.count_nonzero(jumping[1:] & ~jumping[:-1])
    assert starts == pytest.approx(10 * 30, rel=0.2)
    assert PHONE.multipath_min_m <= np.median(jump[jumping]) <= PHONE.multipath_max_m


@pytest.mark.parametrize("profile", [PHONE, TRACKER], ids=lambda p: p.name)
def test_dropouts_follow_the_profiles_rate_and_length(profile: GpsProfile) -> None:
    hours = 100
    fixes = _report(_track(hours, 3600, 15.0), [profile])
    lost = ~fixes.reported
    runs = np.count_nonzero(lost[1:] & ~lost[:-1])
    assert runs == pytest.approx(profile.dropout_per_h * hours, rel=0.2)
    mean_length = np.count_nonzero(lost) / runs
    assert profile.dropout_min_s <= mean_length <= profile.dropout_max_s
    by_trip = fixes.reported.reshape(hours, 3600)
    assert by_trip[:, :5].all()
    assert by_trip[:, -5:].all()


def test_same_seed_same_fixes_and_a_trips_device_leaves_other_trips_alone() -> None:
    track = _track(3, 900, 20.0, urban=True)
    phones = _report(track, [PHONE, TRACKER], seed=4, device=np.array([0, 0, 0]))
    again = _report(track, [PHONE, TRACKER], seed=4, device=np.array([0, 0, 0]))
    mixed = _report(track, [PHONE, TRACKER], seed=4, device=np.array([0, 1, 0]))
    for name in ("east_m", "north_m", "speed_mps", "course_deg", "reported"):
        assert np.array_equal(getattr(phones, name), getattr(again, name)), name
        same = np.array_equal(getattr(phones, name)[900:1800], getattr(mixed, name)[900:1800])
        assert not same or name == "reported", name
        for trip in (slice(0, 900), slice(1800, 2700)):
            assert np.array_equal(getattr(phones, name)[trip], getattr(mixed, name)[trip]), name


def test_reported_speed_and_course_stay_in_range() -> None:
    fixes = _report(_track(5, 600, 0.0), [PHONE])
    assert fixes.speed_mps.min() >= 0.0
    assert fixes.course_deg.min() >= 0.0
    assert fixes.course_deg.max() < 360.0


# The calibration: the 1-s heading-step rule on a calm straight motorway drive gives 31-39
# harsh corners per 100 km on real phone trips (issue 15); trackers should give almost none.


def _corners_per_100km(pings: pl.DataFrame) -> float:
    value = trip_features(pings, _heading_step_rule())["harsh_corner_per_100km"].item()
    assert isinstance(value, float)
    return value


def test_phone_course_jitter_gives_the_real_false_corner_rate_at_120_kmh() -> None:
    rate = _corners_per_100km(straight_drive(120, 300, "phone", seed=0))
    assert 20.0 <= rate <= 50.0


def test_tracker_course_gives_almost_no_false_corners_at_120_kmh() -> None:
    pings = straight_drive(120, 300, "tracker", seed=0)
    assert _corners_per_100km(pings) <= 5.0
    gps_only = pings.with_columns(
        pl.lit(None, dtype=pl.Float64).alias("accel_long_mps2"),
        pl.lit(None, dtype=pl.Float64).alias("accel_lat_mps2"),
    )
    assert _corners_per_100km(gps_only) <= 5.0


# Scenario builders


def test_straight_drive_is_canonical_1hz_and_covers_the_distance() -> None:
    pings = straight_drive(90, 20, PHONE, seed=1, speed_limit_mps=25.0)
    assert pings.schema == PING_SCHEMA
    assert pings["trip_id"].n_unique() == 1
    assert pings["accel_lat_mps2"].null_count() == pings.height
    assert (pings["speed_limit_mps"] == 25.0).all()
    dt = pings["ts"].diff().dt.total_seconds().drop_nulls()
    assert dt.min() == 1
    assert (dt == 1).mean() > 0.99
    ends = pings.select(pl.col("lat", "lon").first().name.suffix("_a"), pl.col("lat", "lon").last())
    straight_m = haversine_m(
        np.array([ends["lat_a"].item()]),
        np.array([ends["lon_a"].item()]),
        np.array([ends["lat"].item()]),
        np.array([ends["lon"].item()]),
    )[0]
    assert straight_m == pytest.approx(20_000.0, rel=0.01)
    speed = pings["speed_mps"].mean()
    assert isinstance(speed, float)
    assert speed == pytest.approx(25.0, rel=0.01)


@pytest.mark.parametrize(("turn_deg", "speed_kmh"), [(90.0, 60.0), (-90.0, 120.0), (45.0, 90.0)])
def test_constant_turn_ends_turned_by_the_asked_angle(turn_deg: float, speed_kmh: float) -> None:
    pings = constant_turn(speed_kmh, 0.4, turn_deg, TRACKER, seed=2, heading_deg=100.0)
    heading = pings["heading_deg"].to_numpy()
    before = np.median(heading[:20])
    after = np.median(heading[-20:])
    assert before == pytest.approx(100.0, abs=1.0)
    turned = (before - after + 180.0) % 360.0 - 180.0  # left turns lower the course
    assert turned == pytest.approx(turn_deg, abs=1.0)
    # Lead-in and lead-out of ~30 s each around a turn at 0.4 g.
    turn_s = np.deg2rad(abs(turn_deg)) * (speed_kmh / 3.6) / (0.4 * 9.81)
    assert pings.height <= int(60 + turn_s) + 1
    assert pings.height >= int(60 + turn_s) - 8  # a dropout may take a few fixes


def test_constant_turn_reports_its_lateral_acceleration_on_the_imu() -> None:
    pings = constant_turn(90, 0.4, -90, TRACKER, seed=3)
    lateral = pings["accel_lat_mps2"].to_numpy()
    assert np.max(np.abs(lateral)) == pytest.approx(0.4 * 9.81, abs=0.8)
    assert np.median(lateral[np.abs(lateral) > 2.0]) < 0  # a right turn: lateral to the right
    assert np.sum(np.abs(lateral) > 2.0) == pytest.approx(
        np.deg2rad(90) * 25.0 / (0.4 * 9.81), abs=2
    )


def test_constant_turn_geometry_closes() -> None:
    # Tracker noise is a few metres: the end point of a left quarter turn heading north at
    # 0.4 g lies one lead west-north of the arc's end.
    pings = constant_turn(72, 0.4, 90, TRACKER, seed=5, heading_deg=0.0, lead_s=30.0)
    v, radius = 20.0, 20.0**2 / (0.4 * 9.81)
    turn_s = np.deg2rad(90) * radius / v
    duration = int(60 + turn_s)
    # Last whole second: lead-out covered for (duration - 30 - turn_s) s.
    out_m = v * (duration - 30.0 - turn_s)
    east_m = -radius - out_m
    north_m = 30.0 * v + radius
    lat0, lon0 = pings["lat"][0], pings["lon"][0]
    north = (pings["lat"][-1] - lat0) * 111_195.0
    east = (pings["lon"][-1] - lon0) * 111_195.0 * np.cos(np.deg2rad(lat0))
    assert (pings["ts"][-1] - pings["ts"][0]).total_seconds() == duration
    assert east == pytest.approx(east_m, abs=15.0)
    assert north == pytest.approx(north_m, abs=15.0)


def test_scenarios_are_deterministic_and_reject_nonsense() -> None:
    assert straight_drive(50, 2, PHONE, seed=7).equals(straight_drive(50, 2, "phone", seed=7))
    assert not straight_drive(50, 2, PHONE, seed=7).equals(straight_drive(50, 2, PHONE, seed=8))
    with pytest.raises(ValueError, match="unknown GPS profile"):
        straight_drive(50, 2, "satellite", seed=0)
    with pytest.raises(ValueError, match="positive"):
        constant_turn(50, 0.0, 90, PHONE, seed=0)
