"""Trip features: units, event counting, event sources, shares, order independence."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from driverscore.domain.config import FeatureConfig
from driverscore.domain.features import FEATURE_COLUMNS, MODEL_FEATURES, trip_features
from driverscore.domain.schema import PING_SCHEMA

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
METRES_PER_DEG_LAT = 111_195.0


def trip(
    speeds: list[float],
    *,
    trip_id: str = "t1",
    start: datetime = T0,
    lon: float = 11.0,
    **columns: list[Any] | Any,
) -> pl.DataFrame:
    """A 1 Hz trip heading north with the given speed profile (m/s)."""
    n = len(speeds)
    lat, rows = 48.0, []
    for i, speed in enumerate(speeds):
        rows.append(
            {
                "ts": start + timedelta(seconds=i),
                "vehicle_id": "v1",
                "driver_id": "d1",
                "trip_id": trip_id,
                "lat": lat,
                "lon": lon,
                "speed_mps": speed,
                "heading_deg": 0.0,
            }
        )
        lat += speed / METRES_PER_DEG_LAT
    frame = pl.DataFrame(rows, schema=PING_SCHEMA)
    for name, value in columns.items():
        values = value if isinstance(value, list) else [value] * n
        frame = frame.with_columns(pl.Series(name, values, dtype=PING_SCHEMA[name]))
    return frame


def features(frame: pl.DataFrame, **config: Any) -> dict[str, Any]:
    rows = trip_features(frame, FeatureConfig(**config))
    assert rows.height == 1
    return rows.row(0, named=True)


def test_units_of_a_constant_speed_trip() -> None:
    row = features(trip([10.0] * 101))  # 36 km/h for 100 s
    assert row["duration_s"] == 100.0
    assert row["distance_km"] == pytest.approx(1.0, abs=1e-12)
    assert row["avg_speed_kmh"] == pytest.approx(36.0)
    assert row["max_speed_kmh"] == pytest.approx(36.0)
    assert row["p95_speed_kmh"] == pytest.approx(36.0)
    assert row["speed_std_kmh"] == 0.0
    assert row["ping_count"] == 101
    assert row["idle_share"] == 0.0
    assert row["hard_brake_count"] == row["harsh_accel_count"] == row["harsh_corner_count"] == 0


def test_output_columns_and_types() -> None:
    rows = trip_features(trip([10.0] * 20), FeatureConfig())
    assert rows.columns == list(FEATURE_COLUMNS)
    assert set(MODEL_FEATURES) <= set(FEATURE_COLUMNS)
    assert rows.schema["start_ts"] == pl.Datetime("us", "UTC")
    assert rows.schema["hard_brake_count"] == pl.Int64


def test_one_five_second_brake_is_one_event() -> None:
    speeds = [20.0] * 10 + [16.0, 12.0, 8.0, 4.0, 0.0] + [0.0] * 10  # −4 m/s² for 5 s
    row = features(speeds_frame := trip(speeds))
    assert row["hard_brake_count"] == 1
    assert row["harsh_accel_count"] == 0
    assert row["hard_brake_per_100km"] == pytest.approx(100.0 / row["distance_km"])
    assert row["stop_count"] == 1
    assert row["event_source"] == "gps"
    assert speeds_frame.height == 25


def test_two_separate_exceedances_are_two_events() -> None:
    speeds = [20.0, 16.0, 12.0, 12.0, 12.0, 8.0, 4.0, 4.0] + [4.0] * 5
    assert features(trip(speeds))["hard_brake_count"] == 2


def test_accelerations_beyond_plausible_are_ignored() -> None:
    speeds = [20.0] * 5 + [0.0] + [20.0] * 5  # ±20 m/s² in one second: a glitch
    row = features(trip(speeds))
    assert row["hard_brake_count"] == 0
    assert row["harsh_accel_count"] == 0


def test_long_steps_carry_no_events_and_use_the_great_circle() -> None:
    frame = trip([20.0, 20.0, 0.0, 0.0])
    # 60 s dropout before the third fix: the speed drop is not a brake.
    frame = frame.with_columns(
        pl.Series("ts", [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=61)] * 1)
        .append(pl.Series([T0 + timedelta(seconds=62)]))
        .cast(pl.Datetime("us", "UTC"))
    )
    row = features(frame)
    assert row["hard_brake_count"] == 0
    # 20 m integrated + the 20 m chord of the dropout step + 0 m.
    assert row["distance_km"] == pytest.approx(0.040, rel=1e-3)


def test_imu_drives_events_when_present() -> None:
    speeds = [15.0] * 20  # GPS says nothing happens
    accel = [0.0] * 8 + [-5.0, -5.0, -5.0] + [0.0] * 9
    row = features(trip(speeds, accel_long_mps2=accel, accel_lat_mps2=[0.0] * 20))
    assert row["event_source"] == "imu"
    assert row["hard_brake_count"] == 1
    assert row["jerk_rms_mps3"] > 0


def test_gps_and_imu_trips_in_one_frame_use_their_own_source() -> None:
    speeds = [20.0] * 5 + [16.0, 12.0, 8.0] + [8.0] * 5
    gps = trip(speeds, trip_id="a-gps")
    imu = trip(speeds, trip_id="b-imu", accel_long_mps2=0.0, accel_lat_mps2=0.0)
    rows = trip_features(pl.concat([imu, gps]), FeatureConfig())
    assert rows["trip_id"].to_list() == ["a-gps", "b-imu"]
    assert rows["event_source"].to_list() == ["gps", "imu"]
    assert rows["hard_brake_count"].to_list() == [1, 0]


def test_gps_cornering_from_heading_changes() -> None:
    frame = trip([15.0] * 12).with_columns(
        pl.Series("heading_deg", [0.0] * 4 + [30.0, 60.0, 90.0] + [90.0] * 5)
    )
    row = features(frame)
    # 15 m/s x 30°/s = 7.9 m/s² for three consecutive steps: one event.
    assert row["harsh_corner_count"] == 1


def test_cornering_ignored_at_walking_pace() -> None:
    frame = trip([2.0] * 12).with_columns(
        pl.Series("heading_deg", [0.0, 180.0] * 6)  # heading noise when nearly stopped
    )
    assert features(frame)["harsh_corner_count"] == 0


def test_speeding_share_is_null_without_limits() -> None:
    assert features(trip([20.0] * 30))["speeding_share"] is None


def test_speeding_share_is_time_weighted() -> None:
    speeds = [20.0] * 10 + [10.0] * 11  # 10 s above, 10 s below
    row = features(trip(speeds, speed_limit_mps=13.9))
    assert row["speeding_share"] == pytest.approx(0.5)


def test_night_share_from_solar_time() -> None:
    # 23:00 UTC at longitude 0 is local night; at 120° E it is 07:00 local, day.
    night = trip([10.0] * 60, start=datetime(2024, 5, 1, 23, tzinfo=UTC), lon=0.0)
    day = trip([10.0] * 60, start=datetime(2024, 5, 1, 23, tzinfo=UTC), lon=120.0)
    assert features(night)["night_share"] == 1.0
    assert features(day)["night_share"] == 0.0


def test_night_share_with_a_timezone() -> None:
    # 20:30 UTC is 22:30 in Berlin (summer time) but 21:14 mean solar time at 11° E.
    frame = trip([10.0] * 60, start=datetime(2024, 7, 1, 20, 30, tzinfo=UTC))
    assert features(frame)["night_share"] == 0.0
    assert features(frame, timezone="Europe/Berlin")["night_share"] == 1.0


def test_night_share_across_the_window_start() -> None:
    frame = trip([10.0] * 121, start=datetime(2024, 5, 1, 21, 59, tzinfo=UTC), lon=0.0)
    assert features(frame)["night_share"] == pytest.approx(1.0 - 60.0 / 120.0)


def test_idle_and_stops() -> None:
    speeds = [10.0] * 10 + [0.0] * 10 + [10.0] * 10 + [0.0] * 11
    row = features(trip(speeds))
    assert row["stop_count"] == 2
    assert row["idle_share"] == pytest.approx(20.0 / 40.0)


def test_jerk_of_a_steady_trip_is_zero() -> None:
    assert features(trip([10.0] * 30))["jerk_rms_mps3"] == 0.0


def test_jerk_of_a_ramp() -> None:
    # acceleration 0 then 1 m/s² from the 6th step: one jump of 1 m/s² per second.
    speeds = [10.0] * 6 + [11.0, 12.0, 13.0, 14.0]
    row = features(trip(speeds))
    assert row["jerk_rms_mps3"] == pytest.approx(math.sqrt(1.0 / 8.0))


def test_any_row_order_gives_the_same_rows() -> None:
    frames = [
        trip(
            [10.0, 12.0, 8.0, 3.0, 0.0, 0.0, 5.0] * 4,
            trip_id=f"t{i}",
            start=T0 + timedelta(hours=i),
        )
        for i in range(3)
    ]
    ordered = trip_features(pl.concat(frames), FeatureConfig())
    shuffled = trip_features(pl.concat(frames).sample(fraction=1.0, seed=3), FeatureConfig())
    assert ordered["trip_id"].to_list() == ["t0", "t1", "t2"]
    assert_frame_equal(ordered, shuffled, check_exact=True)


def test_missing_trip_id_is_an_error() -> None:
    with pytest.raises(ValueError, match="trip_id"):
        trip_features(trip([1.0] * 3).with_columns(trip_id=None), FeatureConfig())


def test_empty_input() -> None:
    empty = trip_features(pl.DataFrame(schema=PING_SCHEMA), FeatureConfig())
    assert empty.columns == list(FEATURE_COLUMNS)
    assert empty.height == 0


def test_day_remainder_without_division_is_exact() -> None:
    import numpy as np

    from driverscore.domain.features import _mod_day

    day = 86_400_000_000
    values = np.array(
        [0, 1, -1, day - 1, day, -day, -day - 1, 1_767_225_599_999_999, 1_767_225_600_000_000]
        + [k * day + r for k in (-20_000, -1, 7, 20_454) for r in (0, 1, day - 1)],
        dtype=np.int64,
    )
    assert _mod_day(values.copy()).tolist() == (values % day).tolist()
    rng = np.random.default_rng(0)
    many = rng.integers(-(2**55), 2**55, 100_000, dtype=np.int64)
    assert np.array_equal(_mod_day(many.copy()), many % day)


def test_night_hour_thresholds_match_the_float_hour() -> None:
    import numpy as np

    from driverscore.domain.features import _first_us_at

    for hour in (0.0, 5.0, 22.0, 21.999999999, 6.5, 23.75, 1e-12, 13.0 + 1 / 3):
        us = _first_us_at(hour)
        around = np.arange(max(0, us - 5), us + 5, dtype=np.int64)
        hours = around.astype(np.float64) * (1.0 / 3.6e9)
        assert np.array_equal(hours >= hour, around >= us)


def jittered_course(n: int, sigma_deg: float, seed: int = 0) -> list[float]:
    """A straight course (north) with time-correlated jitter, as a phone reports it."""
    rng = np.random.default_rng(seed)
    error, course = 0.0, []
    for _ in range(n):
        error = 0.5 * error + rng.normal(0.0, sigma_deg)
        course.append(error % 360.0)
    return course


def test_course_jitter_at_motorway_speed_is_not_cornering() -> None:
    frame = trip([33.3] * 3000).with_columns(pl.Series("heading_deg", jittered_course(3000, 1.8)))
    # The 1-s rule reads speed x jitter as lateral acceleration; the windowed rule does not.
    assert features(frame, cornering="heading_step")["harsh_corner_per_100km"] > 20.0
    assert features(frame)["harsh_corner_count"] == 0


@pytest.mark.parametrize("glitch", [[20.0], [20.0, 20.0], [-15.0, -15.0]])
def test_a_course_glitch_that_comes_back_is_not_a_turn(glitch: list[float]) -> None:
    course = [0.0] * 20 + [g % 360.0 for g in glitch] + [0.0] * 20
    frame = trip([25.0] * len(course)).with_columns(pl.Series("heading_deg", course))
    assert features(frame)["harsh_corner_count"] == 0
    assert features(frame, cornering="heading_step")["harsh_corner_count"] >= 1


@pytest.mark.parametrize("speed_kmh", [60.0, 90.0, 120.0, 140.0])
@pytest.mark.parametrize("turn_deg", [45.0, -90.0])
def test_a_sustained_turn_of_0_4_g_is_one_event(speed_kmh: float, turn_deg: float) -> None:
    speed = speed_kmh / 3.6
    yaw_deg_s = math.degrees(0.4 * 9.81 / speed) * math.copysign(1.0, turn_deg)
    steps = math.ceil(abs(turn_deg / yaw_deg_s))
    course = (
        [0.0] * 20
        + [yaw_deg_s * min(i, abs(turn_deg / yaw_deg_s)) for i in range(1, steps + 1)]
        + [turn_deg] * 20
    )
    frame = trip([speed] * len(course)).with_columns(
        pl.Series("heading_deg", [c % 360.0 for c in course])
    )
    assert features(frame)["harsh_corner_count"] == 1


def test_a_gentle_turn_or_a_short_swerve_is_not_an_event() -> None:
    # 0.2 g round a long bend at 100 km/h: a real turn, but not a harsh one.
    speed = 100 / 3.6
    yaw = math.degrees(0.2 * 9.81 / speed)
    gentle = [0.0] * 10 + [yaw * i for i in range(1, 30)] + [yaw * 29] * 10
    frame = trip([speed] * len(gentle)).with_columns(pl.Series("heading_deg", gentle))
    assert features(frame)["harsh_corner_count"] == 0
    # A lane change at 120 km/h turns ±6° within 2 s: lateral, but under the minimum turn.
    swerve = [0.0] * 10 + [6.0, 6.0, 0.0] + [0.0] * 10
    frame = trip([33.3] * len(swerve)).with_columns(
        pl.Series("heading_deg", [c % 360.0 for c in swerve])
    )
    assert features(frame)["harsh_corner_count"] == 0


def test_cornering_windows_never_reach_into_another_trip() -> None:
    # Two trips of one vehicle back to back; each ends or starts with a turn-like course
    # jump that only reads as a turn when the other trip's fixes join the window.
    first = trip([20.0] * 15, trip_id="a").with_columns(pl.Series("heading_deg", [0.0] * 15))
    second = trip([20.0] * 15, trip_id="b", start=T0 + timedelta(seconds=15)).with_columns(
        pl.Series("heading_deg", [90.0] * 15)
    )
    rows = trip_features(pl.concat([first, second]), FeatureConfig())
    assert rows["harsh_corner_count"].to_list() == [0, 0]


def test_a_short_stretch_of_wrong_limit_is_not_speeding() -> None:
    # 27 m/s under a 27.8 m/s limit, with 12 s (about 320 m) of a wrong 13.9 m/s limit.
    # At 4 m/s a 160 m stretch lasts 40 s: the window is road, not time.
    limits = [27.8] * 100 + [13.9] * 12 + [27.8] * 100
    row = features(trip([27.0] * 212, speed_limit_mps=limits))
    assert row["speeding_share"] == 0.0
    assert row["speeding_moderate_share"] == 0.0
    legacy = features(trip([27.0] * 212, speed_limit_mps=limits), speed_limit_window_m=0)
    assert legacy["speeding_moderate_share"] == pytest.approx(12 / 211, abs=0.01)
    slow = [4.0] * 100 + [4.0] * 40 + [4.0] * 100
    slow_limits = [8.3] * 100 + [1.9] * 40 + [8.3] * 100
    assert features(trip(slow, speed_limit_mps=slow_limits))["speeding_share"] == 0.0


def test_a_real_lower_limit_is_speeding_250_m_after_its_start() -> None:
    limits = [27.8] * 100 + [13.9] * 200
    row = features(trip([27.0] * 300, speed_limit_mps=limits))
    # The lower limit holds from 250 m (9.3 s at 27 m/s) after it starts: 190 of 299
    # weighted seconds.
    assert row["speeding_severe_share"] == pytest.approx(190 / 299, abs=0.01)


def test_speeding_margins_are_nested_and_in_km_h() -> None:
    # 8 km/h, 15 km/h and 25 km/h over a 50 km/h limit, 20 s each.
    limit = 50 / 3.6
    speeds = [(50 + over) / 3.6 for over in (8.0, 15.0, 25.0) for _ in range(20)]
    row = features(trip(speeds, speed_limit_mps=limit))
    assert row["speeding_share"] == pytest.approx(1.0)  # all above limit + 2 m/s (7.2 km/h)
    assert row["speeding_moderate_share"] == pytest.approx(40 / 59, abs=0.02)
    assert row["speeding_severe_share"] == pytest.approx(20 / 59, abs=0.02)


def test_a_missing_limit_for_a_few_seconds_takes_the_limit_around_it() -> None:
    limits: list[float | None] = [13.9] * 30 + [None] * 6 + [13.9] * 30
    row = features(trip([20.0] * 66, speed_limit_mps=limits))
    assert row["speeding_share"] == pytest.approx(1.0)
