"""`driverscore demo`: simulate → train → register → score a fresh day, on embedded defaults."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from rich.console import Console
from rich.panel import Panel

from driverscore.domain.scoring import aggregate_scores
from driverscore.pipelines.reporting import print_aggregates, print_scores, print_training
from driverscore.pipelines.scoring_run import ScoringRunResult, run_scoring
from driverscore.pipelines.simulation_run import SimulationOutput, write_simulation
from driverscore.pipelines.training_run import TrainingRunResult, run_training
from driverscore.settings import Settings
from driverscore.simulation import SimulationConfig, vehicles_per_chunk_for


@dataclass(frozen=True)
class DemoResult:
    simulation: SimulationOutput
    training: TrainingRunResult
    scoring: ScoringRunResult


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
                    "next: .venv/bin/driverscore score PINGS --out scores.csv (uses this champion)",
                ]
            ),
            title="where everything went",
        )
    )
    return DemoResult(simulation=simulation, training=training, scoring=scoring)
