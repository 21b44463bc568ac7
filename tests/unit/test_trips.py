"""Trip cutting by time gaps, deterministic trip ids, short trips set aside."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl

from driverscore.domain.config import TripConfig
from driverscore.domain.schema import PING_SCHEMA
from driverscore.domain.trips import assign_trips

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
METRES_PER_DEG_LAT = 111_195.0


def burst(start: datetime, n: int, vehicle: str = "v1", **extra: Any) -> list[dict[str, Any]]:
    """``n`` fixes one second apart, driving north at 10 m/s."""
    return [
        {
            "ts": start + timedelta(seconds=i),
            "vehicle_id": vehicle,
            "driver_id": vehicle,
            "lat": 48.0 + i * 10.0 / METRES_PER_DEG_LAT,
            "lon": 11.0,
            "speed_mps": 10.0,
            **extra,
        }
        for i in range(n)
    ]


def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=PING_SCHEMA)


def epoch_ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def test_gap_cuts_trips_with_deterministic_ids() -> None:
    second = T0 + timedelta(seconds=100 + 301)
    rows = burst(T0, 100) + burst(second, 100)
    result = assign_trips(frame(rows), TripConfig(gap_s=300))
    assert result.pings["trip_id"].unique(maintain_order=True).to_list() == [
        f"v1:{epoch_ms(T0)}",
        f"v1:{epoch_ms(second)}",
    ]
    assert result.counts == {
        "rows_in": 200,
        "trips": 2,
        "short_trips": 0,
        "kept": 200,
        "quarantined": 0,
    }


def test_a_gap_at_the_threshold_does_not_cut() -> None:
    rows = burst(T0, 100) + burst(T0 + timedelta(seconds=99 + 300), 100)
    assert assign_trips(frame(rows), TripConfig(gap_s=300)).counts["trips"] == 1


def test_trip_alone_gets_the_same_id() -> None:
    rows = burst(T0, 100) + burst(T0 + timedelta(hours=2), 100) + burst(T0, 50, vehicle="v2")
    together = assign_trips(frame(rows), TripConfig()).pings
    alone = assign_trips(frame(rows[100:200]), TripConfig()).pings
    assert together.filter(pl.col("vehicle_id") == "v1").slice(100).equals(alone)


def test_vehicles_are_cut_apart_and_input_order_does_not_matter() -> None:
    rows = burst(T0, 100, vehicle="b") + burst(T0, 100, vehicle="a")
    result = assign_trips(frame(rows[::-1]), TripConfig())
    assert result.pings["trip_id"].unique(maintain_order=True).to_list() == [
        f"a:{epoch_ms(T0)}",
        f"b:{epoch_ms(T0)}",
    ]


def test_given_trip_ids_are_kept() -> None:
    rows = burst(T0, 30, trip_id="t-1") + burst(T0 + timedelta(seconds=30), 30, trip_id="t-2")
    rows += burst(T0 + timedelta(hours=1), 30)
    pings = assign_trips(frame(rows), TripConfig(min_distance_km=0.1, min_duration_s=10)).pings
    assert pings["trip_id"].unique(maintain_order=True).to_list() == [
        "t-1",
        "t-2",
        f"v1:{epoch_ms(T0 + timedelta(hours=1))}",
    ]


def test_short_trips_are_quarantined() -> None:
    long_trip = burst(T0, 100)
    too_few = burst(T0 + timedelta(hours=1), 5)  # 5 pings < min_pings
    too_brief = burst(T0 + timedelta(hours=2), 40)  # 39 s < 60 s
    standing = [  # long enough in time and pings, but 0 km
        dict(row, lat=48.0, speed_mps=0.0) for row in burst(T0 + timedelta(hours=3), 100)
    ]
    result = assign_trips(frame(long_trip + too_few + too_brief + standing), TripConfig())
    assert result.counts["trips"] == 4
    assert result.counts["short_trips"] == 3
    assert result.counts["rows_in"] == result.counts["kept"] + result.counts["quarantined"]
    assert result.pings["trip_id"].unique().to_list() == [f"v1:{epoch_ms(T0)}"]
    assert set(result.quarantine["reason"]) == {"short_trip"}
    assert set(result.quarantine["stage"]) == {"trips"}
    assert result.quarantine.height == 5 + 40 + 100
    assert result.quarantine["trip_id"].null_count() == 0


def test_empty_input() -> None:
    result = assign_trips(frame([]), TripConfig())
    assert result.pings.height == 0
    assert result.counts["trips"] == 0


def test_a_given_trip_id_is_cut_by_the_gap_and_its_parts_are_named_by_start() -> None:
    # A pause longer than the gap, then the id again after another trip: parts 2 and 3.
    later = T0 + timedelta(seconds=29 + 301)
    rows = burst(T0, 30, trip_id="7") + burst(later, 30, trip_id="7")
    rows += burst(T0 + timedelta(hours=1), 30, trip_id="8")
    rows += burst(T0 + timedelta(hours=2), 30, trip_id="7")
    config = TripConfig(min_distance_km=0.1, min_duration_s=10)
    pings = assign_trips(frame(rows[::-1]), config).pings
    assert pings["trip_id"].unique(maintain_order=True).to_list() == ["7", "7~2", "8", "7~3"]


def test_trip_ids_repeated_across_vehicles_stay_with_their_vehicle() -> None:
    rows = [
        row
        for vehicle in ("a", "b", "c")
        for trip in range(3)
        for row in burst(T0 + timedelta(hours=trip), 30, vehicle=vehicle, trip_id=str(trip + 1))
    ]
    result = assign_trips(frame(rows), TripConfig(min_distance_km=0.1, min_duration_s=10))
    trips = result.pings.group_by("vehicle_id", "trip_id").len()
    assert trips.height == 9 and set(trips["len"]) == {30}
    assert result.counts["trips"] == 9


def test_a_trip_is_cut_after_max_trip_pings_like_the_stream() -> None:
    rows = burst(T0, 25, trip_id="t") + burst(T0 + timedelta(hours=1), 25)
    config = TripConfig(min_distance_km=0, min_duration_s=0, min_pings=2, max_trip_pings=10)
    pings = assign_trips(frame(rows), config).pings
    sizes = pings.group_by("trip_id", maintain_order=True).len()
    starts = [T0 + timedelta(hours=1, seconds=s) for s in (0, 10, 20)]
    assert sizes.rows() == [
        ("t", 10),
        ("t~2", 10),
        ("t~3", 5),
        *((f"v1:{epoch_ms(start)}", n) for start, n in zip(starts, (10, 10, 5), strict=True)),
    ]


def test_a_forced_cut_never_splits_a_millisecond() -> None:
    """Parts without a given id are named by their start ms: they must not share one."""
    ms = [0, 1, 2, 2, 2, 3, 4]  # one fix per millisecond, but three within ms 2
    rows = [
        dict(row, ts=T0 + timedelta(milliseconds=m, microseconds=i))
        for i, (m, row) in enumerate(zip(ms, burst(T0, len(ms)), strict=True))
    ]
    config = TripConfig(min_distance_km=0, min_duration_s=0, min_pings=2, max_trip_pings=3)
    pings = assign_trips(frame(rows), config).pings
    sizes = pings.group_by("trip_id", maintain_order=True).len()["len"].to_list()
    assert sizes == [5, 2]  # 3 pings, and the rest of ms 2; then ms 3 and 4
