"""Champion/challenger decision and post-promotion watch: the statistics and the rules.

Pure code (arrays in, verdicts out): ``pipelines/decision_run.py`` reads the prediction
log, the trips and the claims, and moves the aliases.

The challenger is compared with the champion **on the same trips** (both score every
trip while a challenger runs), so every test here is paired:

- ROC-AUC: DeLong's test for two correlated AUCs, or a paired bootstrap (fixed seed);
- log-loss and Brier: the per-trip loss difference, its mean and a normal interval.

Improvements are signed so that positive means "the challenger is better" for every
metric. Guardrails (score shift against the champion, error rate, latency) need no
labels and can reject, never promote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from driverscore.domain.drift import psi

__all__ = [
    "DecisionConfig",
    "Improvement",
    "LabelledPairs",
    "OperationalStats",
    "Verdict",
    "WatchInput",
    "bootstrap_auc_difference",
    "decide_challenger",
    "delong_auc_difference",
    "judge_watch",
    "paired_loss_difference",
    "rankdata",
    "score_shift",
]

Metric = Literal["roc_auc", "log_loss", "brier"]
Action = Literal["promote", "reject", "collect"]
FloatArray = npt.NDArray[np.float64]

_EPS = 1e-15


class DecisionConfig(BaseModel):
    """When a challenger is promoted, rejected or kept collecting; how rollback watches."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    primary_metric: Metric = Field(
        "roc_auc",
        description="The metric a challenger must improve to be promoted (paired, same trips).",
    )
    auc_test: Literal["delong", "bootstrap"] = Field(
        "delong", description="Paired test of the ROC-AUC difference."
    )
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples.")
    seed: int = Field(7, description="Seed of the bootstrap: the same data, the same decision.")
    confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1,
        description="One-sided confidence of the bounds compared with the minimum effect.",
    )
    min_effect: float = Field(
        0.005,
        ge=0,
        description=(
            "Promote when the lower confidence bound of the primary improvement reaches this; "
            "reject when its upper bound cannot."
        ),
    )
    max_regression: float = Field(
        0.01,
        ge=0,
        description=(
            "Reject when any metric (or any slice's) is worse by more than this: the upper "
            "bound of its improvement below -max_regression (slices: the point estimate)."
        ),
    )
    min_paired_trips: int = Field(
        200, ge=1, description="Trips scored by both before any guardrail is judged."
    )
    min_labelled_trips: int = Field(
        500, ge=1, description="Matured labelled paired trips before a paired comparison."
    )
    min_positive_labels: int = Field(
        10, ge=1, description="Incidents among them (ROC-AUC needs both outcomes)."
    )
    min_slice_trips: int = Field(
        200, ge=1, description="Fleet/client slices with fewer labelled trips are not judged."
    )
    max_score_psi: float = Field(
        0.5,
        ge=0,
        description=(
            "Guardrail: PSI of the challenger's probabilities against the champion's on the "
            "same trips (champion deciles)."
        ),
    )
    max_error_rate_increase: float = Field(
        0.01,
        ge=0,
        description="Guardrail: the challenger may fail this much larger a share of trips.",
    )
    max_latency_increase: float = Field(
        0.5,
        ge=0,
        description=(
            "Guardrail: the challenger's p95 latency may exceed the champion's by this share."
        ),
    )
    max_duration_days: float = Field(
        14.0,
        gt=0,
        description="A challenger still undecided this long after its first trip is rejected.",
    )
    watch_days: float = Field(
        7.0, ge=0, description="After a promotion, live guardrails are watched this long."
    )
    min_watch_trips: int = Field(
        200, ge=1, description="Trips of the new champion before the watch judges anything."
    )
    lease_ttl_s: float = Field(
        30.0, gt=0, description="An alias lease not released is taken after this (s)."
    )
    lease_settle_s: float = Field(
        0.3,
        ge=0,
        description=("Mean pause between tries for a busy alias lease (s, jittered)."),
    )
    lease_wait_s: float = Field(
        60.0, ge=0, description="How long a mover waits for a busy lease before giving up (s)."
    )


@dataclass(frozen=True)
class Improvement:
    """Challenger minus champion on one metric (positive: the challenger is better), with a
    two-sided interval at the configured confidence (each bound one-sided at it)."""

    metric: str
    champion: float
    challenger: float
    improvement: float
    lower: float
    upper: float
    p_value: float

    def as_evidence(self) -> dict[str, float]:
        return {
            f"{self.metric}.champion": self.champion,
            f"{self.metric}.challenger": self.challenger,
            f"{self.metric}.improvement": self.improvement,
            f"{self.metric}.lower": self.lower,
            f"{self.metric}.upper": self.upper,
            f"{self.metric}.p_value": self.p_value,
        }


_NORMAL = NormalDist()


def _z(confidence: float) -> float:
    return _NORMAL.inv_cdf(confidence)


def _two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2.0))


def rankdata(values: npt.ArrayLike) -> FloatArray:
    """Ranks 1..n, ties sharing their mean rank (midranks), as DeLong's placements need."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    # Start of each run of equal values, and its length: a tie run of ranks i+1..i+k
    # gets (2i + k + 1) / 2.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    lengths = np.diff(np.r_[starts, x.size])
    mean_ranks = starts + (lengths + 1) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_ranks, lengths)
    return ranks


def _auc_and_components(
    y: npt.NDArray[np.int_], scores: FloatArray
) -> tuple[float, FloatArray, FloatArray]:
    """AUC with DeLong's structural components (V10 over positives, V01 over negatives),
    from midranks, O(n log n) (Sun & Xu 2014)."""
    pos, neg = scores[y == 1], scores[y == 0]
    m, n = pos.size, neg.size
    rank_all = rankdata(np.concatenate([pos, neg]))
    rank_pos, rank_neg = rankdata(pos), rankdata(neg)
    auc = float((rank_all[:m].sum() - m * (m + 1) / 2.0) / (m * n))
    v10 = (rank_all[:m] - rank_pos) / n
    v01 = 1.0 - (rank_all[m:] - rank_neg) / m
    return auc, np.asarray(v10, dtype=np.float64), np.asarray(v01, dtype=np.float64)


def delong_auc_difference(
    y: npt.ArrayLike, champion: npt.ArrayLike, challenger: npt.ArrayLike, confidence: float
) -> Improvement:
    """DeLong's paired test of ROC-AUC(challenger) - ROC-AUC(champion) on the same trips."""
    labels = np.asarray(y, dtype=np.int_)
    a = np.asarray(champion, dtype=np.float64)
    b = np.asarray(challenger, dtype=np.float64)
    m, n = int(labels.sum()), int((labels == 0).sum())
    if m < 2 or n < 2:
        raise ValueError("DeLong needs at least two trips of each outcome")
    auc_a, v10_a, v01_a = _auc_and_components(labels, a)
    auc_b, v10_b, v01_b = _auc_and_components(labels, b)
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    cov = s10 / m + s01 / n
    variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = auc_b - auc_a
    se = math.sqrt(max(variance, 0.0))
    z = _z(confidence)
    p_value = _two_sided_p(diff / se) if se > 0 else (0.0 if diff else 1.0)
    return Improvement("roc_auc", auc_a, auc_b, diff, diff - z * se, diff + z * se, p_value)


def _auc(y: npt.NDArray[np.int_], scores: FloatArray) -> float:
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def bootstrap_auc_difference(
    y: npt.ArrayLike,
    champion: npt.ArrayLike,
    challenger: npt.ArrayLike,
    confidence: float,
    *,
    samples: int = 1000,
    seed: int = 7,
) -> Improvement:
    """Paired bootstrap of ROC-AUC(challenger) - ROC-AUC(champion): trips are resampled
    together, so both models are judged on each resample's same trips. Percentile bounds;
    the p-value is the two-sided share of resampled differences across zero."""
    labels = np.asarray(y, dtype=np.int_)
    a = np.asarray(champion, dtype=np.float64)
    b = np.asarray(challenger, dtype=np.float64)
    rng = np.random.default_rng(seed)
    diffs: list[float] = []
    for _ in range(samples):
        idx = rng.integers(0, labels.size, labels.size)
        d = _auc(labels[idx], b[idx]) - _auc(labels[idx], a[idx])
        if not math.isnan(d):
            diffs.append(d)
    auc_a, auc_b = _auc(labels, a), _auc(labels, b)
    values = np.asarray(diffs)
    lower = float(np.quantile(values, 1 - confidence))
    upper = float(np.quantile(values, confidence))
    below = float(np.mean(values <= 0)) if values.size else 1.0
    p_value = min(1.0, 2 * min(below, 1 - below))
    return Improvement("roc_auc", auc_a, auc_b, auc_b - auc_a, lower, upper, p_value)


def _losses(metric: Literal["log_loss", "brier"], y: FloatArray, p: FloatArray) -> FloatArray:
    if metric == "brier":
        return np.asarray((p - y) ** 2, dtype=np.float64)
    q = np.clip(p, _EPS, 1 - _EPS)
    return np.asarray(-(y * np.log(q) + (1 - y) * np.log(1 - q)), dtype=np.float64)


def paired_loss_difference(
    metric: Literal["log_loss", "brier"],
    y: npt.ArrayLike,
    champion: npt.ArrayLike,
    challenger: npt.ArrayLike,
    confidence: float,
) -> Improvement:
    """Champion's minus challenger's mean per-trip loss (positive: the challenger is
    better), with a normal interval on the paired differences."""
    labels = np.asarray(y, dtype=np.float64)
    loss_a = _losses(metric, labels, np.asarray(champion, dtype=np.float64))
    loss_b = _losses(metric, labels, np.asarray(challenger, dtype=np.float64))
    d = loss_a - loss_b
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("inf")
    z = _z(confidence)
    p_value = _two_sided_p(mean / se) if se > 0 else (0.0 if mean else 1.0)
    return Improvement(
        metric,
        float(loss_a.mean()),
        float(loss_b.mean()),
        mean,
        mean - z * se,
        mean + z * se,
        p_value,
    )


def score_shift(reference: npt.ArrayLike, current: npt.ArrayLike, bins: int = 10) -> float:
    """PSI of ``current`` probabilities on ``reference``'s quantile bins (0: no shift)."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.size == 0 or cur.size == 0:
        return 0.0
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
    cur_counts = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1)
    return psi(ref_counts, cur_counts)


@dataclass(frozen=True)
class OperationalStats:
    """Errors and latency of both models over the same trips; ``None``: not measured."""

    champion_error_rate: float | None = None
    challenger_error_rate: float | None = None
    champion_p95_ms: float | None = None
    challenger_p95_ms: float | None = None


@dataclass(frozen=True)
class LabelledPairs:
    """Matured paired trips: the outcome, both probabilities, and slice keys per trip."""

    y: npt.NDArray[np.int_]
    champion: FloatArray
    challenger: FloatArray
    slices: dict[str, npt.NDArray[np.object_]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.y.size)

    @property
    def positives(self) -> int:
        return int(self.y.sum())


@dataclass(frozen=True)
class Verdict:
    """What the rules say: promote, reject or collect; why; and the numbers behind it."""

    action: Action
    reasons: list[str]
    evidence: dict[str, Any]


def _guardrails(
    champion: FloatArray,
    challenger: FloatArray,
    ops: OperationalStats,
    config: DecisionConfig,
    names: tuple[str, str] = ("challenger", "champion"),
) -> tuple[list[str], dict[str, Any]]:
    """Breached guardrails in words, and the numbers judged. ``names``: what the new and
    the baseline model are called in the reasons."""
    new, old = names
    breaches: list[str] = []
    shift = score_shift(champion, challenger)
    evidence: dict[str, Any] = {"score_psi": shift}
    if shift > config.max_score_psi:
        breaches.append(
            f"{new}'s scores shifted from the {old}'s: PSI {shift:.3f} > {config.max_score_psi:g}"
        )
    if ops.champion_error_rate is not None and ops.challenger_error_rate is not None:
        evidence["champion_error_rate"] = ops.champion_error_rate
        evidence["challenger_error_rate"] = ops.challenger_error_rate
        if ops.challenger_error_rate - ops.champion_error_rate > config.max_error_rate_increase:
            breaches.append(
                f"{new} failed {ops.challenger_error_rate:.2%} of trips against the "
                f"{old}'s {ops.champion_error_rate:.2%}"
            )
    if ops.champion_p95_ms is not None and ops.challenger_p95_ms is not None:
        evidence["champion_p95_ms"] = ops.champion_p95_ms
        evidence["challenger_p95_ms"] = ops.challenger_p95_ms
        if ops.challenger_p95_ms > ops.champion_p95_ms * (1 + config.max_latency_increase):
            breaches.append(
                f"{new} p95 latency {ops.challenger_p95_ms:.1f} ms against the "
                f"{old}'s {ops.champion_p95_ms:.1f} ms"
            )
    return breaches, evidence


def _compare(metric: Metric, labelled: LabelledPairs, config: DecisionConfig) -> Improvement:
    if metric == "roc_auc":
        if config.auc_test == "bootstrap":
            return bootstrap_auc_difference(
                labelled.y,
                labelled.champion,
                labelled.challenger,
                config.confidence,
                samples=config.bootstrap_samples,
                seed=config.seed,
            )
        return delong_auc_difference(
            labelled.y, labelled.champion, labelled.challenger, config.confidence
        )
    return paired_loss_difference(
        metric, labelled.y, labelled.champion, labelled.challenger, config.confidence
    )


def _slice_regressions(
    labelled: LabelledPairs, config: DecisionConfig
) -> tuple[list[str], dict[str, float]]:
    """Slices (fleet, client) with enough trips where the challenger is worse by more than
    the margin (point estimate: each slice is small, an interval would never exclude 0).
    ROC-AUC when the slice has both outcomes often enough, else log-loss."""
    regressions: list[str] = []
    judged: dict[str, float] = {}
    for column, keys in labelled.slices.items():
        for key in sorted({k for k in keys.tolist() if k is not None}, key=str):
            mask = keys == key
            n = int(mask.sum())
            if n < config.min_slice_trips:
                continue
            y = labelled.y[mask]
            metric: Metric = (
                config.primary_metric
                if config.primary_metric != "roc_auc" or 2 <= int(y.sum()) <= n - 2
                else "log_loss"
            )
            if metric == "roc_auc":
                change = _auc(y, labelled.challenger[mask]) - _auc(y, labelled.champion[mask])
            else:
                losses_a = _losses(metric, y.astype(np.float64), labelled.champion[mask])
                losses_b = _losses(metric, y.astype(np.float64), labelled.challenger[mask])
                change = float(losses_a.mean() - losses_b.mean())
            judged[f"{column}={key}.{metric}.improvement"] = change
            if change < -config.max_regression:
                regressions.append(
                    f"{column} {key}: challenger's {metric} worse by {-change:.4f} on {n} trips "
                    f"(margin {config.max_regression:g})"
                )
    return regressions, judged


def decide_challenger(
    champion: npt.ArrayLike,
    challenger: npt.ArrayLike,
    labelled: LabelledPairs | None,
    ops: OperationalStats,
    *,
    started_at: datetime | None,
    now: datetime,
    config: DecisionConfig,
) -> Verdict:
    """The decision on a running challenger from its paired trips.

    ``champion`` and ``challenger`` are both models' probabilities on every paired trip;
    ``labelled`` the matured ones with their outcomes. In order: too few paired trips →
    collect; a breached guardrail → reject; too few labels → collect (or reject past the
    time limit); a metric or a slice worse beyond the margin → reject; the primary
    improvement's lower bound at least the minimum effect → promote; its upper bound
    below it → reject; otherwise collect until the time limit.
    """
    a = np.asarray(champion, dtype=np.float64)
    b = np.asarray(challenger, dtype=np.float64)
    evidence: dict[str, Any] = {"paired_trips": int(a.size)}
    if labelled is not None:
        evidence["labelled_trips"] = labelled.size
        evidence["positive_labels"] = labelled.positives
    expired = started_at is not None and now - started_at > timedelta(days=config.max_duration_days)
    if started_at is not None:
        evidence["running_days"] = (now - started_at).total_seconds() / 86400
    timeout = (
        f"undecided after {config.max_duration_days:g} days (time limit): the challenger "
        "did not show it is better"
    )
    if a.size < config.min_paired_trips:
        reason = f"{a.size} paired trips, {config.min_paired_trips} needed for the guardrails"
        return Verdict(
            "reject" if expired else "collect", [timeout if expired else reason], evidence
        )
    breaches, guard = _guardrails(a, b, ops, config)
    evidence.update(guard)
    if breaches:
        return Verdict("reject", breaches, evidence)
    enough = (
        labelled is not None
        and labelled.size >= config.min_labelled_trips
        and config.min_positive_labels <= labelled.positives <= labelled.size - 2
    )
    if labelled is None or not enough:
        have = labelled.size if labelled is not None else 0
        positives = labelled.positives if labelled is not None else 0
        reason = (
            f"guardrails hold; {have} matured labelled trips ({positives} incidents), "
            f"{config.min_labelled_trips} ({config.min_positive_labels}) needed to compare"
        )
        return Verdict(
            "reject" if expired else "collect", [timeout if expired else reason], evidence
        )

    comparisons = {m: _compare(m, labelled, config) for m in ("roc_auc", "log_loss", "brier")}
    for improvement in comparisons.values():
        evidence.update(improvement.as_evidence())
    worse = [
        f"challenger's {m} is worse: improvement {c.improvement:+.4f}, upper bound "
        f"{c.upper:+.4f} < -{config.max_regression:g}"
        for m, c in comparisons.items()
        if c.upper < -config.max_regression
    ]
    slice_regressions, slices = _slice_regressions(labelled, config)
    evidence["slices"] = slices
    if worse or slice_regressions:
        return Verdict("reject", worse + slice_regressions, evidence)
    primary = comparisons[config.primary_metric]
    bounds = (
        f"{primary.metric} improvement {primary.improvement:+.4f} "
        f"({config.confidence:.0%} bounds {primary.lower:+.4f} .. {primary.upper:+.4f}, "
        f"minimum effect {config.min_effect:g}) on {labelled.size} trips"
    )
    if primary.lower >= config.min_effect:
        return Verdict("promote", [f"challenger is better: {bounds}"], evidence)
    if primary.upper < config.min_effect:
        return Verdict(
            "reject", [f"challenger cannot reach the minimum effect: {bounds}"], evidence
        )
    if expired:
        return Verdict("reject", [timeout, f"inconclusive: {bounds}"], evidence)
    return Verdict("collect", [f"inconclusive so far: {bounds}"], evidence)


@dataclass(frozen=True)
class WatchInput:
    """What the watch after a promotion sees: the new champion's probabilities in the
    window, the previous champion's before the promotion, live operations, and (when
    labels matured in the window) realised outcomes against what the promotion expected."""

    champion: FloatArray
    previous: FloatArray
    ops: OperationalStats
    labelled_y: npt.NDArray[np.int_] | None = None
    labelled_p: FloatArray | None = None
    #: Log-loss the previous champion had on the decision's trips (promotion evidence).
    previous_log_loss: float | None = None


def judge_watch(watch: WatchInput, config: DecisionConfig) -> Verdict:
    """``reject`` (roll back) when the promoted champion breaches a guardrail or its realised
    log-loss is worse than the previous champion's by more than the margin; else
    ``collect`` (keep watching). Too few trips: nothing is judged."""
    evidence: dict[str, Any] = {"watch_trips": int(watch.champion.size)}
    if watch.previous.size == 0:
        return Verdict("collect", ["no trips of the previous champion to compare with"], evidence)
    if watch.champion.size < config.min_watch_trips:
        return Verdict(
            "collect",
            [f"{watch.champion.size} trips since the promotion, {config.min_watch_trips} needed"],
            evidence,
        )
    # ``ops`` here holds the new champion in the challenger fields, the previous in the
    # champion ones: the same guardrails, the promoted model judged against its predecessor.
    reasons, guard = _guardrails(
        watch.previous, watch.champion, watch.ops, config, ("new champion", "previous champion")
    )
    evidence.update(guard)
    if (
        watch.labelled_y is not None
        and watch.labelled_p is not None
        and watch.labelled_y.size
        and watch.previous_log_loss is not None
    ):
        realised = float(
            _losses("log_loss", watch.labelled_y.astype(np.float64), watch.labelled_p).mean()
        )
        evidence["realised_log_loss"] = realised
        evidence["previous_log_loss"] = watch.previous_log_loss
        evidence["realised_trips"] = int(watch.labelled_y.size)
        if realised - watch.previous_log_loss > config.max_regression:
            reasons.append(
                f"realised log-loss {realised:.4f} on {watch.labelled_y.size} matured trips is "
                f"worse than the previous champion's {watch.previous_log_loss:.4f}"
            )
    if reasons:
        return Verdict("reject", reasons, evidence)
    return Verdict("collect", ["guardrails hold since the promotion"], evidence)
