"""Holdout metrics and the validation gate."""

from __future__ import annotations

import numpy as np
import pytest

from driverscore.settings import GateConfig
from driverscore.training.gate import Metrics, evaluate, expected_calibration_error, run_gate


def _holdout(signal: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities whose ranking power grows with ``signal``."""
    rng = np.random.default_rng(seed)
    z = -3.0 + signal * rng.normal(size=n)
    p = 1.0 / (1.0 + np.exp(-z))
    y = (rng.random(n) < p).astype(int)
    return y, p


def test_metrics_on_a_perfect_ranking() -> None:
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    m = evaluate(y, p, threshold=0.5)
    assert m.roc_auc == 1.0 and m.pr_auc == pytest.approx(1.0) and m.f1 == 1.0
    assert m.n == 5 and m.positive_rate == pytest.approx(0.4)
    assert m.brier == pytest.approx(np.mean((p - y) ** 2))


def test_expected_calibration_error() -> None:
    y, p = _holdout(1.5, n=50_000)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p * 2, 0, 1)) > 0.02


def test_per_fleet_slices_need_enough_trips() -> None:
    y, p = _holdout(1.5, n=1000)
    fleets = np.array(["big"] * 900 + ["small"] * 100)
    m = evaluate(y, p, 0.2, fleets, min_slice_trips=200)
    assert list(m.per_fleet) == ["big"] and m.per_fleet["big"].n == 900
    assert "fleet.big.roc_auc" in m.flat()


def test_single_class_holdout_fails_the_gate() -> None:
    m = evaluate(np.zeros(100), np.full(100, 0.05), 0.5)
    assert m.roc_auc is None
    report = run_gate(m, None, GateConfig())
    assert not report.passed and "only one class" in report.failures[0]


def test_good_candidate_passes() -> None:
    y, p = _holdout(2.0)
    report = run_gate(evaluate(y, p, 0.2), None, GateConfig())
    assert report.passed, report.failures
    assert report.failures == []


def test_low_auc_fails() -> None:
    y, _ = _holdout(2.0)
    noise = np.random.default_rng(5).uniform(0.0, 0.2, y.size)
    report = run_gate(evaluate(y, noise, 0.1), None, GateConfig())
    assert not report.passed
    assert any(f.startswith("ROC-AUC") and "below the minimum" in f for f in report.failures)
    assert any(f.startswith("PR-AUC") for f in report.failures)


def test_poor_calibration_fails() -> None:
    y, p = _holdout(2.0)
    report = run_gate(evaluate(y, np.clip(p * 3, 0, 1), 0.2), None, GateConfig())
    assert any("calibration error" in f for f in report.failures)


def test_worse_than_champion_fails() -> None:
    y, p_champion = _holdout(2.5, seed=1)
    rng = np.random.default_rng(2)
    # Same trips and labels, blurred ranking: a weaker model on the same holdout.
    logit = np.log(p_champion / (1 - p_champion)) + rng.normal(scale=1.5, size=y.size)
    p_candidate = 1 / (1 + np.exp(-logit))
    champion, candidate = evaluate(y, p_champion, 0.2), evaluate(y, p_candidate, 0.2)
    config = GateConfig(max_calibration_error=1.0, max_brier=1.0, min_roc_auc=0.5)
    report = run_gate(candidate, champion, config)
    assert not report.passed
    assert any("trails the champion" in f for f in report.failures)
    assert run_gate(champion, candidate, config).passed


def test_champion_on_another_holdout_is_an_error() -> None:
    y, p = _holdout(2.0)
    a = evaluate(y, p, 0.2)
    b = evaluate(y[:100], p[:100], 0.2)
    with pytest.raises(ValueError, match="same holdout"):
        run_gate(a, b, GateConfig())


def test_report_round_trips_through_json() -> None:
    y, p = _holdout(2.0)
    report = run_gate(evaluate(y, p, 0.2, ["f"] * y.size), None, GateConfig())
    assert type(report).model_validate_json(report.model_dump_json()) == report
    assert isinstance(report.candidate, Metrics)
