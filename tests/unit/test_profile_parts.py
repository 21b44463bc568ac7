"""Profile parts in the data store: written per model version and hour of trip end, merged
into windows exactly, never counted twice when a write fails part way."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from driverscore.adapters.profile_parts import KEY_COLUMNS, ProfilePartStore
from driverscore.adapters.storage import DataStore
from driverscore.domain.profiles import ProfileEdges, TripProfile, profile_trips
from driverscore.pipelines.monitoring_run import window_bounds, window_profile
from driverscore.services.profile_writer import (
    PeriodicFlush,
    ProfileWriter,
    ReferenceCache,
    write_scores_profiles,
)

NUMERIC = ("distance_km", "risk_probability", "score")
START = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)


def _records(n: int, seed: int, version: str = "3", hours: int = 3) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ends = [START + timedelta(seconds=int(s)) for s in rng.integers(0, hours * 3600, n)]
    p = rng.beta(1, 20, n)
    return pl.DataFrame(
        {
            "vehicle_id": [f"v{seed}-{i}" for i in range(n)],
            "trip_id": [f"t{i}" for i in range(n)],
            "driver_id": [f"d{i % 7}" for i in range(n)],
            "fleet_id": rng.choice(["F0", "F1"], n).tolist(),
            "client_id": rng.choice(["C0", "C1"], n).tolist(),
            "start_ts": [e - timedelta(minutes=20) for e in ends],
            "end_ts": ends,
            "distance_km": rng.lognormal(2.0, 0.7, n),
            "risk_probability": p,
            "score": 100 * (1 - p),
            "risk_band": rng.choice(["low", "high"], n).tolist(),
            "model_version": [version] * n,
            "model_role": ["champion"] * n,
            "scored_at": [START + timedelta(hours=hours)] * n,
        },
        schema_overrides={
            "start_ts": pl.Datetime("us", "UTC"),
            "end_ts": pl.Datetime("us", "UTC"),
            "scored_at": pl.Datetime("us", "UTC"),
        },
    )


@pytest.fixture(scope="module")
def reference() -> TripProfile:
    rows = _records(3_000, seed=0)
    return profile_trips(rows, ProfileEdges.fit(rows, NUMERIC))


@pytest.fixture
def parts(tmp_path: Path) -> ProfilePartStore:
    return ProfilePartStore(DataStore(str(tmp_path / "data"), {}))


def test_window_bounds_are_whole_hours_ending_at_the_hour_of_as_of() -> None:
    as_of = datetime(2026, 6, 8, 14, 37, 12, tzinfo=UTC)
    assert window_bounds(as_of, 168) == (
        datetime(2026, 6, 1, 14, tzinfo=UTC),
        datetime(2026, 6, 8, 14, tzinfo=UTC),
    )
    # Part of an hour is an hour: parts are whole hours.
    assert window_bounds(as_of, 0.25)[0] == datetime(2026, 6, 8, 13, tzinfo=UTC)


def test_a_process_writes_parts_per_version_and_hour_that_merge_into_the_window(
    parts: ProfilePartStore, reference: TripProfile
) -> None:
    answers: dict[str, bytes | None] = {"3": reference.to_json_bytes(), "4": None}
    writer = ProfileWriter(
        parts, ReferenceCache(answers.__getitem__, retry_s=0.0), source={"kind": "service"}
    )
    first, other = _records(400, seed=1), _records(50, seed=2, version="4")
    writer.observe(first.head(150))
    # The service hands its answers over unconverted; they become records at the flush.
    writer.observe_later([first.slice(150)], lambda items: pl.concat(items))
    writer.observe(other)
    done = writer.flush()
    assert done.rows_profiled == 400
    # A version without a reference waits for it instead of being dropped.
    assert done.rows_waiting == 50
    assert len(done.parts) == 3  # version 3: one part per hour of trip end
    window = window_profile(parts, "3", reference, START, START + timedelta(hours=3))
    assert window.parts == 3
    assert window.profile.equals(profile_trips(first, reference.edges))
    # Hours are whole: a window of the middle hour is that hour's trips exactly.
    middle = window_profile(
        parts, "3", reference, START + timedelta(hours=1), START + timedelta(hours=2)
    ).profile
    in_middle = first.filter(
        (pl.col("end_ts") >= START + timedelta(hours=1))
        & (pl.col("end_ts") < START + timedelta(hours=2))
    )
    assert middle.equals(profile_trips(in_middle, reference.edges))
    # Keys beside the parts: what performance reads, not the features.
    keys = parts.keys("3", START, START + timedelta(hours=3))
    assert set(keys.columns) == set(KEY_COLUMNS)
    assert keys.height == 400
    # Version 4's reference arrives: its trips are written at the next flush.
    other_reference = profile_trips(other, ProfileEdges.fit(other, NUMERIC))
    answers["4"] = other_reference.to_json_bytes()
    later = writer.flush()
    assert later.rows_profiled == 50 and later.rows_waiting == 0
    merged = window_profile(parts, "4", other_reference, START, START + timedelta(hours=3))
    assert merged.profile.equals(profile_trips(other, other_reference.edges))


class _FailingOnce(ProfilePartStore):
    """A store that fails the second part it is asked to write, once."""

    def __init__(self, store: DataStore) -> None:
        super().__init__(store)
        self.calls = 0

    def write_part(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        if self.calls == 2:
            raise OSError("store unreachable")
        return super().write_part(*args, **kwargs)


def test_a_failed_write_counts_no_trip_twice_and_loses_none(
    tmp_path: Path, reference: TripProfile
) -> None:
    parts = _FailingOnce(DataStore(str(tmp_path / "data"), {}))
    writer = ProfileWriter(
        parts, ReferenceCache(lambda _v: reference.to_json_bytes()), source={"kind": "stream"}
    )
    records = _records(300, seed=3)
    writer.observe(records)
    with pytest.raises(OSError, match="unreachable"):
        writer.flush()
    # The first hour is stored; the other two wait and are written next time, once.
    assert len(parts.parts("3", START, START + timedelta(hours=3))) == 1
    again = writer.flush()
    assert (
        again.rows_profiled + 0
        == records.filter(pl.col("end_ts") >= START + timedelta(hours=1)).height
    )
    window = window_profile(parts, "3", reference, START, START + timedelta(hours=3))
    assert window.profile.equals(profile_trips(records, reference.edges))


def test_scores_datasets_are_marked_and_rewritten_in_place(
    parts: ProfilePartStore, reference: TripProfile
) -> None:
    store = parts.store
    scores = _records(200, seed=4)
    ref = store.write_dataset("scores", scores, name="scores")
    first = write_scores_profiles(parts, scores, ref, {"3": reference, "9": reference})
    again = write_scores_profiles(parts, scores, ref, {"3": reference})
    assert first["3"] == again["3"]
    # A version without trips in the dataset is marked too, with no parts.
    assert first["9"] == []
    assert parts.profiled_scores("3") == parts.profiled_scores("9") == {ref.version}
    window = window_profile(parts, "3", reference, START, START + timedelta(hours=3))
    assert window.profile.equals(profile_trips(scores, reference.edges))
    assert window.sources == [ref.uri]
    # Batch parts carry no keys: the scores dataset has them.
    assert parts.keys("3", START, START + timedelta(hours=3)).height == 0
    stored = json.loads(parts.store.read_object(first["3"][0]))
    assert stored["reference_profile_sha256"] == reference.sha256()
    assert "edges" not in stored["profile"]


def test_a_long_running_process_flushes_its_parts_on_a_clock_and_when_it_stops(
    tmp_path: Path, reference: TripProfile, caplog: pytest.LogCaptureFixture
) -> None:
    parts = _FailingOnce(DataStore(str(tmp_path / "data"), {}))
    parts.calls = 1  # the next write fails
    writer = ProfileWriter(
        parts, ReferenceCache(lambda _v: reference.to_json_bytes()), source={"kind": "stream"}
    )
    records = _records(100, seed=5, hours=1)
    writer.observe(records)
    flusher = PeriodicFlush(writer, interval_s=3600.0).start()
    flusher.flush()  # what the clock does: a failure is logged, not raised, and retried
    assert "could not be written" in caplog.text
    assert parts.parts("3", START, START + timedelta(hours=1)) == []
    flusher.stop()  # the last flush, when the process stops
    window = window_profile(parts, "3", reference, START, START + timedelta(hours=1))
    assert window.profile.equals(profile_trips(records, reference.edges))
