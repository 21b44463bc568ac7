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
