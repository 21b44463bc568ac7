"""Rollout rules: canary share, stickiness, monotone growth, shadow."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from driverscore.domain.rollout import BUCKETS, RolloutPolicy, canary_bucket, decide

DRIVERS = [f"driver-{i}" for i in range(10_000)]


def _challenger_share(policy: RolloutPolicy) -> float:
    hits = sum(decide(policy, d, has_challenger=True).answered_by == "challenger" for d in DRIVERS)
    return 100.0 * hits / len(DRIVERS)


@pytest.mark.parametrize("percent", [0.0, 1.0, 10.0, 25.0, 50.0, 90.0, 100.0])
def test_canary_share_is_within_three_points(percent: float) -> None:
    share = _challenger_share(RolloutPolicy(mode="canary", challenger_percent=percent))
    assert abs(share - percent) <= 3.0
    if percent in (0.0, 100.0):
        assert share == percent


def test_canary_is_sticky_and_only_grows() -> None:
    small = RolloutPolicy(mode="canary", challenger_percent=10)
    large = RolloutPolicy(mode="canary", challenger_percent=30)
    first = [decide(small, d, True).answered_by for d in DRIVERS]
    again = [decide(small, d, True).answered_by for d in DRIVERS]
    assert first == again
    grown = [decide(large, d, True).answered_by for d in DRIVERS]
    # Raising the share moves drivers to the challenger, never back to the champion.
    assert all(g == "challenger" for f, g in zip(first, grown, strict=True) if f == "challenger")
    assert grown.count("challenger") > first.count("challenger")


def test_bucket_is_stable_across_processes_and_salted() -> None:
    # SHA-256 based: a fixed value, not Python's per-process randomised hash().
    assert canary_bucket("driver-42", "driverscore") == canary_bucket("driver-42", "driverscore")
    assert 0 <= canary_bucket("driver-42", "driverscore") < BUCKETS
    salted = [canary_bucket(d, "other") for d in DRIVERS[:200]]
    plain = [canary_bucket(d, "driverscore") for d in DRIVERS[:200]]
    assert salted != plain


def test_shadow_answers_with_champion_and_scores_challenger() -> None:
    decision = decide(RolloutPolicy(mode="shadow"), "d", has_challenger=True)
    assert decision.answered_by == "champion" and decision.shadow and decision.role == "champion"


def test_without_challenger_champion_answers_everything() -> None:
    for mode in ("champion", "canary", "shadow"):
        policy = RolloutPolicy(mode=mode, challenger_percent=100)
        decision = decide(policy, "d", has_challenger=False)
        assert decision.answered_by == "champion" and not decision.shadow


def test_policy_rejects_out_of_range_share() -> None:
    with pytest.raises(ValidationError):
        RolloutPolicy(mode="canary", challenger_percent=101)
    with pytest.raises(ValidationError):
        RolloutPolicy(mode="canary", challenger_percent=float("nan"))


def test_canary_buckets_are_pinned_across_processes_and_releases() -> None:
    # Known values: SHA-256 of salt NUL driver, first 8 bytes big-endian, mod 10,000. A
    # change here would move drivers between champion and challenger mid-rollout.
    assert canary_bucket("D1", "driverscore") == 6265
    assert canary_bucket("driver-42", "driverscore") == 119
    assert canary_bucket("", "driverscore") == 4295
    assert canary_bucket("D1", "s2") == 4928


def test_canary_scores_every_trip_with_both_models() -> None:
    policy = RolloutPolicy(mode="canary", challenger_percent=50)
    decisions = [decide(policy, f"d{i}", has_challenger=True) for i in range(200)]
    assert all(d.shadow for d in decisions)
    assert {d.role for d in decisions} == {"champion", "challenger"}
    assert all(d.role == d.answered_by for d in decisions)
