"""Labels join and time split."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from driverscore.training.dataset import label_trips, time_split

T0 = datetime(2026, 1, 1, tzinfo=UTC)
REF = T0 + timedelta(days=30)
UTC_US = pl.Datetime("us", "UTC")


def _trips() -> pl.DataFrame:
    rows = [
        # trip, vehicle, start (h after T0), end (h after T0)
        ("t1", "v1", 0, 1),
        ("t2", "v1", 2, 3),
        ("t3", "v2", 0, 1),
        ("t4", "v2", 5, 6),
        ("t5", "v1", 24 * 27, 24 * 27 + 1),  # ends 3 days before REF: not mature
    ]
    return pl.DataFrame(
        {
            "trip_id": [r[0] for r in rows],
            "vehicle_id": [r[1] for r in rows],
            "start_ts": pl.Series([T0 + timedelta(hours=r[2]) for r in rows], dtype=UTC_US),
            "end_ts": pl.Series([T0 + timedelta(hours=r[3]) for r in rows], dtype=UTC_US),
            "distance_km": [1.0] * len(rows),
        }
    )


def _incidents(rows: list[tuple[str, float, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "vehicle_id": [r[0] for r in rows],
            "driver_id": [r[0] for r in rows],
            "incident_ts": pl.Series([T0 + timedelta(hours=r[1]) for r in rows], dtype=UTC_US),
            "reported_at": pl.Series([T0 + timedelta(days=r[2]) for r in rows], dtype=UTC_US),
            "severity": ["minor"] * len(rows),
        },
        schema_overrides={"vehicle_id": pl.String, "driver_id": pl.String},
    )


def _labels(frame: pl.DataFrame) -> dict[str, int]:
    return dict(zip(frame["trip_id"], frame["incident"], strict=True))


def test_incident_inside_a_trip_of_its_vehicle_is_positive() -> None:
    incidents = _incidents(
        [
            ("v1", 0.5, 1),  # inside t1
            ("v1", 1.5, 1),  # between t1 and t2: no trip
            ("v2", 5.0, 1),  # exactly at t4 start: inclusive
            ("v3", 0.5, 1),  # unknown vehicle
        ]
    )
    out = label_trips(_trips(), incidents, REF, maturity_days=7)
    assert _labels(out) == {"t1": 1, "t2": 0, "t3": 0, "t4": 1}
    assert out.schema["incident"] == pl.Int8
    assert "distance_km" in out.columns


def test_incident_at_trip_end_is_inclusive() -> None:
    out = label_trips(_trips(), _incidents([("v1", 3.0, 1)]), REF, maturity_days=7)
    assert _labels(out)["t2"] == 1


def test_claims_reported_after_the_reference_time_are_unknown() -> None:
    late = _incidents([("v1", 0.5, 31)])  # reported a day after REF
    assert _labels(label_trips(_trips(), late, REF, 7))["t1"] == 0
    assert _labels(label_trips(_trips(), late, REF + timedelta(days=2), 7))["t1"] == 1


def test_immature_trips_are_dropped() -> None:
    incidents = _incidents([("v1", 24 * 27 + 0.5, 28)])
    assert "t5" not in label_trips(_trips(), incidents, REF, maturity_days=7)["trip_id"]
    assert _labels(label_trips(_trips(), incidents, REF, maturity_days=2))["t5"] == 1


def test_no_incidents_means_all_negative() -> None:
    out = label_trips(_trips(), _incidents([]), REF, 7)
    assert out["incident"].sum() == 0 and out.height == 4


def test_a_trip_id_of_two_vehicles_is_labelled_for_the_vehicle_of_the_incident() -> None:
    # Devices number trips 1, 2, 3: a trip is (vehicle, trip id).
    counters = {"t1": "1", "t2": "2", "t3": "1", "t4": "2", "t5": "3"}
    trips = _trips().with_columns(pl.col("trip_id").replace_strict(counters))
    out = label_trips(trips, _incidents([("v2", 0.5, 1)]), REF, maturity_days=7)
    labelled = out.filter(pl.col("incident") == 1)
    assert labelled.select("vehicle_id", "trip_id").rows() == [("v2", "1")]
    assert out.height == 4


def test_naive_reference_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        label_trips(_trips(), _incidents([]), datetime(2026, 2, 1), 7)


def test_time_split_holds_out_the_newest_trips() -> None:
    n = 20
    frame = pl.DataFrame(
        {
            "trip_id": [f"t{i:02d}" for i in range(n)],
            "end_ts": pl.Series(
                [T0 + timedelta(hours=(7 * i) % n) for i in range(n)], dtype=UTC_US
            ),
        }
    )
    train, holdout = time_split(frame, 0.25)
    assert (train.height, holdout.height) == (15, 5)
    assert train["end_ts"].max() <= holdout["end_ts"].min()  # type: ignore[operator]
    assert set(train["trip_id"]) | set(holdout["trip_id"]) == set(frame["trip_id"])
    with pytest.raises(ValueError):
        time_split(frame, 1.0)


def test_time_split_keeps_both_sides_non_empty() -> None:
    frame = pl.DataFrame({"trip_id": ["a", "b"], "end_ts": pl.Series([T0, T0], dtype=UTC_US)})
    train, holdout = time_split(frame, 0.01)
    assert (train.height, holdout.height) == (1, 1)
