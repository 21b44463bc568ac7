"""One monitoring window judged: drift, data quality, slices, performance, and a verdict.

:func:`judge_window` takes the champion's reference profile, the window's profile (and the
previous window's), the data-quality counts the pipeline gathered and the performance
figures, and returns a :class:`WindowJudgement`: everything the JSON result, the HTML
report and the gauges show, and the one-line verdict the retraining job acts on:

- ``degraded``: performance (realised once labels matured, else estimated) fell below the
  model card's holdout values by more than the configured tolerance;
- ``drift``: a model input, the score, or a categorical column (fleet, client, event
  source) drifted past its threshold, overall or in a slice of at least
  ``min_slice_trips`` trips; or the data broke its quality limits (missing shares, values
  beyond the reference range, contract violations, quarantined pings);
- ``warn``: a statistic passed its warning level (or the window differs from the
  previous window) but nothing drifted;
- ``ok``: none of these.

Pure: no I/O; the caller brings the profiles and counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from driverscore.domain.drift import FeatureDrift, MonitoringConfig, compare_profiles, worst_status
from driverscore.domain.profiles import (
    SCORE_COLUMNS,
    CategoricalProfile,
    DatasetProfile,
    TripProfile,
)

__all__ = [
    "RESULT_SCHEMA_VERSION",
    "DataQualityInput",
    "SliceJudgement",
    "Verdict",
    "WindowJudgement",
    "judge_window",
]

RESULT_SCHEMA_VERSION: Final = "1"

Verdict = Literal["ok", "warn", "drift", "degraded"]

#: Columns reported but never alarmed on: the probability is the score before its monotone
#: mapping (the score alarms), the band is the score cut in four.
_REPORTED_ONLY: Final = ("risk_probability", "risk_band")


@dataclass(frozen=True)
class DataQualityInput:
    """What the pipeline counted besides the profiles, for the data-quality section."""

    #: Pings read by the window's scoring runs, and those quarantined per reason and source.
    pings_in: int = 0
    quarantined_per_reason: Mapping[str, int] = field(default_factory=dict)
    quarantined_per_source: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    pings_per_source: Mapping[str, int] = field(default_factory=dict)
    #: Trips set aside by scoring for breaking the feature contract, per feature.
    contract_violations: Mapping[str, int] = field(default_factory=dict)
    trips_set_aside: int = 0


@dataclass(frozen=True)
class SliceJudgement:
    column: str
    value: str
    trips: int
    #: ``reference`` when the reference has the same slice, ``overall`` when it compared
    #: against all reference trips (a fleet or client new since training).
    compared_with: Literal["reference", "overall"]
    status: str
    drifted: list[str]
    features: list[FeatureDrift]

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "value": self.value,
            "trips": self.trips,
            "compared_with": self.compared_with,
            "status": self.status,
            "drifted": self.drifted,
            "features": [f.to_dict() for f in self.features],
        }


@dataclass(frozen=True)
class WindowJudgement:
    verdict: Verdict
    #: The verdict and its reasons in one line.
    summary: str
    alarms: list[str]
    trips: int
    features: list[FeatureDrift]
    vs_previous: list[FeatureDrift]
    slices: list[SliceJudgement]
    skipped_slices: dict[str, int]
    data_quality: dict[str, Any]
    performance: dict[str, Any]
    band_shares: dict[str, dict[str, float]]

    @property
    def drifted_features(self) -> list[str]:
        return [f.column for f in self.features if f.status == "drift"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "summary": self.summary,
            "alarms": self.alarms,
            "trips": self.trips,
            "drifted_features": self.drifted_features,
            "features": [f.to_dict() for f in self.features],
            "vs_previous_window": [f.to_dict() for f in self.vs_previous],
            "slices": [s.to_dict() for s in self.slices],
            "skipped_slices": self.skipped_slices,
            "data_quality": self.data_quality,
            "performance": self.performance,
            "band_shares": self.band_shares,
        }


def _judged(features: Sequence[FeatureDrift]) -> list[FeatureDrift]:
    return [f for f in features if f.column not in _REPORTED_ONLY]


def _compare(
    reference: DatasetProfile,
    current: DatasetProfile,
    profile: TripProfile,
    config: MonitoringConfig,
) -> list[FeatureDrift]:
    categorical = tuple(c for c in profile.edges.categorical if c != "risk_band")
    return compare_profiles(reference, current, profile.edges.numeric, categorical, config)


def _shares(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items())} if total else {}


def _data_quality(
    reference: DatasetProfile,
    current: DatasetProfile,
    model_columns: Sequence[str],
    quality: DataQualityInput,
    config: MonitoringConfig,
) -> tuple[dict[str, Any], list[str]]:
    alarms: list[str] = []
    missing: dict[str, dict[str, float]] = {}
    out_of_range: dict[str, float] = {}
    for name in model_columns:
        ref, cur = reference.numeric.get(name), current.numeric.get(name)
        if ref is None or cur is None or cur.count == 0:
            continue
        ref_share = ref.missing / ref.count if ref.count else 0.0
        cur_share = cur.missing / cur.count
        missing[name] = {"reference": ref_share, "current": cur_share}
        if cur_share - ref_share > config.max_missing_share_increase:
            alarms.append(
                f"{name}: missing in {cur_share:.1%} of trips (reference {ref_share:.1%})"
            )
        if cur.present:
            beyond = int(cur.counts[0] + cur.counts[-1]) / cur.present
            out_of_range[name] = beyond
            if beyond > config.max_out_of_range_share:
                alarms.append(
                    f"{name}: {beyond:.1%} of values outside the reference range "
                    f"[{ref.minimum}, {ref.maximum}]"
                )
    new_categories: dict[str, dict[str, int]] = {}
    for column, counted in current.categorical.items():
        known = reference.categorical.get(column, CategoricalProfile()).counts
        new = {v: n for v, n in counted.counts.items() if v not in known and n}
        if new:
            new_categories[column] = new
    scored = current.rows + quality.trips_set_aside
    violations = dict(sorted(quality.contract_violations.items()))
    violation_share = sum(violations.values()) / scored if scored else 0.0
    if violation_share > config.max_contract_violation_share:
        worst = max(violations, key=violations.__getitem__)
        alarms.append(
            f"{violation_share:.1%} of trips set aside for breaking the feature contract "
            f"(most often {worst}: {violations[worst]})"
        )
    per_reason = {
        reason: n / quality.pings_in if quality.pings_in else 0.0
        for reason, n in sorted(quality.quarantined_per_reason.items())
    }
    for reason, share in per_reason.items():
        if share > config.max_quarantine_share:
            alarms.append(f"{share:.1%} of pings quarantined as {reason}")
    per_source = {
        source: {
            reason: n / quality.pings_per_source.get(source, 0)
            if quality.pings_per_source.get(source)
            else None
            for reason, n in sorted(reasons.items())
        }
        for source, reasons in sorted(quality.quarantined_per_source.items())
    }
    section = {
        "missing_share": missing,
        "out_of_reference_range_share": out_of_range,
        "new_categories": new_categories,
        "contract_violations": violations,
        "contract_violation_share": violation_share,
        "pings_in": quality.pings_in,
        "quarantine_share_per_reason": per_reason,
        "quarantine_share_per_source": per_source,
        "alarms": alarms,
    }
    return section, alarms


def _performance_alarms(
    performance: Mapping[str, Any], card_metrics: Mapping[str, float], config: MonitoringConfig
) -> list[str]:
    """Realised metrics when enough labels matured, else the estimate, against the card."""
    alarms: list[str] = []
    realised = performance.get("realised") or {}
    estimated = performance.get("estimated") or {}
    enough_realised = (realised.get("n") or 0) >= config.min_performance_trips
    chosen, kind = (realised, "realised") if enough_realised else (estimated, "estimated")
    if (chosen.get("n") or 0) < config.min_performance_trips:
        return alarms
    card_auc = card_metrics.get("holdout.roc_auc")
    auc = chosen.get("roc_auc")
    if card_auc is not None and auc is not None and auc < card_auc - config.max_roc_auc_drop:
        alarms.append(
            f"{kind} ROC-AUC {auc:.3f} is more than {config.max_roc_auc_drop:g} below the "
            f"holdout's {card_auc:.3f}"
        )
    card_brier = card_metrics.get("holdout.brier")
    brier = chosen.get("brier")
    if card_brier is not None and brier is not None and brier > card_brier + config.max_brier_rise:
        alarms.append(
            f"{kind} Brier score {brier:.4f} is more than {config.max_brier_rise:g} above the "
            f"holdout's {card_brier:.4f}"
        )
    return alarms


def _drift_alarm(f: FeatureDrift, where: str = "") -> str:
    extra = ""
    if f.new_values:
        extra = " (new: " + ", ".join(f"{v} {n}" for v, n in sorted(f.new_values.items())) + ")"
    value = "n/a" if f.value is None else f"{f.value:.3f}"
    return (
        f"{where}{f.column} drifted: {f.decided_by} {value} ≥ {max(f.threshold, f.noise_floor):.3f}"
        f"{extra}"
    )


def judge_window(
    reference: TripProfile,
    current: TripProfile,
    config: MonitoringConfig,
    *,
    model_columns: Sequence[str],
    card_metrics: Mapping[str, float],
    previous: TripProfile | None = None,
    quality: DataQualityInput | None = None,
    performance: Mapping[str, Any] | None = None,
) -> WindowJudgement:
    """The window's judgement against the champion's reference (see the module doc)."""
    quality = quality or DataQualityInput()
    performance = dict(performance or {})
    features = _compare(reference.overall, current.overall, current, config) if current.rows else []
    vs_previous = (
        _compare(previous.overall, current.overall, current, config)
        if previous is not None and previous.rows and current.rows
        else []
    )
    slices: list[SliceJudgement] = []
    skipped: dict[str, int] = {}
    for column in current.edges.slices:
        reference_slices = reference.slices.get(column, {})
        for value, profile in current.slices.get(column, {}).items():
            if profile.rows < config.min_slice_trips:
                skipped[column] = skipped.get(column, 0) + 1
                continue
            ref = reference_slices.get(value)
            usable = ref is not None and ref.rows >= config.min_slice_trips
            compared = _compare(
                ref if usable and ref else reference.overall, profile, current, config
            )
            judged = _judged(compared)
            slices.append(
                SliceJudgement(
                    column=column,
                    value=value,
                    trips=profile.rows,
                    compared_with="reference" if usable else "overall",
                    status=worst_status([f.status for f in judged]),
                    drifted=[f.column for f in judged if f.status == "drift"],
                    features=compared,
                )
            )
    judged = _judged(features)
    alarms = [_drift_alarm(f) for f in judged if f.status == "drift"]
    for s in slices:
        for f in s.features:
            if f.status == "drift" and f.column in s.drifted:
                alarms.append(_drift_alarm(f, f"{s.column}={s.value}: "))
    columns = [*model_columns, *SCORE_COLUMNS]
    quality_section, quality_alarms = _data_quality(
        reference.overall, current.overall, columns, quality, config
    )
    performance_alarms = _performance_alarms(performance, card_metrics, config)
    performance["alarms"] = performance_alarms
    warned = any(f.status == "warn" for f in judged) or any(
        f.status != "ok" for f in _judged(vs_previous)
    )
    verdict: Verdict
    if performance_alarms:
        verdict = "degraded"
    elif alarms or quality_alarms:
        verdict = "drift"
    elif warned or any(s.status == "warn" for s in slices):
        verdict = "warn"
    else:
        verdict = "ok"
    every_alarm = [*performance_alarms, *alarms, *quality_alarms]
    summary = _summary(verdict, current.rows, every_alarm, features)
    band_shares = {
        "reference": _shares(_band_counts(reference.overall)),
        "current": _shares(_band_counts(current.overall)),
    }
    return WindowJudgement(
        verdict=verdict,
        summary=summary,
        alarms=every_alarm,
        trips=current.rows,
        features=features,
        vs_previous=vs_previous,
        slices=slices,
        skipped_slices=skipped,
        data_quality=quality_section,
        performance=performance,
        band_shares=band_shares,
    )


def _band_counts(profile: DatasetProfile) -> dict[str, int]:
    return profile.categorical.get("risk_band", CategoricalProfile()).counts


def _summary(verdict: str, trips: int, alarms: list[str], features: list[FeatureDrift]) -> str:
    if trips == 0:
        return f"{verdict}: no scored trips in the window"
    if alarms:
        more = f" (+{len(alarms) - 1} more)" if len(alarms) > 1 else ""
        return f"{verdict}: {alarms[0]}{more}"
    warned = [f.column for f in _judged(features) if f.status == "warn"]
    if warned:
        return f"{verdict}: {', '.join(warned)} near the drift threshold ({trips} trips)"
    return f"{verdict}: {trips} trips, no drift, data quality and performance within limits"
