"""prepare_trips: one trip gets the same features alone as among many; counts add up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.prepare import QUARANTINE_REASONS, PreparedTrips, prepare_trips
from driverscore.domain.schema import PING_SCHEMA

T0 = datetime(2024, 5, 1, 6, 0, tzinfo=UTC)
REFERENCE = datetime(2024, 6, 1, tzinfo=UTC)


def burst(rng: np.random.Generator, vehicle: int, trip: int) -> pl.DataFrame:
    """One raw trip with the usual dirt; ``source`` names it so a test can pick it out."""
    n = int(rng.integers(150, 400))
    start = T0 + timedelta(hours=3 * trip, seconds=int(rng.integers(0, 600)))
    steps = rng.choice([1.0, 1.0, 1.0, 2.0, 15.0], size=n)  # 1 Hz with some dropouts
    ts = [start + timedelta(seconds=float(s)) for s in np.cumsum(steps)]
    speed = np.clip(12 + np.cumsum(rng.normal(0, 1.5, n)), 0, 40)
    heading = (np.cumsum(rng.normal(0, 8, n)) + 45) % 360
    lat = 48 + np.cumsum(speed * steps * np.cos(np.radians(heading))) / 111_195
    lon = 11 + np.cumsum(speed * steps * np.sin(np.radians(heading))) / 74_400
    frame = pl.DataFrame(
        {
            "ts": ts,
            "vehicle_id": f"veh-{vehicle:03d}",
            "lat": lat,
            "lon": lon,
            "speed_mps": speed,
            "heading_deg": heading,
            "speed_limit_mps": np.where(rng.random(n) < 0.5, 13.9, np.nan),
            "fleet_id": "fleet-a",
        }
    ).with_columns(pl.col("speed_limit_mps").fill_nan(None))
    if vehicle % 3 == 0:  # GPS-only device without speed or heading
        frame = frame.with_columns(speed_mps=None, heading_deg=None)
    if vehicle % 3 == 1:  # accelerometer device
        frame = frame.with_columns(
            accel_long_mps2=pl.Series(rng.normal(0, 2, n)),
            accel_lat_mps2=pl.Series(rng.normal(0, 2, n)),
        )
    spike = int(rng.integers(2, n - 2))
    frame = frame.with_columns(
        lat=pl.when(pl.int_range(pl.len()) == spike).then(pl.col("lat") + 0.5).otherwise("lat")
    )
    dirt = frame.sample(3, seed=vehicle * 100 + trip)  # duplicates
    frame = pl.concat([frame, dirt], how="diagonal_relaxed")
    return pl.concat(
        [pl.DataFrame(schema=PING_SCHEMA), frame], how="diagonal_relaxed"
    ).with_columns(source=pl.lit(f"{vehicle}-{trip}"))


@pytest.fixture(scope="module")
def fleet() -> pl.DataFrame:
    rng = np.random.default_rng(42)
    parts = [burst(rng, v, k) for v in range(24) for k in range(3)]
    parts.append(  # a trip too short to score
        burst(rng, 99, 0).head(5).with_columns(source=pl.lit("short"))
    )
    return pl.concat(parts).sample(fraction=1.0, seed=1)  # any input order


def prepare(pings: pl.DataFrame) -> PreparedTrips:
    return prepare_trips(pings, CleaningConfig(), TripConfig(), FeatureConfig(), REFERENCE)


def test_a_trip_alone_equals_the_trip_among_many(fleet: pl.DataFrame) -> None:
    together = prepare(fleet)
    assert together.features.height == 72
    for source in ["0-0", "1-2", "2-1", "9-1", "13-0", "23-2"]:
        alone = prepare(fleet.filter(pl.col("source") == source))
        assert alone.features.height == 1
        trip_id = alone.features["trip_id"].item()
        assert_frame_equal(
            together.features.filter(pl.col("trip_id") == trip_id), alone.features, check_exact=True
        )
        assert_frame_equal(
            together.pings.filter(pl.col("trip_id") == trip_id), alone.pings, check_exact=True
        )


def test_counts_add_up_at_every_stage(fleet: pl.DataFrame) -> None:
    counts = prepare(fleet).counts
    assert counts["rows_in"] == fleet.height
    assert counts["rows_in"] == counts["kept"] + counts["quarantined"]
    for stage in ("cleaning", "trips"):
        assert (
            counts[f"{stage}.rows_in"] == counts[f"{stage}.kept"] + counts[f"{stage}.quarantined"]
        )
    assert counts["cleaning.kept"] == counts["trips.rows_in"]
    assert counts["quarantined"] == sum(counts[reason] for reason in QUARANTINE_REASONS)


def test_dirt_lands_in_quarantine_with_reasons(fleet: pl.DataFrame) -> None:
    prepared = prepare(fleet)
    counts = prepared.counts
    assert counts["duplicate"] == 24 * 3 * 3
    assert counts["gps_jump"] >= 24 * 3 - 5  # a spike next to a dropout may go unseen
    assert counts["short_trip"] == 5
    assert counts["trips"] == 72
    quarantine = prepared.quarantine
    assert quarantine.height == counts["quarantined"]
    assert set(quarantine["stage"]) == {"cleaning", "trips"}
    assert quarantine.filter(pl.col("reason") == "short_trip")["source"].unique().to_list() == [
        "short"
    ]
    assert "source" in prepared.pings.columns


def test_event_sources_and_derived_speed(fleet: pl.DataFrame) -> None:
    prepared = prepare(fleet)
    by_vehicle = prepared.features.group_by("vehicle_id").agg(pl.col("event_source").first())
    sources = dict(by_vehicle.iter_rows())
    assert sources["veh-001"] == "imu"
    assert sources["veh-000"] == sources["veh-002"] == "gps"
    assert prepared.pings["speed_mps"].null_count() == 0
    assert prepared.features["distance_km"].min() > 0.2  # type: ignore[operator]


def test_a_given_trip_id_that_comes_back_is_its_second_part() -> None:
    """A given id that recurs after another trip is part 2 (``id~2``): no id twice."""
    rng = np.random.default_rng(3)
    a = burst(rng, 1, 0).with_columns(trip_id=pl.lit("t-1"))
    b = burst(rng, 1, 1).with_columns(trip_id=pl.lit("t-2"))
    c = burst(rng, 1, 2).with_columns(trip_id=pl.lit("t-1"))
    prepared = prepare(pl.concat([a, b, c]))
    assert prepared.features["trip_id"].to_list() == ["t-1", "t-1~2", "t-2"]
    assert prepared.counts["rows_in"] == prepared.counts["kept"] + prepared.counts["quarantined"]
    for trip_id, alone in (("t-2", prepare(b)), ("t-1~2", prepare(c))):
        assert_frame_equal(
            prepared.features.filter(pl.col("trip_id") == trip_id),
            alone.features.with_columns(trip_id=pl.lit(trip_id)),
            check_exact=True,
        )


def test_sorted_and_shuffled_input_give_the_same_result(fleet: pl.DataFrame) -> None:
    ordered = prepare(fleet.sort("vehicle_id", "ts", maintain_order=True))
    shuffled = prepare(fleet)
    assert_frame_equal(ordered.features, shuffled.features, check_exact=True)
    assert_frame_equal(
        ordered.pings.drop("source"), shuffled.pings.drop("source"), check_exact=True
    )


def test_trip_ids_repeated_across_vehicles_are_trips_of_each_vehicle() -> None:
    """Devices that number trips 1, 2, 3 give every vehicle the same ids: a trip is
    (vehicle, trip id), so each vehicle keeps its own trips, rows and distances."""
    rng = np.random.default_rng(11)
    bursts = {
        (f"veh-{vehicle:03d}", str(trip + 1)): burst(rng, vehicle, trip).with_columns(
            trip_id=pl.lit(str(trip + 1))
        )
        for vehicle in range(3)
        for trip in range(3)
    }
    prepared = prepare(pl.concat(list(bursts.values())))
    features = prepared.features
    assert features.height == 9
    assert set(features.select("vehicle_id", "trip_id").iter_rows()) == set(bursts)
    assert features.group_by("vehicle_id").len().sort("vehicle_id")["len"].to_list() == [3, 3, 3]
    for (vehicle, trip), pings in bursts.items():
        alone = prepare(pings).features
        assert alone.height == 1
        mine = features.filter((pl.col("vehicle_id") == vehicle) & (pl.col("trip_id") == trip))
        assert_frame_equal(mine, alone, check_exact=True)
        assert 0.2 < mine["distance_km"].item() < 50.0  # a few hundred pings at 1 Hz
