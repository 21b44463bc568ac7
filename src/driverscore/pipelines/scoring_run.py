"""`driverscore score`: one trip score record per trip of a ping file, with a registered model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from driverscore.adapters.files import write_table
from driverscore.adapters.storage import DatasetRef
from driverscore.domain.mapping import ColumnMapping
from driverscore.domain.scoring import TripScorer
from driverscore.pipelines.steps import (
    DomainConfigs,
    IngestedTelemetry,
    PreparedDataset,
    RunContext,
    ingest,
    prepare,
)
from driverscore.pipelines.training_run import open_registry
from driverscore.settings import Settings


@dataclass(frozen=True)
class ScoringRunResult:
    """Scores of one file and where they went."""

    run_id: str
    scores: pl.DataFrame
    scores_ref: DatasetRef
    out_uri: str
    prepared: PreparedDataset
    ingested: IngestedTelemetry
    manifest_uri: str


def score_prepared(ctx: RunContext, scorer: TripScorer, prepared: PreparedDataset) -> pl.DataFrame:
    """Score the prepared trips (features computed with the model's own configs)."""
    features = ctx.store.read_dataset(prepared.features)
    ctx.progress(f"score {features.height:,} trips")
    return scorer.score_trips(features, scored_at=ctx.reference_time)


def run_scoring(
    settings: Settings,
    *,
    pings_uri: str,
    out_uri: str,
    reference_time: datetime,
    mapping: ColumnMapping | None = None,
    alias: str = "champion",
    progress: Callable[[str], None] | None = None,
) -> ScoringRunResult:
    """Ingest, prepare with the model's cleaning/trip/feature configs, score and write."""
    ctx = RunContext.start(settings, reference_time, progress)
    store, run_id = ctx.store, ctx.run_id
    scorer = open_registry(settings).load_scorer(alias)
    card = scorer.card
    # What training learned travels with the model: features are rebuilt with the exact
    # thresholds the model was trained on, whatever the local settings say.
    configs = DomainConfigs(
        cleaning=card.cleaning_config, trips=card.trip_config, features=card.feature_config
    )
    ingested = ingest(ctx, pings_uri, mapping)
    prepared = prepare(ctx, ingested, configs)
    scores = score_prepared(ctx, scorer, prepared)
    scores_ref = store.write_dataset("scores", scores, name="scores")
    write_table(scores, out_uri, settings.storage_options())
    manifest_uri = store.write_run_manifest(
        run_id,
        {
            "kind": "scoring",
            "raw": ingested.raw.uri,
            "cleaned": prepared.cleaned.uri,
            "features": prepared.features.uri,
            "quarantine": prepared.quarantine.uri,
            "quality_report": prepared.quality_uri,
            "scores": scores_ref.uri,
            "output": out_uri,
            "model": f"{scorer.model_name} v{scorer.model_version} ({scorer.model_role})",
        },
    )
    return ScoringRunResult(
        run_id=run_id,
        scores=scores,
        scores_ref=scores_ref,
        out_uri=out_uri,
        prepared=prepared,
        ingested=ingested,
        manifest_uri=manifest_uri,
    )
