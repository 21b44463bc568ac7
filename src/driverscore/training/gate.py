"""Validation gate: holdout metrics and the rules a candidate must pass before it may serve."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

from driverscore.settings import GateConfig

__all__ = [
    "GateReport",
    "Metrics",
    "SliceMetrics",
    "evaluate",
    "expected_calibration_error",
    "run_gate",
]


class SliceMetrics(BaseModel):
    """Metrics of one set of trips. Ranking metrics are ``None`` when only one class is present."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int
    positive_rate: float
    threshold: float
    f1: float
    roc_auc: float | None
    pr_auc: float | None
    brier: float
    calibration_error: float
    mean_probability: float


class Metrics(SliceMetrics):
    """Overall holdout metrics plus per-fleet slices (fleets with at least ``min_slice_trips``)."""

    per_fleet: dict[str, SliceMetrics] = {}

    def flat(self) -> dict[str, float]:
        """``name -> value`` for metric logging; per-fleet values as ``fleet.<id>.<name>``."""
        out = _flat(self)
        for fleet, m in self.per_fleet.items():
            out.update({f"fleet.{fleet}.{k}": v for k, v in _flat(m).items()})
        return out


def _flat(m: SliceMetrics) -> dict[str, float]:
    names = (
        "n",
        "positive_rate",
        "f1",
        "roc_auc",
        "pr_auc",
        "brier",
        "calibration_error",
        "mean_probability",
    )
    values = {k: getattr(m, k) for k in names}
    return {k: float(v) for k, v in values.items() if v is not None}


class GateReport(BaseModel):
    """Outcome of the gate: ``passed`` and, when not, every failed rule in words."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    passed: bool
    failures: list[str]
    candidate: Metrics
    champion: Metrics | None
    config: GateConfig


def expected_calibration_error(
    y_true: npt.ArrayLike, probability: npt.ArrayLike, bins: int = 10
) -> float:
    """Mean |observed rate − mean probability| over ``bins`` equal-count bins, weighted by size.

    Equal-count (quantile) bins rather than fixed-width ones: with rare incidents almost all
    probabilities sit below 0.1, so fixed-width bins would put nearly every trip in one bin.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(probability, dtype=np.float64)
    if y.size == 0:
        return 0.0
    order = np.argsort(p, kind="stable")
    error = 0.0
    for chunk in np.array_split(order, min(bins, y.size)):
        error += chunk.size * abs(float(y[chunk].mean()) - float(p[chunk].mean()))
    return error / y.size


def _slice(y: npt.NDArray[np.int_], p: npt.NDArray[np.float64], threshold: float) -> SliceMetrics:
    both_classes = np.unique(y).size == 2
    return SliceMetrics(
        n=int(y.size),
        positive_rate=float(y.mean()) if y.size else 0.0,
        threshold=threshold,
        f1=float(f1_score(y, (p >= threshold).astype(np.int_), zero_division=0.0)),
        roc_auc=float(roc_auc_score(y, p)) if both_classes else None,
        pr_auc=float(average_precision_score(y, p)) if both_classes else None,
        brier=float(brier_score_loss(y, p)) if y.size else 0.0,
        calibration_error=expected_calibration_error(y, p),
        mean_probability=float(p.mean()) if y.size else 0.0,
    )


def evaluate(
    y_true: npt.ArrayLike,
    probability: npt.ArrayLike,
    threshold: float,
    fleets: Sequence[Any] | npt.ArrayLike | None = None,
    min_slice_trips: int = 200,
) -> Metrics:
    """Holdout metrics at ``threshold`` (F1 counts ``probability >= threshold`` as positive).

    PR-AUC is average precision. ``fleets`` (one fleet id per trip, optional) adds per-fleet
    slices for fleets with at least ``min_slice_trips`` trips; smaller fleets are too noisy.
    """
    y = np.asarray(y_true).astype(np.int_).reshape(-1)
    p = np.asarray(probability, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} probabilities")
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or infinity")
    overall = _slice(y, p, threshold)
    per_fleet: dict[str, SliceMetrics] = {}
    if fleets is not None:
        f = np.asarray(fleets, dtype=object).reshape(-1)
        if f.shape != y.shape:
            raise ValueError(f"{y.size} labels but {f.size} fleet ids")
        keys = np.array(["<none>" if v is None else str(v) for v in f], dtype=object)
        for fleet in sorted(set(keys.tolist())):
            mask = keys == fleet
            if int(mask.sum()) >= min_slice_trips:
                per_fleet[fleet] = _slice(y[mask], p[mask], threshold)
    return Metrics(**overall.model_dump(), per_fleet=per_fleet)


def run_gate(candidate: Metrics, champion: Metrics | None, config: GateConfig) -> GateReport:
    """Check the candidate against the absolute minimums and, when there is one, the champion.

    The champion must have been evaluated on the same holdout as the candidate (same trips),
    otherwise the comparison means nothing; a different ``n`` raises ``ValueError``.
    """
    failures: list[str] = []
    if candidate.roc_auc is None or candidate.pr_auc is None:
        failures.append(
            f"the holdout of {candidate.n} trips has only one class "
            f"(positive rate {candidate.positive_rate:.4f}); ranking cannot be measured"
        )
    else:
        if candidate.roc_auc < config.min_roc_auc:
            failures.append(
                f"ROC-AUC {candidate.roc_auc:.4f} is below the minimum {config.min_roc_auc:.4f}"
            )
        min_pr_auc = config.min_pr_auc_lift * candidate.positive_rate
        if candidate.pr_auc < min_pr_auc:
            failures.append(
                f"PR-AUC {candidate.pr_auc:.4f} is below {config.min_pr_auc_lift:g} × the positive "
                f"rate {candidate.positive_rate:.4f} = {min_pr_auc:.4f}"
            )
    if candidate.brier > config.max_brier:
        failures.append(
            f"Brier score {candidate.brier:.4f} is above the maximum {config.max_brier:.4f}"
        )
    if candidate.calibration_error > config.max_calibration_error:
        failures.append(
            f"expected calibration error {candidate.calibration_error:.4f} is above the maximum "
            f"{config.max_calibration_error:.4f}"
        )
    if champion is not None:
        if champion.n != candidate.n:
            raise ValueError(
                f"champion metrics cover {champion.n} trips, the candidate's {candidate.n}: "
                "evaluate both on the same holdout"
            )
        if champion.roc_auc is not None and candidate.roc_auc is not None:
            floor = champion.roc_auc - config.champion_tolerance
            if candidate.roc_auc < floor:
                failures.append(
                    f"ROC-AUC {candidate.roc_auc:.4f} trails the champion's {champion.roc_auc:.4f} "
                    f"by more than {config.champion_tolerance:.4f}"
                )
    return GateReport(
        passed=not failures,
        failures=failures,
        candidate=candidate,
        champion=champion,
        config=config,
    )
