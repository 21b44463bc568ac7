"""`driverscore monitor`: one window of scored trips against the champion's reference.

The window's profile is the merge of the profile parts every writer of trip records
stored for the champion's version and the window's hours of trip end
(``adapters/profile_parts.py``: batch scoring, the service, the stream processor), never
a rescan of the records; only performance reads the trips' key, time and probability
columns. It judges the window (``domain/monitoring.py``): drift per
feature and per slice, score shift and band shares, data quality (the scoring runs'
quarantine and set-aside trips), realised performance on the trips whose claims matured
(the training's label rule) and estimated performance (``domain/performance.py``) beside
it. Writes the versioned JSON result (``monitoring/<run_id>/monitoring.json``) and the
HTML report (``report.html``) next to it; the Dagster job calls the same function hourly.

A champion registered before profiles existed gets its reference built here, once, from
the features dataset its lineage names, and stored with the model version; ``scores``
datasets written before their parts (or while the version had no reference) are profiled
here, once each.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import polars as pl

import driverscore
from driverscore.adapters.profile_parts import KEY_COLUMNS, ProfilePartStore, hour_of
from driverscore.adapters.readers import read_table
from driverscore.adapters.registry import CHAMPION, ModelRegistry, open_registry
from driverscore.adapters.storage import DataStore
from driverscore.domain.monitoring import (
    RESULT_SCHEMA_VERSION,
    DataQualityInput,
    WindowJudgement,
    judge_window,
)
from driverscore.domain.performance import estimate_performance
from driverscore.domain.profiles import TripProfile, merge_profiles
from driverscore.domain.scoring import ModelCard
from driverscore.domain.trip_scoring import SET_ASIDE_INVALID
from driverscore.errors import NoModelError
from driverscore.pipelines.monitor_report import render_report
from driverscore.pipelines.steps import new_run_id
from driverscore.services.profile_writer import write_scores_profiles
from driverscore.settings import Settings
from driverscore.training.dataset import LABEL_COLUMN, check_labels, label_trips
from driverscore.training.gate import evaluate
from driverscore.training.reference import fit_reference_profile

__all__ = [
    "MONITORING_KIND",
    "MonitoringRunResult",
    "WindowProfile",
    "load_reference",
    "profile_scores_once",
    "run_monitor",
    "trip_keys",
    "window_bounds",
    "window_profile",
]

#: Data store kind of the monitoring results.
MONITORING_KIND: Final = "monitoring"
RESULT_NAME: Final = "monitoring.json"
REPORT_NAME: Final = "report.html"
_UTC_US: Final = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class MonitoringRunResult:
    run_id: str
    result: dict[str, Any]
    judgement: WindowJudgement
    result_uri: str
    report_uri: str
    report_html: str

    @property
    def verdict(self) -> str:
        return self.judgement.verdict


@dataclass(frozen=True)
class Reference:
    """The champion's reference profile and where it came from."""

    profile: TripProfile
    #: ``model_version`` (stored at training) or ``lineage`` (built from the features
    #: dataset the lineage names, on this run, and stored with the version).
    source: str


def load_reference(
    registry: ModelRegistry, version: str, card: ModelCard, settings: Settings
) -> Reference:
    """The version's stored reference profile, or one built once from its lineage."""
    stored = registry.load_reference_profile(version)
    if stored is not None:
        return Reference(TripProfile.from_json(stored), "model_version")
    features_version = card.lineage.get("features")
    if not features_version:
        raise NoModelError(
            f"model {registry.model_name!r} version {version} has no reference profile and its "
            "lineage names no features dataset to build one from — retrain it (driverscore "
            "train) so the reference is fitted with it"
        )
    root = card.lineage.get("data_uri") or settings.resolved_data_uri
    store = DataStore(root, settings.storage_options())
    try:
        features = store.read_dataset(store.dataset("features", features_version))
    except FileNotFoundError:
        raise NoModelError(
            f"model version {version} has no reference profile, and the features dataset "
            f"{features_version} its lineage names is not in {root} — retrain it"
        ) from None
    scorer = registry.load_scorer(CHAMPION)
    profile = fit_reference_profile(features, scorer)
    registry.save_reference_profile(version, profile.to_json_bytes())
    return Reference(profile, "lineage")


def window_bounds(as_of: datetime, hours: float) -> tuple[datetime, datetime]:
    """The window of trip ends ``[start, end)``: whole UTC hours ending at the hour that
    holds ``as_of`` (profile parts are per hour, so a window is a merge of whole parts),
    at least one hour long."""
    end = hour_of(as_of)
    return end - timedelta(hours=max(1, math.ceil(hours))), end


def profile_scores_once(
    store: DataStore, parts: ProfilePartStore, version: str, reference: TripProfile
) -> list[str]:
    """Profile the ``scores`` datasets whose trips of ``version`` are not in parts yet
    (written before profile parts existed, or while the version had no reference), once
    each: the only place the monitor reads whole score records. The datasets' versions."""
    done = parts.profiled_scores(version)
    profiled: list[str] = []
    for ref in store.versions("scores"):
        if ref.version in done:
            continue
        frames = [
            part.filter(pl.col("model_version") == version)
            for part in store.scan_dataset(ref)
            if "model_version" in part.columns and "end_ts" in part.columns
        ]
        frames = [f for f in frames if f.height]
        rows = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
        write_scores_profiles(parts, rows, ref, {version: reference})
        profiled.append(ref.version)
    return profiled


@dataclass(frozen=True)
class WindowProfile:
    """The merge of a window's profile parts, and what went into it."""

    profile: TripProfile
    #: ``scores`` datasets whose trips are in the window (their scoring runs' quality).
    sources: list[str]
    parts: int
    #: Parts made on another reference of the version (not mergeable; left out, counted).
    other_reference: int


def window_profile(
    parts: ProfilePartStore,
    version: str,
    reference: TripProfile,
    start: datetime,
    end: datetime,
) -> WindowProfile:
    """The profile of ``version``'s trips ending in ``[start, end)``: a merge of the stored
    parts of those hours, never a read of trip records."""
    sha = reference.sha256()
    stored = parts.parts(version, start, end)
    usable = [p for p in stored if p.reference_profile_sha256 == sha]
    sources: list[str] = []
    for part in usable:
        uri = part.source.get("scores")
        if uri and uri not in sources:
            sources.append(str(uri))
    merged = merge_profiles((p.profile(reference) for p in usable), reference.edges)
    return WindowProfile(merged, sources, len(usable), len(stored) - len(usable))


def trip_keys(
    store: DataStore, parts: ProfilePartStore, version: str, start: datetime, end: datetime
) -> pl.DataFrame:
    """Key, time and probability columns of ``version``'s trips ending in ``[start, end)``,
    each trip once (the latest scoring wins): from the ``scores`` datasets (those columns
    only) and the keys the service and the stream store beside their parts."""
    frames: list[pl.DataFrame] = []
    for ref in store.versions("scores"):
        for part in store.scan_dataset(ref, columns=KEY_COLUMNS):
            if {"end_ts", "model_version"} <= set(part.columns):
                frames.append(part)
    frames.append(parts.keys(version, start, end))
    frames = [f for f in frames if f.height]
    if not frames:
        return pl.DataFrame(schema={"risk_probability": pl.Float64()})
    end_ts = pl.col("end_ts").cast(_UTC_US)
    keys = pl.concat(frames, how="diagonal_relaxed").filter(
        (end_ts >= start) & (end_ts < end) & (pl.col("model_version") == version)
    )
    return keys.sort("scored_at").unique(
        subset=["vehicle_id", "trip_id"], keep="last", maintain_order=True
    )


def _quality(store: DataStore, sources: list[str]) -> DataQualityInput:
    """Quarantine and contract violations of the scoring runs that wrote ``sources``."""
    pings_in = 0
    per_reason: Counter[str] = Counter()
    per_source: dict[str, Counter[str]] = {}
    pings_per_source: Counter[str] = Counter()
    violations: Counter[str] = Counter()
    set_aside = 0
    for manifest in store.run_manifests():
        artifacts = manifest.get("artifacts", {})
        if artifacts.get("kind") != "scoring" or artifacts.get("scores") not in sources:
            continue
        quality_uri = artifacts.get("quality_report")
        if quality_uri:
            quality = store.read_json(str(quality_uri))
            pings_in += int(quality.get("rows_in", 0))
            per_reason.update({str(k): int(v) for k, v in quality["quarantined_per_rule"].items()})
            for source, reasons in quality.get("quarantined_per_source", {}).items():
                per_source.setdefault(str(source), Counter()).update(
                    {str(k): int(v) for k, v in reasons.items()}
                )
            for source, kept in quality.get("kept_per_source", {}).items():
                quarantined = sum(
                    quality.get("quarantined_per_source", {}).get(source, {}).values()
                )
                pings_per_source[str(source)] += int(kept) + int(quarantined)
        set_aside_uri = artifacts.get("set_aside")
        if set_aside_uri:
            rows = store.read_dataset(str(set_aside_uri))
            set_aside += rows.height
            invalid = rows.filter(pl.col("reason") == SET_ASIDE_INVALID)
            for detail in invalid.get_column("detail").to_list():
                violations[str(detail).split(":", 1)[0]] += 1
    return DataQualityInput(
        pings_in=pings_in,
        quarantined_per_reason=dict(per_reason),
        quarantined_per_source={k: dict(v) for k, v in per_source.items()},
        pings_per_source=dict(pings_per_source),
        contract_violations=dict(violations),
        trips_set_aside=set_aside,
    )


def _claims(settings: Settings, store: DataStore, labels_uri: str | None) -> pl.DataFrame | None:
    """The claims to label matured trips with: the file given, else the newest ``labels``
    dataset a training run stored; None when there are none."""
    if labels_uri is not None:
        table = read_table(labels_uri, None, settings.storage_options())
        return check_labels(table, labels_uri).incidents
    latest = store.latest("labels")
    return store.read_dataset(latest) if latest is not None else None


def _metrics(values: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()
    }


def _ending_in(keys: pl.DataFrame, start: datetime, end: datetime) -> pl.DataFrame:
    if keys.height == 0:
        return keys
    end_ts = pl.col("end_ts").cast(_UTC_US)
    return keys.filter((end_ts >= start) & (end_ts < end))


def _performance(
    settings: Settings,
    store: DataStore,
    parts: ProfilePartStore,
    card: ModelCard,
    version: str,
    as_of: datetime,
    window: timedelta,
    labels_uri: str | None,
) -> dict[str, Any]:
    """Estimated performance of the window; realised and estimated side by side on the
    latest window whose claims matured (the training's maturity rule). Both need each
    trip's probability (and the matured trips' keys and times for the claims): the trips'
    key columns are read, never their features."""
    threshold = card.decision_threshold
    maturity = timedelta(days=settings.training.label_maturity_days)
    matured_end = as_of - maturity
    matured_start = matured_end - window
    # One read of the key columns for both windows.
    keys = trip_keys(store, parts, version, min(matured_start, as_of - window), as_of)
    records = _ending_in(keys, as_of - window, as_of)
    probabilities = (
        records.get_column("risk_probability").to_numpy() if records.height else np.empty(0)
    )
    out: dict[str, Any] = {"estimated": _metrics(estimate_performance(probabilities, threshold))}
    out["matured_window"] = {"start": matured_start, "end": matured_end}
    out["label_maturity_days"] = settings.training.label_maturity_days
    out["realised"] = None
    claims = _claims(settings, store, labels_uri)
    if claims is None:
        out["realised_unavailable"] = "no claims: pass --labels or train once (labels dataset)"
        return out
    matured = _ending_in(keys, matured_start, matured_end)
    if matured.height == 0:
        out["realised_unavailable"] = "no scored trips in the matured window"
        return out
    labelled = label_trips(
        matured,
        claims,
        reference_time=as_of,
        maturity_days=settings.training.label_maturity_days,
    )
    labelled = labelled.filter(pl.col("risk_probability").is_not_null())
    if labelled.height == 0:
        out["realised_unavailable"] = "no matured trips"
        return out
    y = labelled.get_column(LABEL_COLUMN).to_numpy()
    p = labelled.get_column("risk_probability").to_numpy()
    realised = evaluate(y, p, threshold)
    out["realised"] = _metrics(realised.model_dump(exclude={"per_fleet"}))
    out["estimated_on_matured"] = _metrics(estimate_performance(p, threshold))
    return out


def _history(store: DataStore, limit: int = 200) -> list[dict[str, Any]]:
    """Earlier results' verdicts and performance, oldest first, for the report's trend."""
    points: list[dict[str, Any]] = []
    for uri in store.report_uris(MONITORING_KIND, RESULT_NAME)[-limit:]:
        try:
            past = store.read_json(uri)
        except (OSError, ValueError):
            continue
        performance = past.get("performance", {})
        points.append(
            {
                "window_end": past.get("window", {}).get("end"),
                "verdict": past.get("verdict"),
                "estimated_roc_auc": (performance.get("estimated") or {}).get("roc_auc"),
                "realised_roc_auc": (performance.get("realised") or {}).get("roc_auc"),
            }
        )
    return points


def run_monitor(
    settings: Settings,
    *,
    as_of: datetime | None = None,
    window_hours: float | None = None,
    labels_uri: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> MonitoringRunResult:
    """Judge the window ending at ``as_of`` (default: now) and write the result and report."""
    say = progress or (lambda _message: None)
    as_of = (as_of or datetime.now(UTC)).astimezone(UTC)
    config = settings.monitoring
    start, end = window_bounds(as_of, window_hours or config.window_hours)
    window = end - start
    store = DataStore(settings.resolved_data_uri, settings.storage_options())
    parts = ProfilePartStore(store)
    registry = open_registry(settings)
    version = registry.alias_version(CHAMPION)
    if version is None:
        raise NoModelError(
            f"model {settings.model_name!r} has no champion to monitor at "
            f"{settings.resolved_tracking_uri}; train and register one first (driverscore train)"
        )
    card = registry.load_card(version)
    say(f"reference profile of version {version}")
    reference = load_reference(registry, version, card, settings)
    profiled_now = profile_scores_once(store, parts, version, reference.profile)
    if profiled_now:
        say(f"profiled {len(profiled_now)} scores datasets written before their profile parts")
    say("merge the window's profile parts")
    current_window = window_profile(parts, version, reference.profile, start, end)
    previous_window = window_profile(parts, version, reference.profile, start - window, start)
    current = current_window.profile
    previous = previous_window.profile if previous_window.profile.rows else None
    sources = current_window.sources
    if current.rows == 0:
        say("no scored trips in the window")
    quality = _quality(store, sources)
    say("performance")
    performance = _performance(settings, store, parts, card, version, end, window, labels_uri)
    judgement = judge_window(
        reference.profile,
        current,
        config,
        model_columns=card.feature_names,
        card_metrics=card.metrics,
        previous=previous,
        quality=quality,
        performance=performance,
    )
    run_id = new_run_id(as_of)
    profile_parts = {
        "current": current_window.parts,
        "previous": previous_window.parts,
        "other_reference": current_window.other_reference + previous_window.other_reference,
        "scores_profiled_now": profiled_now,
    }
    result: dict[str, Any] = {
        "result_schema_version": RESULT_SCHEMA_VERSION,
        "kind": MONITORING_KIND,
        "run_id": run_id,
        "created_at": datetime.now(UTC),
        "driverscore_version": driverscore.__version__,
        "window": {"start": start, "end": end, "hours": window / timedelta(hours=1)},
        "as_of": as_of,
        "model": {
            "name": settings.model_name,
            "version": version,
            "features": card.feature_names,
            "reference_source": reference.source,
            "reference_profile_sha256": reference.profile.sha256(),
            "reference_trips": reference.profile.rows,
        },
        "sources": sources,
        "profile_parts": profile_parts,
        "config": config.model_dump(mode="json"),
        **judgement.to_dict(),
    }
    say("write the result and the report")
    result_uri = store.write_json(MONITORING_KIND, run_id, RESULT_NAME, result)
    html = render_report(result, reference.profile, current, _history(store))
    report_uri = store.write_text(MONITORING_KIND, run_id, REPORT_NAME, html)
    store.write_run_manifest(
        run_id,
        {
            "kind": MONITORING_KIND,
            "result": result_uri,
            "report": report_uri,
            "verdict": judgement.verdict,
            "model": f"{settings.model_name} v{version}",
        },
    )
    return MonitoringRunResult(run_id, result, judgement, result_uri, report_uri, html)
