"""Mergeable profiles: merge of parts equals the profile of the whole, and the statistics
computed from profiles match the exact ones on the rows."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from driverscore.domain.drift import ks_statistic, wasserstein
from driverscore.domain.profiles import (
    ColumnEdges,
    ProfileEdges,
    TripProfile,
    merge_profiles,
    profile_trips,
    profile_trips_by_hour,
)

NUMERIC = ("distance_km", "hard_brake_per_100km", "speeding_share")


def _reference(rng: np.random.Generator, n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "distance_km": rng.lognormal(2.0, 0.8, n),
            "hard_brake_per_100km": np.where(rng.random(n) < 0.6, 0.0, rng.exponential(5.0, n)),
            "speeding_share": np.where(rng.random(n) < 0.1, np.nan, rng.beta(1, 8, n)),
            "fleet_id": rng.choice(["fleet-a", "fleet-b", "fleet-c"], n).tolist(),
            "client_id": rng.choice(["c1", "c2", None], n).tolist(),
            "event_source": rng.choice(["imu", "gps"], n).tolist(),
            "risk_band": rng.choice(["low", "moderate", "high"], n).tolist(),
        }
    )


@pytest.fixture(scope="module")
def edges() -> ProfileEdges:
    return ProfileEdges.fit(_reference(np.random.default_rng(0), 5_000), NUMERIC)


values = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(min_value=-5, max_value=500),
    st.sampled_from([0.0, 1.0, 1e9, -1e12, 3.4e38]),
)
rows = st.lists(
    st.tuples(
        values,
        values,
        st.one_of(st.none(), st.floats(min_value=0, max_value=1)),
        st.sampled_from(["fleet-a", "fleet-b", "fleet-new", None]),
        st.sampled_from(["c1", "c2", None]),
    ),
    min_size=0,
    max_size=60,
)


def _frame(data: list[tuple[object, ...]]) -> pl.DataFrame:
    columns = list(zip(*data, strict=True)) if data else [()] * 5
    return pl.DataFrame(
        {
            "distance_km": pl.Series(columns[0], dtype=pl.Float64),
            "hard_brake_per_100km": pl.Series(columns[1], dtype=pl.Float64),
            "speeding_share": pl.Series(columns[2], dtype=pl.Float64),
            "fleet_id": pl.Series(columns[3], dtype=pl.String),
            "client_id": pl.Series(columns[4], dtype=pl.String),
        }
    )


@settings(derandomize=True, max_examples=150, deadline=None)
@given(rows, st.lists(st.integers(min_value=0, max_value=60), max_size=4))
def test_merge_of_parts_equals_profile_of_the_whole(
    edges: ProfileEdges, data: list[tuple[object, ...]], cuts: list[int]
) -> None:
    whole = _frame(data)
    bounds = sorted({0, whole.height, *(min(c, whole.height) for c in cuts)})
    parts = [whole.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    merged = merge_profiles((profile_trips(p, edges) for p in parts), edges)
    expected = profile_trips(whole, edges)
    assert merged.equals(expected)
    # And the order of the parts does not matter.
    assert merge_profiles(reversed([profile_trips(p, edges) for p in parts]), edges).equals(
        expected
    )


@settings(derandomize=True, max_examples=100, deadline=None)
@given(
    rows, st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=4 * 3600)), max_size=60)
)
def test_hourly_profiles_are_the_profiles_of_each_hour(
    edges: ProfileEdges, data: list[tuple[object, ...]], seconds: list[int | None]
) -> None:
    start = datetime(2026, 3, 1, 22, 0, tzinfo=UTC)
    frame = _frame(data)
    ends = [None if s is None else start + timedelta(seconds=s) for s in seconds]
    ends = (ends + [None] * frame.height)[: frame.height]
    frame = frame.with_columns(end_ts=pl.Series(ends, dtype=pl.Datetime("us", "UTC")))
    hourly = profile_trips_by_hour(frame, edges)
    hours = frame.with_columns(hour=pl.col("end_ts").dt.truncate("1h"))
    expected = {
        h: hours.filter(pl.col("hour") == h)
        for h in hours.get_column("hour").drop_nulls().unique().to_list()
    }
    assert set(hourly) == set(expected)
    for hour, rows_of_hour in expected.items():
        assert hour.minute == 0 and hour.tzinfo is not None
        assert hourly[hour].equals(profile_trips(rows_of_hour.drop("hour"), edges))
    # Trips without an end time are in no hour; every other trip is in exactly one.
    timed = frame.get_column("end_ts").is_not_null().sum()
    assert merge_profiles(hourly.values(), edges).rows == timed


def test_profile_counts_survive_json_on_the_reference_edges(edges: ProfileEdges) -> None:
    profile = profile_trips(_reference(np.random.default_rng(4), 500), edges)
    counts = json.loads(json.dumps(profile.counts_to_dict()))
    assert "edges" not in counts
    assert TripProfile.from_counts(counts, edges).equals(profile)


def test_profile_survives_json(edges: ProfileEdges) -> None:
    profile = profile_trips(_reference(np.random.default_rng(1), 2_000), edges)
    text = json.dumps(profile.to_dict())
    back = TripProfile.from_dict(json.loads(text))
    assert back.equals(profile)
    assert back.slices["fleet_id"]["fleet-b"].rows == profile.slices["fleet_id"]["fleet-b"].rows


def test_profile_counts_missing_range_and_categories(edges: ProfileEdges) -> None:
    frame = pl.DataFrame(
        {
            "distance_km": [1.0, None, float("nan"), 1e6],
            "speeding_share": [0.5, 0.5, None, 0.0],
            "fleet_id": ["fleet-a", "fleet-a", None, "fleet-new"],
            "event_source": ["gps", "gps", "imu", None],
        }
    )
    profile = profile_trips(frame, edges)
    distance = profile.overall.numeric["distance_km"]
    assert (distance.count, distance.missing, distance.minimum, distance.maximum) == (
        4,
        2,
        1.0,
        1e6,
    )
    # 1e6 km lies beyond the reference maximum: the open top bin, with its exact excess.
    assert distance.counts[-1] == 1
    top = edges.numeric["distance_km"].edges[-1]
    assert distance.excess_above == round((1e6 - top) * 2**20)
    # A column absent from the frame counts every trip as missing.
    assert profile.overall.numeric["hard_brake_per_100km"].missing == 4
    assert profile.overall.categorical["fleet_id"].counts == {"fleet-a": 2, "fleet-new": 1}
    assert profile.overall.categorical["fleet_id"].missing == 1
    assert set(profile.slices["fleet_id"]) == {"fleet-a", "fleet-new", "<missing>"}
    assert profile.slices["fleet_id"]["fleet-a"].rows == 2


def test_profiles_of_different_references_do_not_merge(edges: ProfileEdges) -> None:
    other = ProfileEdges.fit(_reference(np.random.default_rng(9), 1_000), NUMERIC)
    frame = _reference(np.random.default_rng(2), 10)
    with pytest.raises(ValueError, match="different edges"):
        profile_trips(frame, edges).merge(profile_trips(frame, other))


def test_point_masses_start_their_own_bins() -> None:
    values = np.array([0.0] * 70 + [1.0] * 20 + [2.0] * 10)
    column = ColumnEdges.fit("hard_brake_count", values)
    assert column.edges[:3] == (0.0, 1.0, 2.0)
    assert set(column.atoms) == {1, 2, 3}


@pytest.mark.parametrize(
    ("name", "shift"),
    [
        ("lognormal x1.1", lambda r, n: r.lognormal(0, 0.5, n) * 1.1),
        ("10 % in km/h", lambda r, n: r.lognormal(0, 0.5, n) * np.where(r.random(n) < 0.1, 3.6, 1)),
        ("small shift", lambda r, n: r.lognormal(0.02, 0.5, n)),
    ],
)
def test_ks_and_wasserstein_from_profiles_match_scipy(name: str, shift: object) -> None:
    rng = np.random.default_rng(3)
    n = 100_000
    reference = rng.lognormal(0, 0.5, n)
    current = shift(rng, n)  # type: ignore[operator]
    edges = ProfileEdges.fit(pl.DataFrame({"x": reference}), ["x"], categorical=(), slices=())
    ref = profile_trips(pl.DataFrame({"x": reference}), edges).overall.numeric["x"]
    cur = profile_trips(pl.DataFrame({"x": current}), edges).overall.numeric["x"]
    exact_ks = stats.ks_2samp(reference, current).statistic
    assert abs(ks_statistic(ref.counts, cur.counts) - exact_ks) <= 0.005
    exact_w = stats.wasserstein_distance(reference, current)
    assert wasserstein(ref, cur, edges.numeric["x"]) == pytest.approx(exact_w, rel=0.01)
