"""`driverscore demo`: simulate → train → register → score a fresh day, on embedded defaults."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.panel import Panel

from driverscore.adapters.ping_files import load_canonical_pings
from driverscore.adapters.registry import open_registry
from driverscore.adapters.score_store.duckdb_store import open_score_store
from driverscore.domain.scoring import aggregate_scores
from driverscore.pipelines.reporting import print_aggregates, print_scores, print_training
from driverscore.pipelines.scoring_run import ScoringRunResult, run_scoring
from driverscore.pipelines.simulation_run import SimulationOutput, write_simulation
from driverscore.pipelines.training_run import TrainingRunResult, run_training
from driverscore.services.stream import StreamMetrics, TripScoringStep, stream_models
from driverscore.services.stream_embedded import (
    EmbeddedRunResult,
    ParquetScoreSink,
    ScoreStoreSink,
    TeeSink,
    run_embedded_stream,
)
from driverscore.settings import Settings
from driverscore.simulation import SimulationConfig, vehicles_per_chunk_for


@dataclass(frozen=True)
class LiveReplay:
    """The fresh day replayed through the stream processor's embedded runner."""

    result: EmbeddedRunResult
    scores_folder: Path
    trips_matching_batch: int


@dataclass(frozen=True)
class DemoResult:
    simulation: SimulationOutput
    training: TrainingRunResult
    scoring: ScoringRunResult
    live: LiveReplay


def replay_live(settings: Settings, pings_uri: str, batch_scores: pl.DataFrame) -> LiveReplay:
    """Score the same pings as they would arrive on Kafka, without a broker.

    The embedded runner cuts trips as they close (session windows per vehicle) and runs the
    stream processor's own trip-closing code; the demo checks it agrees with batch.
    """
    pings, _rejected = load_canonical_pings(pings_uri, None, settings.storage_options())
    step = TripScoringStep(
        stream_models(settings, lambda: open_registry(settings)),
        StreamMetrics(),
        policy=settings.kafka.rollout,
    )
    folder = (settings.home / "stream").resolve()
    sink = ParquetScoreSink(folder)
    # The live records replace the batch ones of the same trips in the score store (same
    # model version, scored later): each trip stays counted once.
    result = run_embedded_stream(
        pings,
        step,
        TeeSink((sink, ScoreStoreSink(open_score_store(settings)))),
        grace_s=settings.kafka.grace_s,
    )
    written = [path for path in sink.written if path.parent.name == "scores"]
    live = (
        pl.concat([pl.read_parquet(path) for path in written])
        if written
        else pl.DataFrame(
            schema={"vehicle_id": pl.String, "trip_id": pl.String, "score": pl.Float64}
        )
    ).select("vehicle_id", "trip_id", pl.col("score").alias("live_score"))
    matching = (
        batch_scores.select("vehicle_id", "trip_id", "score")
        .join(live, on=["vehicle_id", "trip_id"], how="inner")
        .filter((pl.col("score") - pl.col("live_score")).abs() <= 1e-9)
        .height
    )
    return LiveReplay(result=result, scores_folder=folder, trips_matching_batch=matching)


def run_demo(
    settings: Settings, console: Console, *, vehicles: int, days: int, seed: int
) -> DemoResult:
    """Run the whole batch loop and print where every artifact went."""
    config = SimulationConfig(
        vehicles=vehicles,
        days=days + 1,
        seed=seed,
        vehicles_per_chunk=vehicles_per_chunk_for(days + 1),
    )
    history_end = config.start + timedelta(days=days)
    sim_uri = str((settings.home / "demo" / f"fleet-seed{seed}").resolve())

    console.rule("[bold]1. simulate")
    with console.status("simulating the fleet…") as status:
        simulation = write_simulation(
            config,
            sim_uri,
            settings.storage_options(),
            fresh_from=history_end,
            progress=status.update,
        )
    console.print(
        f"{vehicles} vehicles, {days} days of history + 1 fresh day: "
        f"{simulation.pings:,} history pings, {simulation.fresh_pings:,} fresh pings, "
        f"{simulation.incidents:,} incidents (claims, reported with a delay)"
    )

    console.rule("[bold]2. train, validate, register")
    with console.status("training…") as status:
        training = run_training(
            settings,
            pings_uri=simulation.pings_uri,
            incidents_uri=simulation.incidents_uri,
            reference_time=history_end,
            progress=status.update,
        )
    print_training(console, training)

    console.rule("[bold]3. score the fresh day with the champion")
    scores_uri = str((settings.home / "demo" / f"scores-{history_end:%Y-%m-%d}.parquet").resolve())
    with console.status("scoring…") as status:
        scoring = run_scoring(
            settings,
            pings_uri=simulation.fresh_pings_uri or simulation.pings_uri,
            out_uri=scores_uri,
            reference_time=history_end + timedelta(days=1),
            progress=status.update,
        )
    print_scores(console, scoring)
    console.rule("[bold]4. replay the fresh day live (stream processor, no broker)")
    with console.status("replaying pings as they would arrive…"):
        live = replay_live(
            settings, simulation.fresh_pings_uri or simulation.pings_uri, scoring.scores
        )
    console.print(
        f"{live.result.pings:,} pings replayed in event-time order: {live.result.trips:,} trips "
        f"closed and scored as they ended, {live.result.alerts:,} high-risk alerts; "
        f"{live.trips_matching_batch:,} of {scoring.scores.height:,} trips score exactly as "
        f"in batch → {live.scores_folder}"
    )
    if scoring.scores.height:
        drivers = aggregate_scores(
            scoring.scores,
            by="driver",
            as_of=history_end + timedelta(days=1),
            window_days=30,
        )
        print_aggregates(console, drivers, "driver", limit=5)

    console.print(
        Panel.fit(
            "\n".join(
                [
                    f"home               {settings.home.resolve()}",
                    f"simulated fleet    {sim_uri}",
                    f"datasets           {settings.resolved_data_uri}",
                    f"MLflow registry    {settings.resolved_tracking_uri}",
                    f"training manifest  {training.manifest_uri}",
                    f"quality report     {training.prepared.quality_uri}",
                    f"scores             {scoring.out_uri}",
                    f"live scores        {live.scores_folder}",
                    f"score store        {settings.store_path}",
                    "                   (driverscore scores worst_drivers, latest_alerts, ...)",
                    "next: .venv/bin/driverscore score PINGS --out scores.csv (uses this champion)",
                ]
            ),
            title="where everything went",
        )
    )
    # Last, so it is what the reader sees: the dashboard on the demo's store and registry.
    service = settings.service
    console.print(
        f"dashboard: DRIVERSCORE_HOME={shlex.quote(str(settings.home.resolve()))} "
        f".venv/bin/driverscore dashboard  → http://{service.host}:{service.port}/dashboard/",
        soft_wrap=True,
        highlight=False,
    )
    return DemoResult(simulation=simulation, training=training, scoring=scoring, live=live)
