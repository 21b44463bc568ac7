"""Claims check, labels join and time split."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from driverscore.errors import InputDataError
from driverscore.training.dataset import check_labels, label_trips, time_split

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


# -- claims check -----------------------------------------------------------------------

#: ISO-8601 spellings, each read on its own by the parse claims had before they were
#: checked (polars' inferred format); these must keep giving the very same instants.
ISO_SPELLINGS = [
    "2026-01-05T10:00:00Z",
    "2026-01-05T10:00:00z",
    "2026-01-05T10:00:00.123Z",
    "2026-01-05T10:00:00.5",
    "2026-01-05T10:00:00+02:00",
    "2026-01-05T10:00:00+0200",
    "2026-01-05T10:00:00.123456789-05:30",
    "2026-01-05 10:00:00",
    "2026-01-05 10:00",
    "2026-01-05T10:00",
    "2026-01-05T10:00+02:00",
    "2026-01-05",
]


def _claims_text(rows: list[tuple[str | None, str | None, str | None]]) -> pl.DataFrame:
    """A claims table as a CSV reads: every column text."""
    return pl.DataFrame(
        {
            "vehicle_id": [r[0] for r in rows],
            "incident_ts": [r[1] for r in rows],
            "reported_at": [r[2] for r in rows],
            "severity": ["minor"] * len(rows),
        },
        schema={
            name: pl.String for name in ("vehicle_id", "incident_ts", "reported_at", "severity")
        },
    )


@pytest.mark.parametrize("text", ISO_SPELLINGS)
def test_iso_claim_times_parse_as_they_did_before_the_check(text: str) -> None:
    before = pl.Series([text]).str.to_datetime(time_zone="UTC", strict=False, time_unit="us")[0]
    checked = check_labels(_claims_text([("v1", text, "2026-02-01T00:00:00Z")]), "claims.csv")
    assert before is not None
    assert checked.rejected.height == 0
    assert checked.incidents["incident_ts"][0] == before
    assert checked.incidents.schema["incident_ts"] == UTC_US


def test_typed_claim_times_are_read_as_utc() -> None:
    naive = datetime(2026, 1, 5, 10)
    berlin = pl.Series([datetime(2026, 1, 5, 11)]).dt.replace_time_zone("Europe/Berlin")
    claims = pl.DataFrame(
        {
            "vehicle_id": ["v1"],
            "incident_ts": pl.Series([naive], dtype=pl.Datetime("ns")),
            "reported_at": berlin,
        }
    )
    checked = check_labels(claims, "claims.parquet")
    assert checked.rejected.height == 0
    assert checked.incidents["incident_ts"][0] == naive.replace(tzinfo=UTC)
    assert checked.incidents["reported_at"][0] == naive.replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("row", "reason", "value"),
    [
        ((None, "2026-01-05T10:00:00Z", "2026-01-06T00:00:00Z"), "missing_vehicle_id", None),
        (("  ", "2026-01-05T10:00:00Z", "2026-01-06T00:00:00Z"), "missing_vehicle_id", "  "),
        (
            ("v1", "08/01/2026 15:41", "2026-01-09T00:00:00Z"),
            "unparseable_incident_ts",
            "08/01/2026 15:41",
        ),
        (
            ("v1", "1767607200000", "2026-01-09T00:00:00Z"),
            "unparseable_incident_ts",
            "1767607200000",
        ),
        (("v1", "", "2026-01-06T00:00:00Z"), "missing_incident_ts", ""),
        (("v1", "2026-01-05T10:00:00Z", "next week"), "unparseable_reported_at", "next week"),
        (("v1", "2026-01-05T10:00:00Z", None), "missing_reported_at", None),
        (
            ("v1", "2026-01-05T10:00:00Z", "2026-01-05T09:59:59Z"),
            "reported_before_incident",
            "2026-01-05T09:59:59Z",
        ),
    ],
)
def test_a_bad_claim_row_is_kept_aside_with_its_reason_and_text(
    row: tuple[str | None, str | None, str | None], reason: str, value: str | None
) -> None:
    good = ("v9", "2026-01-05T10:00:00Z", "2026-01-06T00:00:00Z")
    checked = check_labels(_claims_text([good, row]), "claims.csv")
    assert checked.incidents["vehicle_id"].to_list() == ["v9"]
    rejected = checked.rejected.row(0, named=True)
    assert checked.rejected.height == 1
    assert (rejected["row"], rejected["reason"], rejected["value"]) == (2, reason, value)
    assert rejected["source"] == "claims.csv" and rejected["stage"] == "labels"
    assert json.loads(rejected["raw"]) == {
        "vehicle_id": row[0],
        "incident_ts": row[1],
        "reported_at": row[2],
        "severity": "minor",
    }
    assert checked.rejected_share == 0.5
    assert checked.report()["labels_rejected"] == {reason: 1}


def test_a_repeated_claim_keeps_its_first_report_and_loses_nothing() -> None:
    checked = check_labels(
        _claims_text(
            [
                ("v1", "2026-01-05T10:00:00Z", "2026-01-09T00:00:00Z"),
                ("v1", "2026-01-05 10:00:00", "2026-01-07T00:00:00Z"),  # same instant
                ("v1", "2026-01-05T10:00:01Z", "2026-01-08T00:00:00Z"),  # another incident
            ]
        ),
        "claims.csv",
    )
    assert checked.incidents["reported_at"].dt.day().to_list() == [7, 8]
    assert checked.rejected["row"].to_list() == [1]
    assert checked.rejected["reason"].to_list() == ["duplicate"]
    assert checked.rejected_share == 0.0
    report = checked.report()
    assert (report["labels_in"], report["labels_kept"], report["labels_duplicate"]) == (3, 2, 1)
    assert report["labels_rejected"] == {}


def test_claim_vehicle_ids_are_trimmed_like_ping_vehicle_ids() -> None:
    checked = check_labels(
        _claims_text([(" v1 ", "2026-01-05T10:00:00Z", "2026-01-06T00:00:00Z")]), "claims.csv"
    )
    assert checked.incidents["vehicle_id"].to_list() == ["v1"]


def test_claims_after_the_reference_time_are_not_rejected() -> None:
    # A backtest's reference time is in the past: later claims are unknown, not wrong.
    later = (REF + timedelta(days=3)).isoformat()
    checked = check_labels(_claims_text([("v1", later, later)]), "claims.csv")
    assert checked.rejected.height == 0 and checked.incidents.height == 1


def test_claims_without_a_time_column_or_with_numbers_are_refused() -> None:
    with pytest.raises(InputDataError, match=r"claims\.csv: labels lack column"):
        check_labels(pl.DataFrame({"vehicle_id": ["v1"], "incident_ts": ["x"]}), "claims.csv")
    numbers = pl.DataFrame({"vehicle_id": ["v1"], "incident_ts": [1], "reported_at": [2]})
    with pytest.raises(InputDataError, match="'incident_ts' has type Int64"):
        check_labels(numbers, "claims.jsonl")
