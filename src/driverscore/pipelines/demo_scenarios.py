"""`driverscore demo --scenario drift|bad-challenger`: the closed loop, replayed day by day.

A simulated fleet is written one folder per day; the history lands in the raw landing
folder and trains the champion; then each following day lands, is scored in batch with the
registry's rollout policy (the score store, the prediction log and the profile parts get
what the service would write), and the monitor judges the day's window. Claims are read
as of each replayed day, so labels mature as they would (the simulator reports each claim
after a delay).

- ``drift``: every device over-reports speed from ``drift_day`` on (a firmware update).
  The monitor flags it; a retraining is requested with the verdict as its reason and runs
  once ``drifted_days_to_learn`` drifted days have matured claims inside its training
  split (training only learns from matured trips); its model passes the gate and
  becomes the challenger at a canary share; once the canary's trips have matured
  claims, the decision job compares both models on the same trips and promotes the
  challenger.
- ``bad-challenger``: no drift. The weekly retraining is misconfigured: its column
  mapping reads ``speed_mps`` as km/h while the devices send m/s. On its own holdout
  (read through the same mapping) the model beats the champion and passes the gate, and
  becomes the challenger; live, it sees speeds as they are, and the decision job,
  comparing both on the same trips, rejects it; the champion stays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import polars as pl
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from driverscore.adapters.files import write_table
from driverscore.adapters.registry import CHALLENGER, CHAMPION, open_registry
from driverscore.domain.mapping import ColumnMapping
from driverscore.domain.rollout import RolloutPolicy
from driverscore.pipelines.monitoring_run import run_monitor
from driverscore.pipelines.scoring_run import run_scoring
from driverscore.pipelines.training_run import TrainingRunResult, run_training
from driverscore.settings import Settings
from driverscore.simulation import (
    DriftConfig,
    SimulationConfig,
    iter_simulation,
    vehicles_per_chunk_for,
)

__all__ = ["SCENARIOS", "ScenarioPlan", "ScenarioResult", "run_scenario"]

Scenario = Literal["drift", "bad-challenger"]
SCENARIOS: Final[tuple[str, ...]] = ("drift", "bad-challenger")
_DAY: Final = timedelta(days=1)


@dataclass(frozen=True)
class ScenarioPlan:
    """The timeline of a scenario, in simulated days counted from the simulation's start."""

    scenario: Scenario
    vehicles: int = 60
    seed: int = 42
    #: Days of history the champion is trained on.
    history_days: int = 21
    #: Day the fleet's devices start over-reporting speed (``drift`` only).
    drift_day: int = 14
    speed_bias: float = 1.3
    #: Days of drifted trips with matured claims the retraining waits for.
    drifted_days_to_learn: int = 4
    #: Share of drivers the challenger answers (canary).
    canary_percent: float = 30.0
    #: The decision's score-shift guardrail (PSI of the challenger's probabilities against
    #: the champion's on the same trips). After a drift, the stale champion's scores are
    #: the ones that are off, so a good challenger shifts them: the default 0.5 can reject
    #: the very model the drift called for.
    max_score_psi: float = 1.0
    #: Replayed days after the challenger started before the scenario gives up.
    max_canary_days: int = 16

    @property
    def total_days(self) -> int:
        return self.history_days + self.max_replay_days

    @property
    def max_replay_days(self) -> int:
        """Days simulated after the history: enough for the decision with this seed (drift:
        promoted on the 20th replayed day; bad challenger: rejected on the 3rd). The span
        is part of the story: a fleet simulated over other days draws other trips."""
        return 24 if self.scenario == "drift" else 18

    @property
    def vehicles_per_chunk(self) -> int:
        """Vehicles simulated together. Each chunk draws from its own random stream, so the
        chunking is part of the seed's story too (drift: two chunks of 30 vehicles, about
        2 GB at the peak)."""
        if self.scenario == "drift":
            return max(1, self.vehicles // 2)
        return vehicles_per_chunk_for(self.total_days)


@dataclass
class DayRecord:
    """One replayed day as the story prints it."""

    day: int
    date: str
    trips: int
    challenger_trips: int
    verdict: str
    note: str = ""


@dataclass
class ScenarioResult:
    """What a scenario did, for the printed story and for tests."""

    scenario: Scenario
    champion_before: str
    champion_after: str | None
    challenger: str | None
    decision: str | None
    decision_reasons: list[str] = field(default_factory=list)
    decision_evidence: dict[str, Any] = field(default_factory=dict)
    days: list[DayRecord] = field(default_factory=list)
    drift_flagged_day: int | None = None
    retrain_day: int | None = None
    seconds: float = 0.0


def _simulate_by_day(
    config: SimulationConfig, out: Path, progress: Callable[[str], None]
) -> tuple[Path, Path]:
    """Pings one folder per day (``day=YYYY-MM-DD``), claims in one file."""
    staged = out / "staged"
    incidents: list[pl.DataFrame] = []
    for index, chunk in enumerate(iter_simulation(config)):
        progress(f"simulate vehicles: chunk {index + 1}")
        pings = chunk.pings.with_columns(pl.col("ts").dt.date().alias("_day"))
        for (day,), part in pings.partition_by("_day", as_dict=True).items():
            if day is None:
                # Pings stamped at an impossible time (a clock reset) land with the first
                # day, where cleaning quarantines them.
                day = config.start.date()
            folder = staged / f"day={day}"
            folder.mkdir(parents=True, exist_ok=True)
            write_table(part.drop("_day"), str(folder / f"part-{index:05d}.parquet"), {})
        incidents.append(chunk.incidents)
    claims = out / "incidents.parquet"
    write_table(pl.concat(incidents), str(claims), {})
    return staged, claims


def _land(staged: Path, landing: Path, date: str) -> Path:
    """Move one day's pings from the simulator's output into the raw landing folder:
    new raw data, as an upload or an export job would bring it."""
    source = staged / f"day={date}"
    target = landing / f"day={date}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.exists():
        source.rename(target)
    return target


def _simulation_config(plan: ScenarioPlan) -> SimulationConfig:
    drift = (
        DriftConfig(speed_sensor_bias=plan.speed_bias, speed_sensor_bias_start_day=plan.drift_day)
        if plan.scenario == "drift"
        else DriftConfig()
    )
    return SimulationConfig(
        vehicles=plan.vehicles,
        days=plan.total_days,
        seed=plan.seed,
        vehicles_per_chunk=plan.vehicles_per_chunk,
        drift=drift,
    )


def run_scenario(settings: Settings, console: Console, plan: ScenarioPlan) -> ScenarioResult:
    """Run ``plan`` on ``settings`` (embedded defaults) and print its story."""
    from driverscore.pipelines.decision_run import challenger_evidence, run_decision

    began = time.monotonic()
    decision = settings.decision.model_copy(update={"max_score_psi": plan.max_score_psi})
    settings = settings.model_copy(update={"decision": decision})
    config = _simulation_config(plan)
    root = (settings.home / "demo" / f"scenario-{plan.scenario}-seed{plan.seed}").resolve()
    landing = root / "landing" / "pings"
    registry = open_registry(settings)

    def at(day: int) -> datetime:
        return config.start + day * _DAY

    console.rule(f"[bold]scenario {plan.scenario}: 1. simulate")
    with console.status("simulating the fleet…") as status:
        staged, claims = _simulate_by_day(config, root, status.update)
    drift_text = (
        f"from day {plan.drift_day} ({at(plan.drift_day):%Y-%m-%d}) every device reports "
        f"speed x{plan.speed_bias:g} (a firmware update)"
        if plan.scenario == "drift"
        else "no drift"
    )
    console.print(
        f"{plan.vehicles} vehicles, {plan.total_days} days, seed {plan.seed}; {drift_text}; "
        f"claims: {pl.read_parquet(claims).height:,}, each reported after a delay (median 4 days)"
    )

    console.rule("[bold]2. the champion: trained on the history")
    for day in range(plan.history_days):
        _land(staged, landing, f"{at(day):%Y-%m-%d}")
    with console.status("training…") as status:
        first = run_training(
            settings,
            pings_uri=str(landing),
            incidents_uri=str(claims),
            reference_time=at(plan.history_days),
            progress=status.update,
        )
    _print_training(console, first, at(plan.history_days))
    champion_before = registry.alias_version(CHAMPION)
    if champion_before is None:
        raise RuntimeError("the scenario's first model did not pass the gate")
    result = ScenarioResult(
        scenario=plan.scenario,
        champion_before=champion_before,
        champion_after=None,
        challenger=None,
        decision=None,
    )

    console.rule("[bold]3. replay the days: score, monitor, retrain, canary, decide")
    console.print(
        f"decision rules: {decision.primary_metric} must improve by at least "
        f"{decision.min_effect:g} at {decision.confidence:.0%} confidence on at least "
        f"{decision.min_labelled_trips} labelled paired trips; guardrail: the challenger's "
        f"scores may shift from the champion's up to PSI {decision.max_score_psi:g}"
    )
    retrain_requested: str | None = None
    challenger_since: int | None = None
    table = _day_table()
    last_day = plan.history_days + plan.max_replay_days
    for day in range(plan.history_days, last_day):
        date = f"{at(day):%Y-%m-%d}"
        end_of_day = at(day + 1)
        folder = _land(staged, landing, date)
        policy = registry.rollout_policy()
        scored = run_scoring(
            settings,
            pings_uri=str(folder),
            out_uri=str(root / "scores" / f"{date}.parquet"),
            reference_time=end_of_day,
            policy=policy,
        )
        roles = scored.scores.get_column("model_role") if scored.scores.height else pl.Series([])
        record = DayRecord(
            day=day,
            date=date,
            trips=scored.scores.height,
            challenger_trips=int((roles == "challenger").sum()) if len(roles) else 0,
            verdict="",
        )
        monitored = run_monitor(settings, as_of=end_of_day, window_hours=24)
        record.verdict = monitored.verdict
        if (
            retrain_requested is None
            and challenger_since is None
            and monitored.verdict in settings.triggers.retrain_on_verdicts
        ):
            retrain_requested = monitored.judgement.summary
            result.drift_flagged_day = day
            record.note = f"retraining requested (trigger monitor_{monitored.verdict})"
        retrain_due = _retrain_due(plan, day, result.drift_flagged_day, settings)
        if challenger_since is None and retrain_due:
            # The bad challenger's retraining reads the raw data through a column mapping
            # that declares speed_mps in km/h: the devices send m/s.
            mapping = (
                ColumnMapping(units={"speed_mps": "kmh"})
                if plan.scenario == "bad-challenger"
                else None
            )
            # The days so far, then the retraining, then the days of the canary.
            if table.row_count:
                console.print(table)
            table = _day_table()
            console.print(
                f"[bold]retraining[/] on {date} end ({_trigger_text(plan, retrain_requested)})"
            )
            with console.status("retraining…") as status:
                retrained = run_training(
                    settings,
                    pings_uri=str(landing),
                    incidents_uri=str(claims),
                    reference_time=end_of_day,
                    mapping=mapping,
                    progress=status.update,
                )
            _print_training(console, retrained, end_of_day)
            result.retrain_day = day
            if retrained.registered.alias != CHALLENGER:
                raise RuntimeError("the scenario's retrained model did not become the challenger")
            result.challenger = retrained.registered.version
            challenger_since = day + 1
            registry.set_rollout_policy(
                RolloutPolicy(mode="canary", challenger_percent=plan.canary_percent),
                actor="training-job",
                reason=f"challenger v{result.challenger} passed the gate: canary",
                at=end_of_day,
            )
            record.note = (
                f"challenger v{result.challenger} registered; canary "
                f"{plan.canary_percent:g}% from tomorrow"
            )
        elif challenger_since is not None:
            evidence = challenger_evidence(settings, now=end_of_day)
            record.note = (
                f"evidence: {evidence.paired_trips:,} paired trips, "
                f"{evidence.labelled_trips:,} labelled"
            )
            if evidence.ready:
                outcome = run_decision(settings, now=end_of_day, actor="decision-job")
                record.note += f" -> decision: {outcome.action}"
                if outcome.action in ("promote", "reject"):
                    result.decision = outcome.action
                    result.decision_reasons = list(outcome.reasons)
                    result.decision_evidence = dict(outcome.evidence)
                    table.add_row(*_row(record))
                    result.days.append(record)
                    break
            if day - challenger_since >= plan.max_canary_days:
                record.note += " -> gave up: no decision in time"
        table.add_row(*_row(record))
        result.days.append(record)
    console.print(table)
    result.champion_after = registry.alias_version(CHAMPION)
    result.seconds = time.monotonic() - began
    _print_ending(console, result)
    audit = Table(title="audit log (driverscore models status shows it too)")
    for column in ("at", "actor", "action", "alias", "from", "to", "reason"):
        audit.add_column(column)
    for move in reversed(registry.audit_log(limit=10)):
        audit.add_row(
            f"{move.at:%Y-%m-%d %H:%M}",
            move.actor,
            move.action,
            move.alias,
            move.from_version or "-",
            move.to_version or "-",
            move.reason[:70],
        )
    console.print(audit)
    return result


def _retrain_due(plan: ScenarioPlan, day: int, flagged: int | None, settings: Settings) -> bool:
    """Whether the requested retraining runs at the end of ``day``.

    Training learns from matured trips only, and its newest quarter is the holdout: a run
    right after the drift was flagged would learn nothing of it. The drift's retraining
    runs once ``drifted_days_to_learn`` drifted days have matured claims inside its
    training split; the bad challenger's is the weekly retraining on the first replayed
    day.
    """
    if plan.scenario == "bad-challenger":
        return day == plan.history_days
    if flagged is None:
        return False
    maturity = settings.training.label_maturity_days
    holdout = settings.training.validation_fraction
    matured_until = day + 1 - maturity
    train_until = matured_until * (1 - holdout)
    return train_until - plan.drift_day >= plan.drifted_days_to_learn


def _trigger_text(plan: ScenarioPlan, reason: str | None) -> str:
    if plan.scenario == "bad-challenger":
        return (
            "trigger schedule: the weekly retraining, misconfigured with a column mapping "
            "that reads speed_mps as km/h while the devices send m/s"
        )
    return f"trigger monitor_drift: {reason}"


def _day_table() -> Table:
    table = Table(title="replayed days", show_lines=False)
    for column, justify in (
        ("day", "right"),
        ("date", "left"),
        ("trips", "right"),
        ("by challenger", "right"),
        ("monitor", "left"),
        ("what happened", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    return table


def _row(record: DayRecord) -> tuple[str, ...]:
    colour = {"ok": "green", "warn": "yellow"}.get(record.verdict, "red")
    return (
        str(record.day),
        record.date,
        f"{record.trips:,}",
        f"{record.challenger_trips:,}",
        f"[{colour}]{record.verdict}[/]",
        record.note,
    )


def _print_training(console: Console, result: TrainingRunResult, reference: datetime) -> None:
    gate = result.candidate.gate
    labels = result.data.label_quality
    champion = (
        f"; champion on the same holdout ROC-AUC {gate.champion.roc_auc or 0:.3f}, "
        f"Brier {gate.champion.brier:.4f}"
        if gate.champion is not None
        else ""
    )
    console.print(
        f"trained at {reference:%Y-%m-%d} on {result.data.train.height:,} matured trips "
        f"(claims reported by then, incident rate {labels['incident_rate']:.2%}), validated "
        f"on the {result.data.holdout.height:,} newest: ROC-AUC "
        f"{gate.candidate.roc_auc or 0:.3f}, Brier {gate.candidate.brier:.4f}{champion}"
    )
    registered = result.registered
    verdict = (
        f"[green]gate passed[/]: v{registered.version} is [bold]{registered.alias}[/]"
        if gate.passed
        else f"[red]gate failed[/] ({'; '.join(gate.failures)}): v{registered.version} kept "
        "without an alias"
    )
    console.print(verdict)


def _evidence_table(evidence: dict[str, Any]) -> Table | None:
    """Champion against challenger on the same labelled trips, one row per metric."""
    metrics = [m for m in ("roc_auc", "log_loss", "brier") if f"{m}.champion" in evidence]
    if not metrics:
        return None
    table = Table(title="on the same trips (paired, matured claims)")
    table.add_column("metric")
    for column in ("champion", "challenger", "improvement", "95% bounds", "p"):
        table.add_column(column, justify="right")
    for metric in metrics:

        def value(key: str, metric: str = metric) -> float:
            return float(evidence.get(f"{metric}.{key}", float("nan")))

        table.add_row(
            metric,
            f"{value('champion'):.4f}",
            f"{value('challenger'):.4f}",
            f"{value('improvement'):+.4f}",
            f"{value('lower'):+.4f} .. {value('upper'):+.4f}",
            f"{value('p_value'):.4f}",
        )
    return table


def _print_ending(console: Console, result: ScenarioResult) -> None:
    evidence = result.decision_evidence
    table = _evidence_table(evidence)
    if table is not None:
        console.print(table)
    counts = ", ".join(
        f"{key.replace('_', ' ')} {evidence[key]:,}"
        for key in ("paired_trips", "labelled_trips", "positive_labels")
        if isinstance(evidence.get(key), int)
    )
    lines = [
        f"champion before   v{result.champion_before}",
        f"challenger        v{result.challenger or '-'}",
        f"decision          {result.decision or 'none'}",
        f"champion after    v{result.champion_after or '-'}",
    ]
    if result.drift_flagged_day is not None:
        lines.append(f"drift flagged     day {result.drift_flagged_day}")
    if result.retrain_day is not None:
        lines.append(f"retrained         day {result.retrain_day}")
    if counts:
        lines.append(f"evidence          {counts}")
    lines += [f"why               {reason}" for reason in result.decision_reasons]
    lines.append(f"took              {result.seconds:.0f} s")
    console.print(Panel.fit("\n".join(lines), title=f"scenario {result.scenario}"))
