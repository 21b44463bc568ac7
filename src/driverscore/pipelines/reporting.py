"""Terminal summaries of training and scoring runs (Rich tables)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.table import Table

from driverscore.adapters.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    open_registry,
    policy_label,
)
from driverscore.pipelines.decision_run import challenger_evidence
from driverscore.pipelines.monitoring_run import MonitoringRunResult
from driverscore.pipelines.scoring_run import ScoringRunResult
from driverscore.pipelines.steps import PreparedDataset
from driverscore.pipelines.training_run import TrainingRunResult
from driverscore.settings import Settings
from driverscore.training.gate import SliceMetrics


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def metrics_table(title: str, overall: SliceMetrics, per_fleet: dict[str, SliceMetrics]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("slice", "trips", "incident rate", "ROC-AUC", "PR-AUC", "F1", "Brier", "ECE"):
        table.add_column(column, justify="left" if column == "slice" else "right")
    rows = [("all", overall), *sorted(per_fleet.items())]
    for name, m in rows:
        table.add_row(
            name,
            f"{m.n:,}",
            f"{m.positive_rate:.2%}",
            _fmt(m.roc_auc),
            _fmt(m.pr_auc),
            _fmt(m.f1),
            _fmt(m.brier, 4),
            _fmt(m.calibration_error, 4),
        )
    return table


def print_training(console: Console, result: TrainingRunResult) -> None:
    quality = result.prepared.quality
    per_rule = ", ".join(f"{k} {v:,}" for k, v in quality["quarantined_per_rule"].items())
    console.print(
        f"[bold]data[/]: {quality['rows_in']:,} pings in, {quality['rows_kept']:,} kept, "
        f"{quality['rows_quarantined']:,} quarantined ({per_rule or 'none'}); "
        f"{quality['trips']:,} trips"
    )
    data = result.data
    labels = data.label_quality
    rejected = ", ".join(f"{k} {v:,}" for k, v in labels["labels_rejected"].items())
    console.print(
        f"[bold]labels[/]: {labels['labels_in']:,} claims in, {labels['labels_kept']:,} kept, "
        f"{labels['labels_duplicate']:,} duplicates, rejected: {rejected or 'none'}; "
        f"incident rate {labels['incident_rate']:.2%} of {labels['mature_trips']:,} mature trips"
    )
    console.print(
        f"[bold]training[/]: {data.train.height:,} older trips, "
        f"validated on {data.holdout.height:,} newer trips"
    )
    gate = result.candidate.gate
    console.print(
        metrics_table(
            f"holdout metrics (F1 at threshold {gate.candidate.threshold:.4f})",
            gate.candidate,
            gate.candidate.per_fleet,
        )
    )
    if gate.champion is not None:
        console.print(
            f"champion on the same holdout: ROC-AUC {_fmt(gate.champion.roc_auc)}, "
            f"Brier {_fmt(gate.champion.brier, 4)}"
        )
    registered = result.registered
    if gate.passed:
        console.print(
            f"[green]gate passed[/]: {registered.model_name} v{registered.version} "
            f"is now [bold]{registered.alias}[/]"
        )
    else:
        console.print(
            f"[red]gate failed[/]: {registered.model_name} v{registered.version} recorded "
            "without an alias"
        )
        for failure in gate.failures:
            console.print(f"  - {failure}")
    _print_quarantine(console, result.prepared)
    console.print(f"run manifest: {result.manifest_uri}")
    console.print(f"quality report: {result.prepared.quality_uri}")


def _print_quarantine(console: Console, prepared: PreparedDataset) -> None:
    """Where the set-aside pings went: nothing is dropped, so the summary says where it is."""
    console.print(
        f"quarantine: {prepared.quarantine.uri} "
        f"({prepared.quarantine.rows:,} rows, each with its reason)",
        soft_wrap=True,
    )


def score_distribution(scores: pl.DataFrame) -> Table:
    table = Table(title="trip scores per fleet", title_justify="left")
    for column in ("fleet", "trips", "km", "mean", "p10", "low", "moderate", "elevated", "high"):
        table.add_column(column, justify="left" if column == "fleet" else "right")
    summary = (
        scores.group_by("fleet_id")
        .agg(
            pl.len().alias("trips"),
            pl.col("distance_km").sum().alias("km"),
            pl.col("score").mean().alias("mean"),
            pl.col("score").quantile(0.1).alias("p10"),
            *[
                (pl.col("risk_band") == band).mean().alias(band)
                for band in ("low", "moderate", "elevated", "high")
            ],
        )
        .sort("fleet_id")
    )
    for row in summary.iter_rows(named=True):
        table.add_row(
            str(row["fleet_id"]),
            f"{row['trips']:,}",
            f"{row['km']:,.0f}",
            f"{row['mean']:.1f}",
            f"{row['p10']:.1f}",
            *[f"{row[band]:.0%}" for band in ("low", "moderate", "elevated", "high")],
        )
    return table


def riskiest_trips(scores: pl.DataFrame, limit: int = 5) -> Table:
    table = Table(title=f"riskiest {limit} trips", title_justify="left")
    for column in ("trip", "driver", "km", "score", "band", "reasons"):
        table.add_column(column, justify="right" if column in ("km", "score") else "left")
    for row in scores.sort("score").head(limit).iter_rows(named=True):
        table.add_row(
            str(row["trip_id"]),
            str(row["driver_id"]),
            f"{row['distance_km']:.1f}",
            f"{row['score']:.0f}",
            str(row["risk_band"]),
            "\n".join(row["reasons"]) or "—",
        )
    return table


def print_scores(console: Console, result: ScoringRunResult) -> None:
    scores = result.scores
    quality = result.prepared.quality
    console.print(
        f"[bold]scored[/] {scores.height:,} trips from {quality['rows_in']:,} pings "
        f"({quality['rows_quarantined']:,} set aside) → {result.out_uri}"
    )
    if scores.height:
        first = scores.row(0, named=True)
        console.print(
            f"model: {first['model_name']} v{first['model_version']} ({first['model_role']})"
        )
        console.print(score_distribution(scores))
        console.print(riskiest_trips(scores))
    if result.set_aside.height:
        reasons = result.set_aside["reason"].value_counts(sort=True).iter_rows()
        console.print(
            f"[bold yellow]{result.set_aside.height:,} trips not scored[/] "
            f"({', '.join(f'{r}: {n}' for r, n in reasons)}) → {result.set_aside_uri}"
        )
    console.print(f"{result.decisions:,} decisions written to the prediction log")
    if result.stored is not None:
        console.print(
            f"score store: {result.stored.scores:,} new or newer trip records, "
            f"{result.stored.alerts:,} alerts, {result.stored.routes:,} routes → "
            f"{result.store_path} (query it: driverscore scores --help)"
        )
    _print_quarantine(console, result.prepared)
    console.print(f"run manifest: {result.manifest_uri}")


def print_models(console: Console, settings: Settings) -> None:
    registry = open_registry(settings)
    versions = registry.list_versions()
    table = Table(title=f"{settings.model_name} @ {settings.resolved_tracking_uri}")
    for column in ("version", "alias", "gate", "ROC-AUC", "Brier", "created", "code"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            v.version,
            ", ".join(v.aliases) or "—",
            v.gate_status,
            _fmt(v.metrics.get("holdout.roc_auc")),
            _fmt(v.metrics.get("holdout.brier"), 4),
            v.created_at,
            v.code_version,
        )
    console.print(table)


def print_model_status(
    console: Console, settings: Settings, *, now: datetime | None = None, limit: int = 10
) -> None:
    """Who serves, the split, what the running challenger has shown, and the last moves."""
    registry = open_registry(settings, audit=False)
    console.print(f"[bold]{settings.model_name}[/] @ {settings.resolved_tracking_uri}")
    for alias in (CHAMPION, CHALLENGER, PREVIOUS):
        console.print(f"  {alias:<11} {registry.alias_version(alias) or '—'}")
    console.print(f"  rollout     {policy_label(registry.rollout_policy())}")
    evidence = challenger_evidence(settings, now=now)
    if evidence.challenger_version is not None and evidence.verdict is not None:
        verdict = evidence.verdict
        since = f"{evidence.started_at:%Y-%m-%d %H:%M}" if evidence.started_at else "—"
        console.print(
            f"evidence for challenger {evidence.challenger_version} (since {since} UTC): "
            f"{evidence.paired_trips:,} paired trips, {evidence.labelled_trips:,} labelled "
            f"({evidence.positive_labels:,} incidents)"
        )
        for key in ("roc_auc", "log_loss", "brier"):
            if f"{key}.improvement" in verdict.evidence:
                e = verdict.evidence
                console.print(
                    f"  {key:<9} champion {e[f'{key}.champion']:.4f}  challenger "
                    f"{e[f'{key}.challenger']:.4f}  improvement {e[f'{key}.improvement']:+.4f} "
                    f"[{e[f'{key}.lower']:+.4f}, {e[f'{key}.upper']:+.4f}]"
                )
        console.print(f"  would now: [bold]{verdict.action}[/] — {'; '.join(verdict.reasons)}")
    moves = registry.audit_log(limit)
    table = Table(title="latest alias moves", title_justify="left")
    for column in ("at (UTC)", "action", "alias", "from", "to", "by", "reason"):
        table.add_column(column)
    for move in moves:
        table.add_row(
            f"{move.at:%Y-%m-%d %H:%M}",
            move.action,
            move.alias,
            move.from_version or "—",
            move.to_version or "—",
            move.actor,
            move.reason,
        )
    console.print(table if moves else "no alias moves recorded yet")


def print_aggregates(console: Console, table: pl.DataFrame, by: str, limit: int = 15) -> None:
    """The lowest-scoring groups first: they are the ones to coach or review."""
    if table.height == 0:
        console.print("no trips in the window")
        return
    window = f"{table['window_start'][0]:%Y-%m-%d %H:%M} → {table['window_end'][0]:%Y-%m-%d %H:%M}"
    out = Table(title=f"{by} scores, distance-weighted ({window} UTC)", title_justify="left")
    for column in (by, "score", "band", "trips", "km"):
        out.add_column(column, justify="left" if column in (by, "band") else "right")
    for row in table.sort("score").head(limit).iter_rows(named=True):
        out.add_row(
            str(row[f"{by}_id"]),
            f"{row['score']:.1f}",
            str(row["risk_band"]),
            f"{row['trip_count']:,}",
            f"{row['distance_km']:,.1f}",
        )
    console.print(out)
    if table.height > limit:
        console.print(f"… and {table.height - limit:,} more")


def print_monitoring(console: Console, result: MonitoringRunResult, report: Path | None) -> None:
    """The verdict line, the columns that drifted or warned, performance, where it went."""
    judgement = result.judgement
    colour = {"ok": "green", "warn": "yellow", "drift": "red", "degraded": "magenta"}
    console.print(f"[bold {colour[judgement.verdict]}]{judgement.summary}[/]", highlight=False)
    table = Table(title="columns off their reference", title_justify="left")
    for column in ("column", "status", "PSI", "KS", "W / std", "JS", "trips"):
        table.add_column(column, justify="left" if column in ("column", "status") else "right")
    for f in judgement.features:
        if f.status == "ok":
            continue
        s = f.statistics
        table.add_row(
            f.column,
            f.status,
            _fmt(s.get("psi")),
            _fmt(s.get("ks")),
            _fmt(s.get("wasserstein_norm")),
            _fmt(s.get("js")),
            f"{f.current_trips:,}",
        )
    if table.row_count:
        console.print(table)
    estimated = judgement.performance.get("estimated") or {}
    realised = judgement.performance.get("realised") or {}
    console.print(
        f"[bold]performance[/]: estimated ROC-AUC {_fmt(estimated.get('roc_auc'))} on "
        f"{estimated.get('n', 0):,} trips; realised {_fmt(realised.get('roc_auc'))} on "
        f"{realised.get('n', 0) or 0:,} matured trips"
    )
    for alarm in judgement.alarms[1:]:
        console.print(f"  · {alarm}", highlight=False)
    console.print(f"[bold]result[/]: {result.result_uri}")
    console.print(f"[bold]report[/]: {report or result.report_uri}")
