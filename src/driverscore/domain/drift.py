"""Drift statistics and the monitoring verdict, computed from profiles (``domain/profiles.py``).

Four statistics per numeric column, each from the two profiles' bin counts, never from rows:

- **PSI** (population stability index) over the coarse bins (about ten bins of equal
  reference mass, plus the two bins beyond the reference range), shares floored at
  ``PSI_EPSILON`` so an empty bin does not make it infinite;
- **Kolmogorov-Smirnov**: the largest gap between the two CDFs at the fine bin edges;
- **Wasserstein-1**: the area between the two CDFs, linear inside each fine bin (a step
  inside a bin the reference holds a point mass in), exact beyond the reference range
  from the profiles' excess sums; reported in the column's unit and divided by the
  reference's standard deviation (``wasserstein_norm``), which is what thresholds read;
- **Jensen-Shannon distance** (base 2, 0..1) over the coarse bins.

Categorical columns (fleet, client, event source) get PSI and Jensen-Shannon over their
values, and the values the reference never saw are listed.

Which statistic decides the alarm, and its thresholds per feature, are settings
(:class:`MonitoringConfig`). Small windows are noisy: a statistic alarms only when it is
above its threshold *and* above the level sampling noise alone reaches once in ten thousand
windows of that size (``noise_floor``), so a slice of 200 trips does not alarm on noise
while a week of thousands alarms on a real shift.

Pure: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from driverscore.domain.profiles import (
    EXCESS_RESOLUTION,
    CategoricalProfile,
    ColumnEdges,
    DatasetProfile,
    NumericProfile,
)

__all__ = [
    "PSI_EPSILON",
    "DriftStatistic",
    "DriftThresholds",
    "FeatureDrift",
    "MonitoringConfig",
    "Status",
    "compare_categorical",
    "compare_numeric",
    "compare_profiles",
    "jensen_shannon",
    "ks_statistic",
    "noise_floor",
    "psi",
    "wasserstein",
    "worst_status",
]

#: Share given to an empty bin in PSI (the usual convention; 1e-4 makes a bin that holds
#: 1 % of the window and none of the reference add 0.046).
PSI_EPSILON: Final = 1e-4

DriftStatistic = Literal["psi", "ks", "wasserstein", "js"]
Status = Literal["ok", "warn", "drift"]
_STATUS_ORDER: Final[dict[str, int]] = {"ok": 0, "warn": 1, "drift": 2, "degraded": 3}

# Upper 0.01 % points: Kolmogorov's distribution (sqrt(ln(2 / alpha) / 2)), and the normal
# one for chi-square by degrees of freedom (Wilson-Hilferty, within 1 % of the exact value
# from 2 degrees of freedom on). One in ten thousand: a run judges a few hundred columns
# and slices, every hour.
_KS_C: Final = 2.226
_Z: Final = 3.719


class DriftThresholds(BaseModel):
    """When a statistic of one column is drift: at or above ``drift``; warn from ``warn``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    psi: float = Field(0.2, gt=0, description="PSI over ~10 reference-quantile bins.")
    ks: float = Field(0.1, gt=0, le=1, description="Kolmogorov-Smirnov distance.")
    wasserstein: float = Field(
        0.1, gt=0, description="Wasserstein-1 divided by the reference standard deviation."
    )
    js: float = Field(0.1, gt=0, le=1, description="Jensen-Shannon distance, base 2.")
    warn_fraction: float = Field(
        0.5, gt=0, le=1, description="Warn at this fraction of the drift threshold."
    )

    def of(self, statistic: DriftStatistic) -> float:
        value: float = getattr(self, statistic)
        return value


class MonitoringConfig(BaseModel):
    """How the monitor judges a window (``driverscore monitor``, the hourly job, gauges)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window_hours: float = Field(
        168.0, gt=0, description="Length of the monitored window of trips, by trip end (h)."
    )
    decide_by: DriftStatistic = Field(
        "psi", description="The statistic whose threshold raises a drift alarm."
    )
    thresholds: DriftThresholds = Field(
        default_factory=DriftThresholds, description="Thresholds of every column."
    )
    feature_thresholds: dict[str, DriftThresholds] = Field(
        default_factory=dict, description="Thresholds of named columns, replacing the default."
    )
    min_slice_trips: int = Field(
        200, ge=1, description="Fleets and clients with fewer trips in the window are not judged."
    )
    max_missing_share_increase: float = Field(
        0.05, ge=0, le=1, description="A larger rise of a column's missing share is an alarm."
    )
    max_out_of_range_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="A larger share of values outside the reference range is an alarm.",
    )
    max_contract_violation_share: float = Field(
        0.01,
        ge=0,
        le=1,
        description="A larger share of trips set aside for breaking the feature contract is "
        "an alarm.",
    )
    max_quarantine_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="A larger share of pings quarantined, for any one reason, is an alarm.",
    )
    max_roc_auc_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Performance is degraded when ROC-AUC falls this far below the model "
        "card's holdout value.",
    )
    max_brier_rise: float = Field(
        0.02,
        ge=0,
        le=1,
        description="...or the Brier score rises this far above it.",
    )
    min_performance_trips: int = Field(
        500, ge=1, description="Fewer matured (or scored) trips: performance is not judged."
    )
    profile_flush_s: float = Field(
        300.0,
        gt=0,
        description="How often the service and the stream processor write the profile parts "
        "of the trips they scored to the data store (s); also when they stop.",
    )

    def thresholds_for(self, column: str) -> DriftThresholds:
        return self.feature_thresholds.get(column, self.thresholds)


@dataclass(frozen=True)
class FeatureDrift:
    """One column of one window against its reference: every statistic and the decision."""

    column: str
    kind: Literal["numeric", "categorical"]
    reference_trips: int
    current_trips: int
    statistics: dict[str, float | None]
    decided_by: DriftStatistic
    #: The deciding statistic's value (Wasserstein: over the reference standard deviation).
    value: float | None
    threshold: float
    #: What sampling noise alone reaches once in ten thousand windows of these sizes.
    noise_floor: float
    status: Status
    #: Values the reference never saw, with their trip counts (categorical columns).
    new_values: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "column": self.column,
            "kind": self.kind,
            "reference_trips": self.reference_trips,
            "current_trips": self.current_trips,
            "statistics": self.statistics,
            "decided_by": self.decided_by,
            "value": self.value,
            "threshold": self.threshold,
            "noise_floor": self.noise_floor,
            "status": self.status,
            "new_values": self.new_values,
        }


def worst_status(statuses: list[str]) -> str:
    return max(statuses, key=_STATUS_ORDER.__getitem__, default="ok")


def _shares(counts: npt.NDArray[np.int64] | npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    total = float(counts.sum())
    return np.asarray(counts, dtype=np.float64) / total if total else np.zeros(counts.size)


def psi(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """PSI of two count (or share) vectors over the same bins."""
    p = np.maximum(_shares(np.asarray(reference, dtype=np.float64)), PSI_EPSILON)
    q = np.maximum(_shares(np.asarray(current, dtype=np.float64)), PSI_EPSILON)
    return float(np.sum((q - p) * np.log(q / p)))


def jensen_shannon(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """Jensen-Shannon distance (square root of the divergence, base 2) of two count vectors."""
    p = _shares(np.asarray(reference, dtype=np.float64))
    q = _shares(np.asarray(current, dtype=np.float64))
    m = (p + q) / 2.0

    def kl(a: npt.NDArray[np.float64]) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2.0))


def ks_statistic(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """Largest gap between the two CDFs at the bin edges, from fine bin counts."""
    p = np.cumsum(_shares(np.asarray(reference, dtype=np.float64)))
    q = np.cumsum(_shares(np.asarray(current, dtype=np.float64)))
    return float(np.max(np.abs(p - q))) if p.size else 0.0


def wasserstein(reference: NumericProfile, current: NumericProfile, edges: ColumnEdges) -> float:
    """Wasserstein-1 distance (in the column's unit) between two profiles on ``edges``."""
    n_ref, n_cur = reference.present, current.present
    if n_ref == 0 or n_cur == 0 or not edges.edges:
        return 0.0
    f = np.cumsum(reference.counts) / n_ref  # F(x) just below each upper edge
    g = np.cumsum(current.counts) / n_cur
    d = f - g
    e = np.asarray(edges.edges, dtype=np.float64)
    widths = np.diff(e)
    d0, d1 = d[:-2], d[1:-1]  # CDF gap at the left and right edge of each interior bin
    same_sign = d0 * d1 >= 0
    both = np.abs(d0) + np.abs(d1)
    linear = np.where(
        same_sign,
        both / 2.0,
        np.divide(d0 * d0 + d1 * d1, 2.0 * both, out=np.zeros_like(both), where=both > 0),
    )
    area = widths * linear
    if edges.atoms:
        # Inside a point-mass bin the CDFs step at the left edge and then stay flat.
        atoms = np.asarray(edges.atoms, dtype=np.intp) - 1
        area[atoms] = widths[atoms] * np.abs(d1[atoms])
    below = abs(reference.excess_below / n_ref - current.excess_below / n_cur)
    above = abs(reference.excess_above / n_ref - current.excess_above / n_cur)
    return float(area.sum() + (below + above) * EXCESS_RESOLUTION)


def _coarse_counts(counts: npt.NDArray[np.int64], edges: ColumnEdges) -> npt.NDArray[np.int64]:
    index = edges.coarse_index()
    return np.bincount(index, weights=counts, minlength=int(index.max()) + 1).astype(np.int64)


def noise_floor(statistic: DriftStatistic, bins: int, n_reference: int, n_current: int) -> float:
    """The value ``statistic`` exceeds by chance in one of ten thousand windows of this size.

    Two samples of sizes n and m from one distribution: KS reaches
    c(0.0001) * sqrt(1/n + 1/m); PSI over B bins is about chi-square(B-1) * (1/n + 1/m);
    the Jensen-Shannon divergence is about PSI / (8 ln 2); Wasserstein over a standard
    deviation behaves like KS times a few (3, a generous bound for the skewed features).
    """
    if n_reference <= 0 or n_current <= 0:
        return math.inf
    scale = 1.0 / n_reference + 1.0 / n_current
    dof = max(1, bins - 1)
    # Wilson-Hilferty: chi-square quantile from the normal one.
    chi2 = dof * (1.0 - 2.0 / (9.0 * dof) + _Z * math.sqrt(2.0 / (9.0 * dof))) ** 3
    if statistic == "ks":
        return _KS_C * math.sqrt(scale)
    if statistic == "psi":
        return chi2 * scale
    if statistic == "js":
        return math.sqrt(chi2 * scale / (8.0 * math.log(2.0)))
    return 3.0 * _KS_C * math.sqrt(scale)


def _status(value: float | None, threshold: float, warn: float, floor: float) -> Status:
    if value is None or not math.isfinite(value):
        return "ok"
    if value >= max(threshold, floor):
        return "drift"
    if value >= max(warn, floor):
        return "warn"
    return "ok"


def compare_numeric(
    column: str,
    reference: NumericProfile,
    current: NumericProfile,
    edges: ColumnEdges,
    config: MonitoringConfig,
) -> FeatureDrift:
    """Every statistic of one numeric column, and its status by ``config.decide_by``."""
    n_ref, n_cur = reference.present, current.present
    statistics: dict[str, float | None]
    if n_ref == 0 or n_cur == 0:
        statistics = {"psi": None, "ks": None, "wasserstein": None, "wasserstein_norm": None}
        statistics["js"] = None
        coarse_bins = 1
    else:
        coarse_ref = _coarse_counts(reference.counts, edges)
        coarse_cur = _coarse_counts(current.counts, edges)
        coarse_bins = int(np.count_nonzero(coarse_ref + coarse_cur))
        distance = wasserstein(reference, current, edges)
        std = edges.reference_std
        statistics = {
            "psi": psi(coarse_ref, coarse_cur),
            "ks": ks_statistic(reference.counts, current.counts),
            "wasserstein": distance,
            "wasserstein_norm": distance / std if std > 0 else None,
            "js": jensen_shannon(coarse_ref, coarse_cur),
        }
    return _decide(column, "numeric", statistics, coarse_bins, n_ref, n_cur, config, {})


def compare_categorical(
    column: str,
    reference: CategoricalProfile,
    current: CategoricalProfile,
    config: MonitoringConfig,
) -> FeatureDrift:
    """PSI and Jensen-Shannon over a categorical column's values (missing is a value)."""
    values = sorted(set(reference.counts) | set(current.counts))
    ref = np.array([reference.counts.get(v, 0) for v in values] + [reference.missing])
    cur = np.array([current.counts.get(v, 0) for v in values] + [current.missing])
    new_values = {v: n for v, n in current.counts.items() if v not in reference.counts and n}
    n_ref, n_cur = int(ref.sum()), int(cur.sum())
    statistics: dict[str, float | None] = {"psi": None, "js": None}
    bins = int(np.count_nonzero(ref + cur))
    if n_ref and n_cur:
        statistics = {"psi": psi(ref, cur), "js": jensen_shannon(ref, cur)}
    decide_by = config.decide_by if config.decide_by in ("psi", "js") else "psi"
    return _decide(
        column, "categorical", statistics, bins, n_ref, n_cur, config, new_values, decide_by
    )


def _decide(
    column: str,
    kind: Literal["numeric", "categorical"],
    statistics: dict[str, float | None],
    bins: int,
    n_ref: int,
    n_cur: int,
    config: MonitoringConfig,
    new_values: dict[str, int],
    decide_by: DriftStatistic | None = None,
) -> FeatureDrift:
    statistic = decide_by or config.decide_by
    limits = config.thresholds_for(column)
    threshold = limits.of(statistic)
    floor = noise_floor(statistic, bins, n_ref, n_cur)
    key = "wasserstein_norm" if statistic == "wasserstein" else statistic
    value = statistics.get(key)
    status = _status(value, threshold, threshold * limits.warn_fraction, floor)
    return FeatureDrift(
        column=column,
        kind=kind,
        reference_trips=n_ref,
        current_trips=n_cur,
        statistics=statistics,
        decided_by=statistic,
        value=value,
        threshold=threshold,
        noise_floor=floor if math.isfinite(floor) else -1.0,
        status=status,
        new_values=new_values,
    )


def compare_profiles(
    reference: DatasetProfile,
    current: DatasetProfile,
    edges: Mapping[str, ColumnEdges],
    categorical: tuple[str, ...],
    config: MonitoringConfig,
) -> list[FeatureDrift]:
    """Every numeric column of ``edges`` and every categorical column, in that order."""
    out = [
        compare_numeric(name, reference.numeric[name], current.numeric[name], column, config)
        for name, column in edges.items()
        if name in reference.numeric and name in current.numeric
    ]
    out.extend(
        compare_categorical(
            name,
            reference.categorical.get(name, CategoricalProfile()),
            current.categorical.get(name, CategoricalProfile()),
            config,
        )
        for name in categorical
    )
    return out
