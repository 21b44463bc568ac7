"""Performance a calibrated model should have on trips whose labels have not arrived yet.

Confidence-based performance estimation (CBPE, as NannyML does it): when the risk
probabilities are calibrated, trip *i* is an incident with probability ``p_i``, so every
count a metric needs has an expectation computed from the probabilities alone:

- expected true positives above a threshold ``t``: ``sum(p_i for p_i >= t)``, false
  positives ``sum(1 - p_i for p_i >= t)``, false negatives ``sum(p_i for p_i < t)``;
- ROC-AUC: the area under the curve of expected true-positive and false-positive rates
  swept over every threshold; PR-AUC: average precision of the expected counts;
- Brier score: ``mean(p_i * (1 - p_i))``, the expected squared error of a calibrated model;
- F1 at the card's decision threshold from the expected counts.

The estimate is only as good as the calibration: it sees covariate shift (the trips
change, the model's probabilities still mean what they say) but not concept drift (the
same trip has become riskier), which only the realised metrics show once claims mature.

Pure: numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["estimate_performance"]


def estimate_performance(probabilities: npt.ArrayLike, threshold: float) -> dict[str, Any]:
    """Expected ROC-AUC, PR-AUC, Brier, F1 at ``threshold`` and positive rate of ``n`` trips."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    p = np.clip(p[np.isfinite(p)], 0.0, 1.0)
    n = int(p.size)
    if n == 0:
        return {"n": 0, "roc_auc": None, "pr_auc": None, "brier": None, "f1": None}
    positives = float(p.sum())
    negatives = float(n - positives)
    order = np.argsort(-p, kind="stable")
    q = p[order]
    # Trips with the same probability enter together: one point of the curve per value.
    last_of_value = np.append(q[1:] != q[:-1], True)
    tp = np.cumsum(q)[last_of_value]
    fp = np.cumsum(1.0 - q)[last_of_value]
    roc_auc: float | None = None
    pr_auc: float | None = None
    if positives > 0 and negatives > 0:
        tpr = np.concatenate([[0.0], tp / positives])
        fpr = np.concatenate([[0.0], fp / negatives])
        roc_auc = float(np.trapezoid(tpr, fpr))
        recall = tp / positives
        precision = tp / (tp + fp)
        pr_auc = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    flagged = p >= threshold
    e_tp = float(p[flagged].sum())
    e_fp = float((1.0 - p[flagged]).sum())
    e_fn = float(p[~flagged].sum())
    denominator = 2.0 * e_tp + e_fp + e_fn
    return {
        "n": n,
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "brier": float(np.mean(p * (1.0 - p))),
        "f1": 2.0 * e_tp / denominator if denominator > 0 else 0.0,
        "positive_rate": positives / n,
        "threshold": threshold,
    }
