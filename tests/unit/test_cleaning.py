"""Cleaning rules: each rejected ping carries its reason, nothing is dropped silently."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from driverscore.domain.cleaning import QUARANTINE_REASONS, clean_pings
from driverscore.domain.config import CleaningConfig
from driverscore.domain.schema import PING_SCHEMA

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
REFERENCE = datetime(2024, 6, 1, tzinfo=UTC)
METRES_PER_DEG_LAT = 111_195.0


def pings(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Canonical pings from partial rows; missing fields are null."""
    return pl.DataFrame(rows, schema=PING_SCHEMA)


def northbound(n: int, speed: float | None = 10.0, vehicle: str = "v1") -> list[dict[str, Any]]:
    """A vehicle driving north at 10 m/s, one fix per second."""
    return [
        {
            "ts": T0 + timedelta(seconds=i),
            "vehicle_id": vehicle,
            "lat": 48.0 + i * 10.0 / METRES_PER_DEG_LAT,
            "lon": 11.0,
            "speed_mps": speed,
            "heading_deg": 0.0,
        }
        for i in range(n)
    ]


def clean(frame: pl.DataFrame) -> Any:
    return clean_pings(frame, CleaningConfig(), REFERENCE)


def reasons(result: Any) -> list[str]:
    return list(result.quarantine["reason"])


def test_counts_add_up_and_every_reason_is_documented() -> None:
    rows = northbound(10)
    rows[2]["lat"] = None
    rows[4]["speed_mps"] = 150.0
    rows.append(dict(rows[6]))
    result = clean(pings(rows))
    counts = result.counts
    assert counts["rows_in"] == 11
    assert counts["rows_in"] == counts["kept"] + counts["quarantined"]
    assert counts["kept"] == result.kept.height
    assert counts["quarantined"] == result.quarantine.height
    assert set(result.quarantine["reason"]) <= set(QUARANTINE_REASONS)
    assert result.quarantine["stage"].unique().to_list() == ["cleaning"]


@pytest.mark.parametrize("column", ["ts", "vehicle_id", "lat", "lon"])
def test_missing_required(column: str) -> None:
    rows = northbound(5)
    rows[2][column] = None
    assert reasons(clean(pings(rows))) == ["missing_required"]


@pytest.mark.parametrize("ts", [datetime(1999, 12, 31, tzinfo=UTC), REFERENCE + timedelta(days=2)])
def test_bad_timestamp(ts: datetime) -> None:
    rows = northbound(5)
    rows[2]["ts"] = ts
    assert reasons(clean(pings(rows))) == ["bad_timestamp"]


@pytest.mark.parametrize(
    ("lat", "lon"), [(0.0, 0.0), (91.0, 11.0), (48.0, -181.0), (float("nan"), 11.0)]
)
def test_invalid_coordinates(lat: float, lon: float) -> None:
    rows = northbound(5)
    rows[2].update(lat=lat, lon=lon)
    assert reasons(clean(pings(rows))) == ["invalid_coordinates"]


@pytest.mark.parametrize("speed", [-0.1, 90.5])
def test_impossible_speed(speed: float) -> None:
    rows = northbound(5)
    rows[2]["speed_mps"] = speed
    assert reasons(clean(pings(rows))) == ["impossible_speed"]


def test_duplicate_keeps_the_first() -> None:
    rows = northbound(5)
    rows.insert(3, dict(rows[2], speed_mps=11.0))
    result = clean(pings(rows))
    assert reasons(result) == ["duplicate"]
    assert result.quarantine["speed_mps"].to_list() == [11.0]
    assert result.kept["speed_mps"].to_list() == [10.0] * 5


def test_gps_jump_is_a_spike_with_two_impossible_edges() -> None:
    rows = northbound(7)
    rows[3]["lat"] += 0.1  # 11 km away and back within a second
    result = clean(pings(rows))
    assert reasons(result) == ["gps_jump"]
    assert result.quarantine["ts"].to_list() == [rows[3]["ts"]]


def test_one_impossible_edge_alone_is_not_a_jump() -> None:
    # The last fix is far away: it or its predecessor is wrong, we cannot tell which.
    rows = northbound(7)
    rows[6]["lat"] += 0.1
    assert clean(pings(rows)).counts["gps_jump"] == 0


def test_out_of_order_rows_are_sorted_not_rejected() -> None:
    rows = northbound(6) + northbound(4, vehicle="v0")
    rows[1], rows[3] = rows[3], rows[1]
    result = clean(pings(rows[::-1]))
    assert result.counts["quarantined"] == 0
    assert result.counts["reordered"] > 0
    assert result.kept.equals(result.kept.sort("vehicle_id", "ts"))
    assert result.kept["vehicle_id"].to_list()[:4] == ["v0"] * 4


def test_sorted_input_counts_no_reordering() -> None:
    assert clean(pings(northbound(6))).counts["reordered"] == 0


def test_driver_defaults_to_vehicle() -> None:
    rows = northbound(3)
    rows[0]["driver_id"] = "d9"
    kept = clean(pings(rows)).kept
    assert kept["driver_id"].to_list() == ["d9", "v1", "v1"]


def test_speed_and_heading_derived_from_positions() -> None:
    rows = northbound(6, speed=None)
    for row in rows:
        row["heading_deg"] = None
    rows[2]["speed_mps"] = 3.0  # a reported speed is kept as is
    result = clean(pings(rows))
    speed = result.kept["speed_mps"].to_list()
    assert speed[2] == 3.0
    assert speed[0] == pytest.approx(10.0, rel=1e-3)
    assert speed[3] == pytest.approx(10.0, rel=1e-3)
    heading = result.kept["heading_deg"].to_list()
    assert all(h == pytest.approx(0.0, abs=1e-6) or h == pytest.approx(360.0) for h in heading)
    assert result.counts["derived_speed"] == 5


def test_derivation_does_not_reach_across_a_gap() -> None:
    rows = northbound(3, speed=None)
    rows += [dict(r, ts=r["ts"] + timedelta(hours=1), lat=r["lat"] + 1.0) for r in rows]
    speed = clean(pings(rows)).kept["speed_mps"].to_list()
    assert speed == pytest.approx([10.0] * 6, rel=1e-3)


def test_source_passes_through_to_kept_and_quarantine() -> None:
    rows = northbound(4)
    rows[1]["lat"] = None
    frame = pings(rows).with_columns(source=pl.lit("fleet-a.csv"))
    result = clean(frame)
    assert result.kept["source"].unique().to_list() == ["fleet-a.csv"]
    assert result.quarantine.columns == [*PING_SCHEMA, "source", "reason", "stage"]
    assert result.quarantine["source"].to_list() == ["fleet-a.csv"]


def test_quarantine_columns_without_source() -> None:
    result = clean(pings(northbound(3)))
    assert result.kept.columns == list(PING_SCHEMA)
    assert result.quarantine.columns == [*PING_SCHEMA, "reason", "stage"]


def test_empty_input() -> None:
    result = clean(pings([]))
    assert result.counts["rows_in"] == result.counts["kept"] == 0
    assert result.quarantine.height == 0


def test_jump_prefilter_decides_like_the_full_haversine() -> None:
    """Only steps whose cheap bound could be too fast get the haversine: same decisions."""
    import numpy as np

    from driverscore.domain.cleaning import SortKeys, _gps_jumps, haversine_m

    rng = np.random.default_rng(5)
    n = 50_000
    vehicle = np.repeat(np.arange(50, dtype=np.int64), n // 50)
    ts_us = np.cumsum(rng.choice([1, 1, 2, 400], n)) * 1_000_000
    lat = 60.0 * np.sin(np.cumsum(rng.normal(0, 1e-3, n)))  # far north and south too
    lon = 170.0 * np.sin(np.cumsum(rng.normal(0, 1e-3, n)))
    # Steps just below, at and above the limit, and spikes.
    lat += rng.choice([0.0, 0.0, 0.0, 8e-4, 8.1e-4, 0.5], n)
    config = CleaningConfig()
    keys = SortKeys(vehicle=vehicle, ts_us=ts_us, trip=None)
    jumps = _gps_jumps(lat, lon, keys, config, 300.0)

    step = haversine_m(lat[:-1], lon[:-1], lat[1:], lon[1:])
    dt_s = np.diff(ts_us) / 1e6
    neighbours = (np.diff(vehicle) == 0) & (np.diff(ts_us) <= 300_000_000)
    fast = (step / dt_s > config.max_implied_speed_mps) & neighbours
    expected = np.zeros(n, dtype=bool)
    expected[1:-1] = fast[:-1] & fast[1:]
    assert expected.sum() > 100
    assert np.array_equal(jumps, expected)
