"""The decision statistics against independent computations, and the decision rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from driverscore.domain.decision import (
    DecisionConfig,
    LabelledPairs,
    OperationalStats,
    WatchInput,
    bootstrap_auc_difference,
    decide_challenger,
    delong_auc_difference,
    judge_watch,
    paired_loss_difference,
    rankdata,
    score_shift,
)

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _naive_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong (1988) from its definition: O(m*n) placement values, ties counted as 1/2."""

    def placements(s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        pos, neg = s[y == 1], s[y == 0]
        kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return float(kernel.mean()), kernel.mean(axis=1), kernel.mean(axis=0)

    auc_a, v10_a, v01_a = placements(a)
    auc_b, v10_b, v01_b = placements(b)
    m, n = v10_a.size, v01_a.size
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    cov = s10 / m + s01 / n
    return auc_b - auc_a, float(np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))


def _traffic(n: int, seed: int, challenger_noise: float, champion_noise: float = 1.0):
    """Trips with a latent risk; each model sees it through its own noise (less: better)."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(risk * 1.5 - 2.5)))).astype(np.int_)

    def model(noise: float) -> np.ndarray:
        return 1 / (1 + np.exp(-((risk + rng.normal(scale=noise, size=n)) * 1.5 - 2.5)))

    return y, model(champion_noise), model(challenger_noise)


def test_midranks_share_ties() -> None:
    assert rankdata([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_delong_matches_its_definition_and_sklearn() -> None:
    y, a, b = _traffic(600, seed=1, challenger_noise=0.5)
    a = np.round(a, 2)  # ties, which the midranks must handle as the definition does
    result = delong_auc_difference(y, a, b, 0.95)
    diff, se = _naive_delong(y, a, b)
    assert result.champion == pytest.approx(roc_auc_score(y, a))
    assert result.challenger == pytest.approx(roc_auc_score(y, b))
    assert result.improvement == pytest.approx(diff)
    assert (result.upper - result.improvement) / 1.6448536 == pytest.approx(se, rel=1e-6)


def test_delong_known_case() -> None:
    # A hand-checked case: 3 positives, 3 negatives. Champion AUC 7/9 (0.4 and 0.3
    # lose to 0.5), challenger 1.
    y = np.array([1, 1, 1, 0, 0, 0])
    champion = np.array([0.9, 0.4, 0.3, 0.5, 0.2, 0.1])
    challenger = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    result = delong_auc_difference(y, champion, challenger, 0.95)
    assert result.champion == pytest.approx(7 / 9)
    assert result.challenger == pytest.approx(1.0)
    diff, se = _naive_delong(y, champion, challenger)
    assert result.improvement == pytest.approx(diff)
    assert result.p_value == pytest.approx(
        2 * (1 - __import__("statistics").NormalDist().cdf(diff / se))
    )


def test_bootstrap_agrees_with_delong_and_is_reproducible() -> None:
    y, a, b = _traffic(1500, seed=2, challenger_noise=0.6)
    delong = delong_auc_difference(y, a, b, 0.95)
    boot = bootstrap_auc_difference(y, a, b, 0.95, samples=400, seed=7)
    assert boot == bootstrap_auc_difference(y, a, b, 0.95, samples=400, seed=7)
    assert boot.improvement == pytest.approx(delong.improvement)
    assert boot.lower == pytest.approx(delong.lower, abs=0.01)
    assert boot.upper == pytest.approx(delong.upper, abs=0.01)


def test_paired_losses_match_sklearn() -> None:
    y, a, b = _traffic(800, seed=3, challenger_noise=0.5)
    ll = paired_loss_difference("log_loss", y, a, b, 0.95)
    brier = paired_loss_difference("brier", y, a, b, 0.95)
    assert ll.champion == pytest.approx(log_loss(y, a))
    assert ll.improvement == pytest.approx(log_loss(y, a) - log_loss(y, b))
    assert brier.improvement == pytest.approx(brier_score_loss(y, a) - brier_score_loss(y, b))
    assert ll.lower < ll.improvement < ll.upper


def test_score_shift_is_zero_for_the_same_scores_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(4)
    p = rng.beta(2, 20, 5000)
    assert score_shift(p, p) == pytest.approx(0.0, abs=1e-12)
    assert score_shift(p, np.clip(p * 3, 0, 1)) > 0.5


def _labelled(y: np.ndarray, a: np.ndarray, b: np.ndarray, fleets: np.ndarray | None = None):
    slices = {"fleet_id": fleets.astype(object)} if fleets is not None else {}
    return LabelledPairs(y=y, champion=a, challenger=b, slices=slices)


def _decide(y, a, b, *, labelled=True, ops=None, fleets=None, days=3.0, **config):
    return decide_challenger(
        a,
        b,
        _labelled(y, a, b, fleets) if labelled else None,
        ops or OperationalStats(),
        started_at=NOW - timedelta(days=days),
        now=NOW,
        config=DecisionConfig(**config),
    )


def test_a_better_challenger_is_promoted_and_a_worse_one_rejected_on_the_same_trips() -> None:
    y, champion, better = _traffic(4000, seed=5, challenger_noise=0.4)
    # The champion's log-odds blurred by more noise: the same scale, less information.
    noise = np.random.default_rng(6).normal(scale=1.5, size=y.size)
    worse = 1 / (1 + np.exp(-(np.log(champion / (1 - champion)) + noise)))
    promoted = _decide(y, champion, better)
    rejected = _decide(y, champion, worse, max_score_psi=10.0)
    assert promoted.action == "promote", promoted.reasons
    assert rejected.action == "reject", rejected.reasons
    assert promoted.evidence["roc_auc.lower"] >= 0.005
    assert "worse" in " ".join(rejected.reasons)


def test_before_labels_guardrails_can_reject_but_never_promote() -> None:
    y, champion, better = _traffic(4000, seed=5, challenger_noise=0.4)
    waiting = _decide(y, champion, better, labelled=False)
    assert waiting.action == "collect"
    failing = _decide(
        y,
        champion,
        better,
        labelled=False,
        ops=OperationalStats(champion_error_rate=0.0, challenger_error_rate=0.05),
    )
    assert failing.action == "reject"
    assert "failed 5.00%" in failing.reasons[0]
    shifted = _decide(y, champion, np.clip(champion * 4, 0, 1), labelled=False)
    assert shifted.action == "reject"
    assert "PSI" in shifted.reasons[0]


def test_a_slice_regression_blocks_a_promotion() -> None:
    y, champion, better = _traffic(4000, seed=5, challenger_noise=0.4)
    fleets = np.where(np.arange(y.size) % 4 == 0, "F-bad", "F-good")
    # In one fleet the challenger says the opposite of the truth.
    broken = np.where(fleets == "F-bad", 1 - better, better)
    verdict = _decide(y, champion, broken, fleets=fleets, max_score_psi=10.0, min_effect=0.0)
    assert verdict.action == "reject"
    assert any("fleet_id F-bad" in r for r in verdict.reasons), verdict.reasons
    assert not any("F-good" in r for r in verdict.reasons)


def test_an_inconclusive_challenger_collects_then_times_out() -> None:
    y, champion, same = _traffic(4000, seed=7, challenger_noise=1.0)
    assert _decide(y, champion, same, min_effect=0.0).action == "collect"
    late = _decide(y, champion, same, min_effect=0.0, days=30)
    assert late.action == "reject"
    assert "time limit" in late.reasons[0]


def test_watch_rolls_back_on_a_score_shift_or_worse_realised_loss() -> None:
    rng = np.random.default_rng(8)
    previous = rng.beta(2, 20, 2000)
    config = DecisionConfig()
    calm = judge_watch(WatchInput(rng.beta(2, 20, 2000), previous, OperationalStats()), config)
    assert calm.action == "collect"
    shifted = judge_watch(
        WatchInput(np.clip(rng.beta(2, 20, 2000) * 5, 0, 1), previous, OperationalStats()), config
    )
    assert shifted.action == "reject"
    assert "new champion's scores shifted from the previous champion's" in shifted.reasons[0]
    y = (rng.random(2000) < 0.1).astype(np.int_)
    worse = judge_watch(
        WatchInput(
            rng.beta(2, 20, 2000),
            previous,
            OperationalStats(),
            labelled_y=y,
            labelled_p=np.full(2000, 0.6),
            previous_log_loss=0.3,
        ),
        config,
    )
    assert worse.action == "reject"
    assert "realised log-loss" in worse.reasons[0]
