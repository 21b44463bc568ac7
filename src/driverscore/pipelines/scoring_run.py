"""`driverscore score`: one trip score record per trip of a ping file, with a registered model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from driverscore.adapters.files import write_table
from driverscore.adapters.profile_parts import ProfilePartStore
from driverscore.adapters.registry import ModelRegistry, open_registry
from driverscore.adapters.score_store import ScoreBatch
from driverscore.adapters.score_store.duckdb_store import WriteReport, open_score_store
from driverscore.adapters.spark.models import ShippedModel, ShippedScoring
from driverscore.adapters.storage import DatasetRef, DataStore
from driverscore.domain.features import ping_events, trip_features
from driverscore.domain.mapping import ColumnMapping
from driverscore.domain.profiles import TripProfile
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.routes import trip_routes
from driverscore.domain.scoring import TripScorer
from driverscore.domain.trip_scoring import (
    PredictionRecord,
    ScoredTrips,
    ScoringModels,
    score_trip_features,
)
from driverscore.errors import ConfigError
from driverscore.pipelines.spark_steps import (
    Engine,
    ingest_and_prepare,
    ingest_prepare_and_score_spark,
)
from driverscore.pipelines.steps import (
    DomainConfigs,
    IngestedTelemetry,
    PreparedDataset,
    RunContext,
)
from driverscore.services.prediction_log import open_prediction_log
from driverscore.services.profile_writer import write_scores_profiles
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
    #: Trips not scored, with the reason (``invalid_features``, ``non_finite_output``).
    set_aside: pl.DataFrame
    set_aside_uri: str | None
    decisions: int
    #: Profile parts written per model version (``adapters/profile_parts.py``); a version
    #: without a reference profile has none (the monitor profiles its trips once, later).
    profile_parts: dict[str, list[str]]
    #: What the score store took (records, alerts, routes), when the run stored its scores.
    stored: WriteReport | None = None
    store_path: str | None = None


@dataclass(frozen=True)
class BatchScores:
    """What a batch run scored, whichever engine scored it, ready to write."""

    records: pl.DataFrame
    alerts: pl.DataFrame
    set_aside: pl.DataFrame
    decisions: list[PredictionRecord]
    #: The trips' routes when the engine made them; else they come from the cleaned pings.
    routes: pl.DataFrame | None = None

    @classmethod
    def of(cls, scored: ScoredTrips) -> BatchScores:
        return cls(
            scored.records_frame(),
            scored.alerts_frame(),
            scored.set_aside_frame(),
            scored.decisions,
        )


def shipped_scoring(
    registry: ModelRegistry, models: ScoringModels, policy: RolloutPolicy
) -> ShippedScoring:
    """The run's models as executors receive them: each version's ONNX export and card."""

    def ship(scorer: TripScorer) -> ShippedModel:
        onnx = registry.load_onnx(scorer.model_version)
        return ShippedModel.of(
            onnx, scorer.card, scorer.model_name, scorer.model_version, scorer.model_role
        )

    challenger = models.challenger
    return ShippedScoring(
        champion=ship(models.champion),
        challenger=ship(challenger) if challenger is not None else None,
        policy_json=policy.model_dump_json(),
    )


def score_prepared(
    ctx: RunContext,
    models: ScoringModels,
    policy: RolloutPolicy,
    prepared: PreparedDataset,
) -> ScoredTrips:
    """Score the prepared trips on the one scoring path (``domain/trip_scoring.py``).

    Features were computed with the champion card's configurations; when a challenger
    scores too and learned other feature thresholds, its features are computed from the
    same cleaned trips with its own configuration, so both score the same trips.
    """
    features = ctx.store.read_dataset(prepared.features)
    challenger_features: pl.DataFrame | None = None
    challenger = models.challenger
    if (
        challenger is not None
        and policy.mode != "champion"
        and challenger.card.feature_config != models.champion.card.feature_config
        and features.height
    ):
        cleaned = ctx.store.read_dataset(prepared.cleaned)
        other = trip_features(cleaned, challenger.card.feature_config)
        challenger_features = features.select("vehicle_id", "trip_id").join(
            other, on=["vehicle_id", "trip_id"], how="left", maintain_order="left"
        )
    ctx.progress(f"score {features.height:,} trips")
    return score_trip_features(
        features, models, policy, ctx.reference_time, challenger_features=challenger_features
    )


def write_profiles(
    store: DataStore, registry: ModelRegistry, scores: pl.DataFrame, scores_ref: DatasetRef
) -> dict[str, list[str]]:
    """Profile parts of the scores just written, for each scoring model version that has
    a reference profile: the monitor merges them and never reads these rows for drift."""
    references: dict[str, TripProfile] = {}
    if "model_version" in scores.columns:
        for version in scores.get_column("model_version").drop_nulls().unique().sort():
            stored = registry.load_reference_profile(str(version))
            if stored is not None:
                references[str(version)] = TripProfile.from_json(stored)
    return write_scores_profiles(ProfilePartStore(store), scores, scores_ref, references)


def rollout_policy(settings: Settings, path: Path | None) -> RolloutPolicy:
    """The rollout policy of a batch run: ``path`` (JSON), else the service's rollout file
    when it exists, else the policy stored in the registry (the one every replica of the
    service and the stream follows), else the service's rollout settings."""
    if path is not None and not path.exists():
        raise ConfigError(f"rollout policy {path} does not exist; give an existing JSON file")
    source = path if path is not None else settings.service.rollout_file
    if source is not None and source.exists():
        try:
            return RolloutPolicy.model_validate_json(source.read_bytes())
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(
                f"rollout policy {source} is not readable JSON of mode, challenger_percent, "
                f"salt ({first}); fix the file"
            ) from None
    stored = open_registry(settings, audit=False).stored_rollout_policy()
    if stored is not None:
        return stored
    config = settings.service
    return RolloutPolicy(mode=config.rollout_mode, challenger_percent=config.challenger_percent)


def run_scoring(
    settings: Settings,
    *,
    pings_uri: str,
    out_uri: str,
    reference_time: datetime,
    mapping: ColumnMapping | None = None,
    alias: str = "champion",
    policy: RolloutPolicy | None = None,
    progress: Callable[[str], None] | None = None,
    engine: Engine = "embedded",
    store_scores: bool = True,
) -> ScoringRunResult:
    """Ingest, prepare with the model's cleaning/trip/feature configs, score and write.

    With the champion and a rollout ``policy`` other than ``champion``, the challenger
    scores too, exactly as the service and the stream would: the driver's model answers,
    the other one's score goes to the prediction log. Every decision is logged.
    With ``store_scores``, the answer records, alerts and the trips' routes go to the score store
    (``<home>/scores.duckdb``) too, where the dashboards and `driverscore scores` read them.
    """
    policy = policy or RolloutPolicy()
    ctx = RunContext.start(settings, reference_time, progress)
    store, run_id = ctx.store, ctx.run_id
    registry = open_registry(settings)
    champion = registry.load_scorer(alias)
    challenger = None
    if (
        alias == "champion"
        and policy.mode != "champion"
        and registry.alias_version("challenger") is not None
    ):
        challenger = registry.load_scorer("challenger")
    models = ScoringModels(champion, challenger)
    card = champion.card
    # What training learned travels with the model: features are rebuilt with the exact
    # thresholds the model was trained on, whatever the local settings say.
    configs = DomainConfigs(
        cleaning=card.cleaning_config, trips=card.trip_config, features=card.feature_config
    )
    if engine == "spark":
        # Scored on the executors with the models' ONNX exports: only the scores (one row
        # per trip) come back to this process.
        ingested, prepared, on_spark = ingest_prepare_and_score_spark(
            ctx, pings_uri, mapping, shipped_scoring(registry, models, policy)
        )
        scored = BatchScores(
            on_spark.records,
            on_spark.alerts,
            on_spark.set_aside,
            [PredictionRecord(**row) for row in on_spark.decisions.iter_rows(named=True)],
            on_spark.routes,
        )
    else:
        ingested, prepared = ingest_and_prepare(ctx, engine, pings_uri, mapping, configs)
        scored = BatchScores.of(score_prepared(ctx, models, policy, prepared))
    scores = scored.records
    set_aside = scored.set_aside
    scores_ref = store.write_dataset("scores", scores, name="scores")
    set_aside_uri = (
        store.write_dataset("scoring_set_aside", set_aside, name="set_aside").uri
        if set_aside.height
        else None
    )
    profile_parts = write_profiles(store, registry, scores, scores_ref)
    if scored.decisions:
        log = open_prediction_log(settings)
        log.setup()
        log.add(scored.decisions)
        log.flush()
    write_table(scores, out_uri, settings.storage_options())
    stored = None
    if store_scores:
        ctx.progress(f"store {scores.height:,} trips in {settings.store_path}")
        routes = (
            scored.routes
            if scored.routes is not None
            else trip_routes(
                ping_events(ctx.store.read_dataset(prepared.cleaned), champion.card.feature_config)
            )
        )
        if routes.height:
            routes = routes.join(
                scores.select("vehicle_id", "trip_id"), on=["vehicle_id", "trip_id"], how="semi"
            )
        stored = open_score_store(settings).write(
            ScoreBatch("score", scores=scores, alerts=scored.alerts, routes=routes)
        )
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
            "set_aside": set_aside_uri,
            "trips_set_aside": set_aside.height,
            "decisions_logged": len(scored.decisions),
            "profile_parts": {v: len(p) for v, p in profile_parts.items()},
            "rollout": policy.model_dump(),
            "output": out_uri,
            "score_store": str(settings.store_path) if stored is not None else None,
            "model": f"{champion.model_name} v{champion.model_version} ({alias})",
            "challenger": challenger.model_version if challenger is not None else None,
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
        set_aside=set_aside,
        set_aside_uri=set_aside_uri,
        decisions=len(scored.decisions),
        stored=stored,
        store_path=str(settings.store_path) if stored is not None else None,
        profile_parts=profile_parts,
    )
