"""`driverscore train`: check claims → ingest → prepare → label → train → validate → register.

Each step is a function with typed inputs and outputs; the Dagster assets in
:mod:`driverscore.pipelines.dagster_defs` call the same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl

from driverscore.adapters.readers import read_table
from driverscore.adapters.registry import ModelRegistry, RegisteredVersion, open_registry
from driverscore.adapters.storage import DatasetRef
from driverscore.domain.mapping import ColumnMapping
from driverscore.domain.profiles import TripProfile
from driverscore.domain.scoring import ModelCard, feature_matrix
from driverscore.errors import InputDataError, NoModelError
from driverscore.pipelines.spark_steps import Engine, ingest_and_prepare
from driverscore.pipelines.steps import (
    IngestedTelemetry,
    PreparedDataset,
    RunContext,
    code_version,
)
from driverscore.settings import Settings
from driverscore.training.dataset import (
    LABEL_COLUMN,
    REASON_DUPLICATE,
    CheckedLabels,
    check_labels,
    label_trips,
    time_split,
)
from driverscore.training.gate import GateReport, Metrics, evaluate, run_gate
from driverscore.training.model import TrainedModel, train_model
from driverscore.training.onnx_export import export_onnx
from driverscore.training.reference import fit_reference_profile

#: What to do about the most frequent reason when training refuses the claims.
_LABEL_FIXES = {
    "missing_vehicle_id": "fill vehicle_id",
    "unparseable_incident_ts": "write times as ISO-8601, e.g. 2026-01-31T15:41:00Z",
    "missing_incident_ts": "fill incident_ts",
    "unparseable_reported_at": "write times as ISO-8601, e.g. 2026-01-31T15:41:00Z",
    "missing_reported_at": "fill reported_at",
    "reported_before_incident": "check that incident_ts and reported_at are not swapped",
}


@dataclass(frozen=True)
class ClaimLabels:
    """The claims a run may learn from, and the claim rows set aside with their reasons."""

    labels: DatasetRef
    quarantine: DatasetRef
    incidents: pl.DataFrame
    #: ``labels_in``, ``labels_kept``, ``labels_duplicate``, ``labels_rejected`` per reason…
    report: dict[str, Any]


@dataclass(frozen=True)
class TrainingData:
    """Labelled trips split in time: train on the older, validate on the newer."""

    labels: DatasetRef
    label_quarantine: DatasetRef
    #: The claims' counts plus the mature trips and their incident rate.
    label_quality: dict[str, Any]
    train: pl.DataFrame
    holdout: pl.DataFrame


@dataclass(frozen=True)
class ValidatedCandidate:
    """A trained candidate, its ONNX export, its card and its gate report."""

    trained: TrainedModel
    onnx_bytes: bytes
    card: ModelCard
    gate: GateReport
    #: The drift reference (``reference_profile.json``): the profile of the labelled trips.
    reference_profile: TripProfile | None = None


@dataclass(frozen=True)
class TrainingRunResult:
    """Everything one training run produced, with where it went."""

    run_id: str
    ingested: IngestedTelemetry
    prepared: PreparedDataset
    data: TrainingData
    candidate: ValidatedCandidate
    registered: RegisteredVersion
    manifest_uri: str


def check_claims(ctx: RunContext, incidents_uri: str) -> ClaimLabels:
    """Read the claims, set aside the rows that cannot be used, and refuse when too many are.

    Runs before the pings are touched, so a broken claims file stops a run in seconds. The
    rejected rows are written (``label_quarantine``) before refusing: the error names them.
    """
    ctx.progress("check claims")
    checked = check_labels(
        read_table(incidents_uri, None, ctx.settings.storage_options()), incidents_uri
    )
    quarantine = ctx.store.write_dataset(
        "label_quarantine", checked.rejected, name="label_quarantine"
    )
    limit = ctx.settings.training.max_rejected_label_share
    if checked.rejected_share > limit:
        raise InputDataError(_too_many_rejected_labels(checked, limit, quarantine.uri))
    labels = ctx.store.write_dataset("labels", checked.incidents, name="labels")
    not_yet_reported = checked.incidents.filter(pl.col("reported_at") > ctx.reference_time)
    return ClaimLabels(
        labels=labels,
        quarantine=quarantine,
        incidents=checked.incidents,
        report={
            **checked.report(),
            "labels_reported_after_reference_time": not_yet_reported.height,
            "label_quarantine": quarantine.uri,
        },
    )


def _too_many_rejected_labels(checked: CheckedLabels, limit: float, quarantine_uri: str) -> str:
    rejected = {k: v for k, v in checked.counts().items() if k != REASON_DUPLICATE}
    top = max(rejected, key=rejected.__getitem__)
    example = checked.rejected.filter(pl.col("reason") == top).row(0, named=True)
    return (
        f"{checked.source}: {sum(rejected.values()):,} of {checked.labels_in:,} claim rows "
        f"rejected ({checked.rejected_share:.1%}, limit {limit:.1%}); most often {top} "
        f"({rejected[top]:,}), e.g. row {example['row']} {example['column']}="
        f"{example['value']!r} — {_LABEL_FIXES[top]}, or raise "
        "training.max_rejected_label_share (DRIVERSCORE_TRAINING__MAX_REJECTED_LABEL_SHARE); "
        f"rejected rows: {quarantine_uri}"
    )


def label_and_split(
    ctx: RunContext, prepared: PreparedDataset, claims: ClaimLabels
) -> TrainingData:
    """Join the claims to the trips (mature trips only) and split them in time.

    The claims' counts join the run's quality report, next to the pings' counts.
    """
    features = ctx.store.read_dataset(prepared.features)
    labelled = label_trips(
        features,
        claims.incidents,
        reference_time=ctx.reference_time,
        maturity_days=ctx.settings.training.label_maturity_days,
    )
    incident_rate = labelled.select(pl.col(LABEL_COLUMN).cast(pl.Float64).mean()).item()
    label_quality = {
        **claims.report,
        "mature_trips": labelled.height,
        "incident_rate": float(incident_rate) if incident_rate is not None else 0.0,
    }
    ctx.store.write_json(
        "reports", ctx.run_id, "quality.json", {**prepared.quality, "labels": label_quality}
    )
    train, holdout = time_split(labelled, ctx.settings.training.validation_fraction)
    return TrainingData(
        labels=claims.labels,
        label_quarantine=claims.quarantine,
        label_quality=label_quality,
        train=train,
        holdout=holdout,
    )


def train_candidate(ctx: RunContext, data: TrainingData) -> TrainedModel:
    ctx.progress(f"train on {data.train.height:,} trips")
    return train_model(data.train, ctx.settings.training)


def champion_metrics(
    ctx: RunContext, registry: ModelRegistry, holdout: pl.DataFrame, threshold: float
) -> Metrics | None:
    """The current champion scored on the same holdout, through its own ONNX export."""
    try:
        scorer = registry.load_scorer("champion")
    except NoModelError:
        return None
    probabilities = scorer.predict_proba(feature_matrix(holdout, scorer.card.feature_names))
    return evaluate(
        holdout[LABEL_COLUMN].to_numpy(),
        probabilities,
        threshold=scorer.card.decision_threshold,
        fleets=holdout["fleet_id"].to_list(),
        min_slice_trips=ctx.settings.gate.min_slice_trips,
    )


def validate_candidate(
    ctx: RunContext,
    trained: TrainedModel,
    data: TrainingData,
    prepared: PreparedDataset,
    registry: ModelRegistry,
) -> ValidatedCandidate:
    """Export to ONNX (parity-checked), evaluate on the holdout and run the gate."""
    ctx.progress(f"validate on {data.holdout.height:,} newer trips")
    holdout_x = feature_matrix(data.holdout, trained.feature_names)
    onnx_bytes = export_onnx(trained, holdout_x)
    metrics = evaluate(
        data.holdout[LABEL_COLUMN].to_numpy(),
        trained.predict_proba(holdout_x),
        threshold=trained.decision_threshold,
        fleets=data.holdout["fleet_id"].to_list(),
        min_slice_trips=ctx.settings.gate.min_slice_trips,
    )
    champion = champion_metrics(ctx, registry, data.holdout, trained.decision_threshold)
    gate = run_gate(metrics, champion, ctx.settings.gate)
    card = trained.model_card(
        cleaning_config=ctx.settings.cleaning,
        trip_config=ctx.settings.trips,
        feature_config=ctx.settings.features,
        metrics={f"holdout.{k}": v for k, v in metrics.flat().items()},
        lineage=lineage(ctx, prepared, data),
        created_at=ctx.reference_time,
    )
    # The drift reference: every labelled trip of the run (train and holdout), scored by
    # the candidate itself; its hash goes into the card so the pair cannot be mixed up.
    ctx.progress("reference profile")
    reference = fit_reference_profile(
        pl.concat([data.train, data.holdout], how="vertical_relaxed"),
        trained.scorer(card, ctx.settings.model_name, "candidate", "champion"),
    )
    card = card.model_copy(update={"reference_profile_sha256": reference.sha256()})
    return ValidatedCandidate(
        trained=trained, onnx_bytes=onnx_bytes, card=card, gate=gate, reference_profile=reference
    )


def lineage(ctx: RunContext, prepared: PreparedDataset, data: TrainingData) -> dict[str, str]:
    versions = {f"{k}": str(v) for k, v in prepared.quality["datasets"].items()}
    return {
        **versions,
        "labels": data.labels.version,
        "code_version": code_version(),
        "run_id": ctx.run_id,
        "reference_time": ctx.reference_time.isoformat(),
        "data_uri": ctx.store.root_uri,
    }


def register_candidate(
    ctx: RunContext,
    candidate: ValidatedCandidate,
    data: TrainingData,
    prepared: PreparedDataset,
    registry: ModelRegistry,
) -> RegisteredVersion:
    """Record the candidate in the registry; only a passing one gets an alias."""
    ctx.progress("register")
    data_versions = {**prepared.quality["datasets"], "labels": data.labels.version}
    return registry.register(
        candidate.trained,
        candidate.onnx_bytes,
        candidate.card,
        candidate.gate,
        params={
            **candidate.trained.training_params,
            "train_trips": data.train.height,
            "holdout_trips": data.holdout.height,
            "reference_time": ctx.reference_time.isoformat(),
        },
        data_versions={k: str(v) for k, v in data_versions.items()},
        code_version=code_version(),
        sample=data.holdout.head(5),
        reference_profile=(
            candidate.reference_profile.to_json_bytes()
            if candidate.reference_profile is not None
            else None
        ),
    )


_MANIFEST_LABEL_COUNTS = (
    "labels_in",
    "labels_kept",
    "labels_duplicate",
    "labels_rejected",
    "labels_rejected_share",
)


def run_training(
    settings: Settings,
    *,
    pings_uri: str,
    incidents_uri: str,
    reference_time: datetime,
    mapping: ColumnMapping | None = None,
    progress: Callable[[str], None] | None = None,
    engine: Engine = "embedded",
) -> TrainingRunResult:
    """The whole training pipeline in process, with no server."""
    ctx = RunContext.start(settings, reference_time, progress)
    store, run_id = ctx.store, ctx.run_id
    registry = open_registry(settings)
    claims = check_claims(ctx, incidents_uri)
    ingested, prepared = ingest_and_prepare(ctx, engine, pings_uri, mapping, None)
    data = label_and_split(ctx, prepared, claims)
    trained = train_candidate(ctx, data)
    candidate = validate_candidate(ctx, trained, data, prepared, registry)
    store.write_json("reports", run_id, "gate.json", candidate.gate.model_dump(mode="json"))
    registered = register_candidate(ctx, candidate, data, prepared, registry)
    manifest_uri = store.write_run_manifest(
        run_id,
        {
            "kind": "training",
            "raw": ingested.raw.uri,
            "canonical": ingested.canonical.uri,
            "cleaned": prepared.cleaned.uri,
            "features": prepared.features.uri,
            "quarantine": prepared.quarantine.uri,
            "labels": data.labels.uri,
            "label_quarantine": data.label_quarantine.uri,
            **{k: data.label_quality[k] for k in _MANIFEST_LABEL_COUNTS},
            "quality_report": prepared.quality_uri,
            "model": f"{registered.model_name} v{registered.version}",
            "model_alias": registered.alias,
            "gate_status": registered.gate_status,
        },
    )
    return TrainingRunResult(
        run_id=run_id,
        ingested=ingested,
        prepared=prepared,
        data=data,
        candidate=candidate,
        registered=registered,
        manifest_uri=manifest_uri,
    )
