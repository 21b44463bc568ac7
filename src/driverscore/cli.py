"""The `driverscore` command line: parse, build settings once, call a pipeline, print."""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from driverscore.domain.mapping import ColumnMapping
from driverscore.errors import ConfigError, DriverscoreError, GateFailedError
from driverscore.settings import Settings, load_settings

if TYPE_CHECKING:
    from driverscore.adapters.superset.local import LocalSuperset
    from driverscore.pipelines.spark_steps import Engine

#: Demo fleet size: large enough for a stable holdout (hundreds of trips, dozens of claims),
#: small enough to run in a few minutes on a laptop.
DEMO_VEHICLES = 150
DEMO_HISTORY_DAYS = 28
DEMO_SEED = 42

app = typer.Typer(
    name="driverscore",
    help="Vehicle telemetry to a Driver Score: simulate, import, train, score.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


#: Exit codes (docs/operations.md): 2 is also what Typer uses for a wrong option.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE_FAILED = 3


def _settings() -> Settings:
    return load_settings()


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{option}: '{value}' is not an ISO-8601 time — use e.g. 2026-01-05T00:00:00Z"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _load_mapping(path: Path | None) -> ColumnMapping | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the mapping file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: the mapping file is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
            f"offset {exc.start}) — save it as UTF-8"
        ) from None
    return ColumnMapping.from_yaml_text(text, where=str(path))


def _engine(value: str) -> Engine:
    from driverscore.pipelines.spark_steps import ENGINES

    for engine in ENGINES:
        if value == engine:
            return engine
    raise ConfigError(f"--engine: '{value}' is neither embedded nor spark")


@app.command()
def simulate(
    out: Annotated[str, typer.Option(help="Output folder or s3:// URI.")],
    vehicles: Annotated[int, typer.Option(min=1, help="Number of vehicles.")] = 50,
    days: Annotated[int, typer.Option(min=1, help="Days of driving.")] = 7,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same data.")] = 0,
    start: Annotated[str | None, typer.Option(help="First day, UTC ISO-8601.")] = None,
    clean: Annotated[bool, typer.Option(help="Inject no dirty rows.")] = False,
    new_fleet_vehicles: Annotated[
        int, typer.Option(help="Drift: vehicles of a riskier new fleet.")
    ] = 0,
    speed_sensor_bias: Annotated[
        float, typer.Option(help="Drift: multiplier on reported speed.")
    ] = 1.0,
    speed_unit_kmh_share: Annotated[
        float, typer.Option(help="Drift: share of vehicles reporting km/h as m/s.")
    ] = 0.0,
    seasonal_speed_factor: Annotated[
        float, typer.Option(help="Drift: multiplier on target speeds.")
    ] = 1.0,
) -> None:
    """Simulate a fleet: 1 Hz pings, claims (labels) with reporting delays, driver truth."""
    from driverscore.pipelines.simulation_run import write_simulation
    from driverscore.simulation import (
        DirtConfig,
        DriftConfig,
        SimulationConfig,
        vehicles_per_chunk_for,
    )

    settings = _settings()
    start_time = _parse_time(start, "--start")
    config = SimulationConfig(
        vehicles=vehicles,
        days=days,
        seed=seed,
        start=start_time or SimulationConfig().start,
        vehicles_per_chunk=vehicles_per_chunk_for(days),
        dirt=DirtConfig.clean() if clean else DirtConfig(),
        drift=DriftConfig(
            new_fleet_vehicles=new_fleet_vehicles,
            speed_sensor_bias=speed_sensor_bias,
            speed_unit_kmh_share=speed_unit_kmh_share,
            seasonal_speed_factor=seasonal_speed_factor,
        ),
    )
    console = Console()
    with console.status("simulating…") as status:
        result = write_simulation(
            config, out, settings.storage_options(), progress=lambda m: status.update(m)
        )
    console.print(
        f"[green]simulated[/] {result.pings:,} pings, {result.trips:,} trips, "
        f"{result.incidents:,} incidents"
    )
    console.print(f"  pings      {result.pings_uri}")
    console.print(f"  labels     {result.incidents_uri}")
    console.print(f"  drivers    {result.drivers_uri}")


@app.command("import")
def import_(
    src: Annotated[
        str, typer.Argument(help="CSV, Parquet or JSON Lines: a file, folder or s3:// URI.")
    ],
    out: Annotated[str, typer.Option(help="Destination file or folder (local or s3://).")],
    mapping: Annotated[
        Path | None, typer.Option(help="YAML column/unit mapping to the canonical ping schema.")
    ] = None,
) -> None:
    """Convert telemetry in another layout or units to canonical pings."""
    from driverscore.pipelines.importing import import_telemetry

    settings = _settings()
    result = import_telemetry(src, _load_mapping(mapping), out, settings.storage_options())
    console = Console()
    console.print(
        f"[green]imported[/] {result.rows_out:,} of {result.rows_in:,} rows → {result.dest}"
    )
    if result.rows_rejected:
        console.print(
            f"[yellow]{result.rows_rejected:,} rows rejected[/] with their reasons → "
            f"{result.rejects_uri}"
        )


@app.command()
def train(
    pings: Annotated[str, typer.Option(help="Ping files: a file, folder or s3:// URI.")],
    labels: Annotated[
        str, typer.Option(help="Incident (claims) file: vehicle_id, incident_ts, reported_at.")
    ],
    mapping: Annotated[Path | None, typer.Option(help="YAML mapping for the ping files.")] = None,
    reference_time: Annotated[
        str | None, typer.Option(help="Training 'now' (UTC ISO-8601); default: now.")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="Where to prepare trips: embedded (this process) or spark.")
    ] = "embedded",
) -> None:
    """Clean, cut trips, compute features, train, validate and register a candidate model."""
    from driverscore.pipelines.reporting import print_training
    from driverscore.pipelines.training_run import run_training

    settings = _settings()
    console = Console()
    with console.status("training…") as status:
        result = run_training(
            settings,
            pings_uri=pings,
            incidents_uri=labels,
            mapping=_load_mapping(mapping),
            reference_time=_parse_time(reference_time, "--reference-time") or datetime.now(UTC),
            progress=lambda m: status.update(m),
            engine=_engine(engine),
        )
    print_training(console, result)
    if not result.candidate.gate.passed:
        # A scheduler or script sees this exit code (3), distinct from an error (1).
        registered = result.registered
        raise GateFailedError(
            f"{registered.model_name} v{registered.version} failed the validation gate "
            f"({len(result.candidate.gate.failures)} rule(s) above); it is recorded without "
            "an alias and does not serve"
        )


@app.command()
def score(
    pings: Annotated[str, typer.Argument(help="Ping file or folder (local or s3://).")],
    out: Annotated[str, typer.Option(help="Output file: .parquet, .csv or .jsonl.")],
    mapping: Annotated[Path | None, typer.Option(help="YAML mapping for the ping file.")] = None,
    alias: Annotated[str, typer.Option(help="Registry alias of the model to use.")] = "champion",
    rollout: Annotated[
        Path | None,
        typer.Option(
            help=(
                "JSON rollout policy (as the service's rollout file); default: the policy "
                "stored in the registry (else the service's rollout settings), so batch "
                "splits traffic as the service does."
            )
        ),
    ] = None,
    store: Annotated[
        bool, typer.Option(help="Also write the records to the score store (<home>/scores.duckdb).")
    ] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="Where to prepare and score trips: embedded (this process) or spark "
            "(the executors, with the models' ONNX exports)."
        ),
    ] = "embedded",
) -> None:
    """Score every trip in a ping file with the registered model: one row per trip."""
    from driverscore.pipelines.reporting import print_scores
    from driverscore.pipelines.scoring_run import rollout_policy, run_scoring

    settings = _settings()
    console = Console()
    policy = rollout_policy(settings, rollout)
    with console.status("scoring…") as status:
        result = run_scoring(
            settings,
            pings_uri=pings,
            out_uri=out,
            mapping=_load_mapping(mapping),
            alias=alias,
            policy=policy,
            reference_time=datetime.now(UTC),
            progress=lambda m: status.update(m),
            store_scores=store,
            engine=_engine(engine),
        )
    print_scores(console, result)


@app.command()
def aggregate(
    scores: Annotated[str, typer.Argument(help="Trip score records (.parquet, .csv, .jsonl).")],
    by: Annotated[str, typer.Option(help="driver, vehicle, fleet or client.")] = "driver",
    window_days: Annotated[float, typer.Option(min=0.001, help="Rolling window (days).")] = 30.0,
    as_of: Annotated[
        str | None, typer.Option(help="Window end, UTC ISO-8601; default: the newest trip end.")
    ] = None,
    out: Annotated[str | None, typer.Option(help="Write the table here too.")] = None,
) -> None:
    """Distance-weighted driver, vehicle, fleet or client scores over a rolling window."""
    from driverscore.pipelines.aggregation import run_aggregation
    from driverscore.pipelines.reporting import print_aggregates

    settings = _settings()
    table = run_aggregation(
        settings,
        scores_uri=scores,
        by=by,
        window_days=window_days,
        as_of=_parse_time(as_of, "--as-of"),
        out_uri=out,
    )
    print_aggregates(Console(), table, by)


@app.command()
def monitor(
    as_of: Annotated[
        str | None,
        typer.Option(
            help="The window ends at the start of this time's UTC hour (ISO-8601); default: now."
        ),
    ] = None,
    window_hours: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Window length in whole hours (rounded up); default: monitoring.window_hours.",
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(help="Claims file for realised performance; default: the stored labels."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Also write the HTML report to this file.")
    ] = None,
) -> None:
    """Drift, data quality and performance of the champion over a window of scored trips."""
    from driverscore.pipelines.monitoring_run import run_monitor
    from driverscore.pipelines.reporting import print_monitoring

    settings = _settings()
    console = Console()
    with console.status("monitoring…") as status:
        result = run_monitor(
            settings,
            as_of=_parse_time(as_of, "--as-of"),
            window_hours=window_hours,
            labels_uri=labels,
            progress=lambda m: status.update(m),
        )
    if report is not None:
        try:
            report.write_text(result.report_html, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--report {report}: cannot write ({exc.strerror})") from None
    print_monitoring(console, result, report)


@app.command()
def demo(
    vehicles: Annotated[int, typer.Option(min=10, help="Vehicles to simulate.")] = DEMO_VEHICLES,
    days: Annotated[
        int, typer.Option(min=14, help="Days of history before the fresh day.")
    ] = DEMO_HISTORY_DAYS,
    seed: Annotated[int, typer.Option(help="Random seed.")] = DEMO_SEED,
    scenario: Annotated[
        str | None,
        typer.Option(
            help=(
                "Replay the closed loop day by day instead: 'drift' (the fleet shifts, the "
                "monitor flags it, a retrained challenger is promoted) or 'bad-challenger' "
                "(a weaker challenger is rejected). Uses its own fleet; --vehicles, --days "
                "and --seed apply to the plain demo."
            ),
        ),
    ] = None,
) -> None:
    """Simulate → train → register → score a fresh day, on embedded defaults."""
    if scenario is not None:
        from driverscore.pipelines.demo_scenarios import SCENARIOS, ScenarioPlan, run_scenario

        if scenario not in SCENARIOS:
            raise ConfigError(
                f"--scenario {scenario!r} is not a scenario; use one of {', '.join(SCENARIOS)}"
            )
        run_scenario(_settings(), Console(), ScenarioPlan(scenario))  # type: ignore[arg-type]
        return
    from driverscore.pipelines.demo import run_demo

    run_demo(_settings(), Console(), vehicles=vehicles, days=days, seed=seed)


models_app = typer.Typer(
    help=(
        "Registered versions, the champion/challenger state and its audit log; promote, "
        "reject or roll back by hand (see docs/rollout.md). Without a command: list."
    ),
    invoke_without_command=True,
)
app.add_typer(models_app, name="models")


def _actor(actor: str | None) -> str:
    return actor or os.environ.get("USER") or "operator"


ActorOption = Annotated[
    str | None, typer.Option(help="Who moves it, for the audit log (default: $USER).")
]
ReasonOption = Annotated[str, typer.Option(help="Why, for the audit log.")]


@models_app.callback()
def models(ctx: typer.Context) -> None:
    """List registered model versions, their aliases, gate status and key metrics."""
    if ctx.invoked_subcommand is None:
        models_list()


@models_app.command("list")
def models_list() -> None:
    """List registered model versions, their aliases, gate status and key metrics."""
    from driverscore.pipelines.reporting import print_models

    print_models(Console(), _settings())


@models_app.command("status")
def models_status(
    now: Annotated[
        str | None,
        typer.Option(help="Judge the evidence as of this UTC time (ISO-8601); default: now."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most audit log entries shown.")] = 10,
) -> None:
    """Champion, challenger, previous, rollout share, the challenger's evidence so far and
    the latest alias moves."""
    from driverscore.pipelines.reporting import print_model_status

    print_model_status(Console(), _settings(), now=_parse_time(now, "--now"), limit=limit)


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="The challenger's version.")],
    reason: ReasonOption,
    actor: ActorOption = None,
) -> None:
    """Make the challenger VERSION champion (the old champion is kept as previous)."""
    from driverscore.adapters.registry import open_registry
    from driverscore.pipelines.decision_run import promote

    move = promote(open_registry(_settings()), version, actor=_actor(actor), reason=reason)
    typer.echo(move.summary())


@models_app.command("reject")
def models_reject(
    version: Annotated[str, typer.Argument(help="The challenger's version.")],
    reason: ReasonOption,
    actor: ActorOption = None,
) -> None:
    """Remove the challenger alias from VERSION; the champion stays."""
    from driverscore.adapters.registry import open_registry
    from driverscore.pipelines.decision_run import reject

    move = reject(open_registry(_settings()), version, actor=_actor(actor), reason=reason)
    typer.echo(move.summary())


@models_app.command("rollback")
def models_rollback(
    version: Annotated[str, typer.Argument(help="The champion's version, to be replaced.")],
    reason: ReasonOption,
    actor: ActorOption = None,
) -> None:
    """Move champion from VERSION back to the previous champion."""
    from driverscore.adapters.registry import open_registry
    from driverscore.pipelines.decision_run import rollback

    move = rollback(
        open_registry(_settings()), actor=_actor(actor), reason=reason, expect_champion=version
    )
    typer.echo(move.summary())


@models_app.command("rollout")
def models_rollout(
    mode: Annotated[str, typer.Option(help="champion, canary (with --percent) or shadow.")],
    reason: ReasonOption,
    percent: Annotated[
        float, typer.Option(min=0, max=100, help="Canary: share of drivers on the challenger.")
    ] = 0.0,
    actor: ActorOption = None,
) -> None:
    """Set the rollout policy in the registry: every service and stream replica follows
    it within one poll interval."""
    from pydantic import ValidationError

    from driverscore.adapters.registry import open_registry
    from driverscore.domain.rollout import RolloutPolicy

    registry = open_registry(_settings())
    try:
        policy = registry.rollout_policy().model_copy(
            update={"mode": mode, "challenger_percent": percent if mode == "canary" else 0.0}
        )
        policy = RolloutPolicy.model_validate(policy.model_dump())
    except ValidationError:
        raise ConfigError(
            f"--mode {mode!r} is not a rollout mode — use champion, canary or shadow"
        ) from None
    move = registry.set_rollout_policy(policy, actor=_actor(actor), reason=reason)
    typer.echo(move.summary())


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default: settings).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default: settings, 8080).")] = None,
) -> None:
    """Serve scores over HTTP (REST, SageMaker contract) and the web dashboard (/dashboard)."""
    from driverscore.pipelines.dashboard_run import mount_dashboard
    from driverscore.services.api.runner import run_service

    settings = _settings()
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        service = settings.service.model_copy(update=overrides)
        settings = settings.model_copy(update={"service": service})
    run_service(settings, lambda app: mount_dashboard(app, settings))


@app.command()
def dashboard(
    host: Annotated[str | None, typer.Option(help="Interface to bind (default: settings).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default: settings, 8080).")] = None,
    engine: Annotated[
        str, typer.Option(help="Score store to read: duckdb (the home's file) or druid.")
    ] = "duckdb",
) -> None:
    """Serve the web dashboard alone (fleet overview, alerts, drivers, vehicles, model)."""
    from driverscore.pipelines.dashboard_run import run_dashboard

    if engine not in ("duckdb", "druid"):
        raise ConfigError(f"--engine {engine!r}: use duckdb or druid")
    settings = _settings()
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        service = settings.service.model_copy(update=overrides)
        settings = settings.model_copy(update={"service": service})
    run_dashboard(
        settings,
        engine,  # type: ignore[arg-type]
        announce=lambda url: typer.echo(f"dashboard: {url} ({engine})"),
    )


@app.command("export-model")
def export_model(
    dest: Annotated[
        Path,
        typer.Argument(
            help="New or empty directory, or a .tar.gz file (SageMaker's model.tar.gz)."
        ),
    ],
    alias: Annotated[str, typer.Option(help="Registry alias of the version.")] = "champion",
    version: Annotated[
        str | None, typer.Option("--version", help="Version number (instead of --alias).")
    ] = None,
) -> None:
    """Export a registered version (ONNX, model card, lineage) for `serve` to read from a
    directory: DRIVERSCORE_SERVICE__MODEL_DIR, /opt/ml/model on SageMaker."""
    from driverscore.adapters.model_dir import export_model as export
    from driverscore.adapters.registry import open_registry

    exported = export(open_registry(_settings()), dest, alias=alias, version=version)
    typer.echo(
        f"exported {exported.model_name} v{exported.version} → {dest} "
        f"(onnx sha256 {exported.onnx_sha256[:12]}…)"
    )


@app.command()
def scores(
    query: Annotated[
        str,
        typer.Argument(
            help=(
                "group_scores, score_histogram, daily_trend, worst_drivers, latest_alerts, "
                "band_shares, model_versions, trip_history or trip_behaviours."
            )
        ),
    ],
    days: Annotated[
        float, typer.Option(min=0.001, help="Period: this many days up to --end.")
    ] = 30.0,
    start: Annotated[str | None, typer.Option(help="Period start, UTC ISO-8601.")] = None,
    end: Annotated[
        str | None, typer.Option(help="Period end, UTC ISO-8601; default: the newest trip end.")
    ] = None,
    by: Annotated[
        str, typer.Option(help="group_scores, score_histogram: driver, vehicle, fleet, client.")
    ] = "fleet",
    driver: Annotated[
        str | None, typer.Option(help="trip_history, trip_behaviours of this driver.")
    ] = None,
    vehicle: Annotated[
        str | None, typer.Option(help="trip_history, trip_behaviours of this vehicle.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most rows (alerts, drivers, trips).")] = 20,
    min_trips: Annotated[
        int, typer.Option(min=1, help="worst_drivers: drivers with fewer trips are left out.")
    ] = 1,
    engine: Annotated[
        str,
        typer.Option(
            help="duckdb (<home>/scores.duckdb) or druid (DRIVERSCORE_STORE__DRUID__URL)."
        ),
    ] = "duckdb",
    output: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Query the score store: trips counted once each (their latest record), see docs/store.md."""
    from driverscore.pipelines.store_queries import print_answer, run_store_query

    if engine not in ("duckdb", "druid"):
        raise ConfigError(f"--engine: '{engine}' is neither duckdb nor druid")
    if output not in ("table", "csv", "json"):
        raise ConfigError(f"--format: '{output}' is not table, csv or json")
    answer = run_store_query(
        _settings(),
        query,
        engine=engine,  # type: ignore[arg-type]
        days=days,
        start=_parse_time(start, "--start"),
        end=_parse_time(end, "--end"),
        level=by,
        limit=limit,
        min_trips=min_trips,
        driver=driver,
        vehicle=vehicle,
    )
    print_answer(Console(), answer, output)


@app.command()
def version() -> None:
    """Print the driverscore version."""
    import driverscore

    typer.echo(driverscore.__version__)


kafka_app = typer.Typer(
    help="Local Kafka broker, topics and ping replay (see docs/streaming.md).",
    no_args_is_help=True,
)
app.add_typer(kafka_app, name="kafka")


@kafka_app.command("up")
def kafka_up() -> None:
    """Start a single-node Kafka under <home>/kafka; a restart keeps its data and address."""
    from driverscore.adapters.kafka.broker import (
        BOOTSTRAP_SETTING,
        LocalKafkaBroker,
        broker_state_dir,
        resolve_bootstrap,
    )

    settings = _settings()
    state_dir = broker_state_dir(settings.home)
    bootstrap = LocalKafkaBroker(state_dir).up()
    typer.echo(bootstrap)
    address = resolve_bootstrap(settings)
    if address.origin == "setting" and address.bootstrap_servers != bootstrap:
        err_console.print(
            f"note: {BOOTSTRAP_SETTING}={address.bootstrap_servers} is set and wins over this "
            f"broker: unset it to use {bootstrap}",
            highlight=False,
        )
    else:
        err_console.print(
            f"commands with home {settings.home} find it (recorded in {state_dir}); "
            f"elsewhere: export {BOOTSTRAP_SETTING}={bootstrap}",
            highlight=False,
        )


@kafka_app.command("down")
def kafka_down() -> None:
    """Stop the local Kafka started by `driverscore kafka up` (its data and address are kept)."""
    from driverscore.adapters.kafka.broker import LocalKafkaBroker, broker_state_dir

    LocalKafkaBroker(broker_state_dir(_settings().home)).down()


@kafka_app.command("reset")
def kafka_reset() -> None:
    """Stop the local Kafka and delete its data: every topic, message and offset."""
    from driverscore.adapters.kafka.broker import LocalKafkaBroker, broker_state_dir

    settings = _settings()
    state_dir = broker_state_dir(settings.home)
    LocalKafkaBroker(state_dir).reset()
    typer.echo(f"deleted the broker data in {state_dir}; `driverscore kafka up` starts anew")
    stream_state = settings.kafka.state_dir or settings.home / "stream-state"
    if stream_state.exists():
        # The processors' local state restores from changelog topics that are now gone.
        typer.echo(
            f"the stream state in {stream_state.resolve()} belonged to the deleted topics: "
            "delete it before the next `driverscore stream`"
        )


@kafka_app.command("init")
def kafka_init() -> None:
    """Create the contract topics (names, partitions, retention from DRIVERSCORE_KAFKA__*)."""
    from driverscore.adapters.kafka.admin import create_topics
    from driverscore.adapters.kafka.broker import require_broker

    setup = create_topics(require_broker(_settings()).kafka)
    for name in setup.created:
        typer.echo(f"created  {name}")
    for name in setup.existing:
        typer.echo(f"exists   {name}")


@kafka_app.command("produce")
def kafka_produce(
    pings: Annotated[str, typer.Argument(help="Ping file or folder (local or s3://).")],
    mapping: Annotated[Path | None, typer.Option(help="YAML mapping for the ping file.")] = None,
    batch_span: Annotated[
        float, typer.Option(help="Batch each vehicle's pings per this many seconds; 0: single.")
    ] = 0.0,
    rate: Annotated[float, typer.Option(min=0, help="Pings per second; 0: full speed.")] = 0.0,
    close_trips: Annotated[
        bool, typer.Option(help="End with clock messages so every replayed trip closes.")
    ] = False,
) -> None:
    """Replay a ping file into the pings topic in timestamp order, keyed by vehicle."""
    from driverscore.adapters.kafka.broker import require_broker

    # Before the heavy imports: an absent broker is said at once.
    settings = require_broker(_settings())
    from driverscore.adapters.kafka.producer import (
        clock_after,
        load_canonical_pings,
        make_producer,
        replay_pings,
        send_clock,
    )

    # Looked up before sending: a registry problem must not leave a replay without its end.
    gap_s = _stream_trip_gap_s(settings) if close_trips else None
    frame, rejected = load_canonical_pings(
        pings, _load_mapping(mapping), settings.storage_options()
    )
    producer = make_producer(settings.kafka.bootstrap_servers)
    topic = settings.kafka.topics.pings
    result = replay_pings(
        producer, topic, frame, batch_span_s=batch_span, rate=rate, rejected_rows=rejected
    )
    if gap_s is not None and result.last_ts is not None:
        clock = clock_after(result.last_ts, gap_s, settings.kafka.grace_s)
        send_clock(producer, topic, clock)
    typer.echo(f"sent {result.pings:,} pings in {result.messages:,} messages to {topic}")
    if rejected:
        typer.echo(f"{rejected:,} rows rejected by the column mapping (not sent)")


def _stream_trip_gap_s(settings: Settings) -> float:
    """The trip gap the stream cuts with: the card of the model it scores with (what the
    model learned travels with it); the setting, with a note, when no model is registered."""
    from driverscore.adapters.registry import open_registry

    registry = open_registry(settings)
    alias = settings.kafka.model_alias
    version = registry.alias_version(alias)
    if version is None:
        err_console.print(
            f"note: no model with alias {alias!r} in the registry: --close-trips uses the trip "
            f"gap of the settings (DRIVERSCORE_TRIPS__GAP_S={settings.trips.gap_s:g} s)",
            highlight=False,
        )
        return settings.trips.gap_s
    return registry.load_card(version).trip_config.gap_s


druid_app = typer.Typer(
    help="A local Apache Druid fed from the scores and alerts topics (see docs/store.md).",
    no_args_is_help=True,
)
app.add_typer(druid_app, name="druid")


@druid_app.command("up")
def druid_up() -> None:
    """Start a single-machine Druid under <home>/druid; a restart keeps its data and address."""
    from driverscore.adapters.druid.local import LocalDruid, druid_state_dir

    settings = _settings()
    state_dir = druid_state_dir(settings.home)
    url = LocalDruid(state_dir, heap=settings.store.druid.heap).up()
    typer.echo(url)
    err_console.print(
        f"SQL at {url}; commands with home {settings.home} find it (recorded in {state_dir}); "
        "next: `driverscore druid apply` to ingest the scores and alerts topics",
        highlight=False,
    )


@druid_app.command("down")
def druid_down() -> None:
    """Stop the local Druid (its data, metadata and address are kept)."""
    from driverscore.adapters.druid.local import LocalDruid, druid_state_dir

    LocalDruid(druid_state_dir(_settings().home)).down()


@druid_app.command("reset")
def druid_reset() -> None:
    """Stop the local Druid and delete its data, metadata, supervisors and ports."""
    from driverscore.adapters.druid.local import LocalDruid, druid_state_dir

    state_dir = druid_state_dir(_settings().home)
    LocalDruid(state_dir).reset()
    typer.echo(f"deleted the Druid data in {state_dir}; `driverscore druid up` starts anew")


@druid_app.command("apply")
def druid_apply() -> None:
    """Submit the Kafka supervisors: trips and alerts datasources, the hourly rollup."""
    from driverscore.adapters.kafka.broker import require_broker

    settings = require_broker(_settings())
    from driverscore.adapters.druid.local import apply_supervisors, coordinator_url
    from driverscore.adapters.druid.specs import supervisor_specs
    from driverscore.adapters.kafka.admin import create_topics

    # Druid's supervisors wait for missing topics without a word: create them first.
    create_topics(settings.kafka)
    overlord = coordinator_url(settings)
    ids = apply_supervisors(overlord, supervisor_specs(settings.store.druid, settings.kafka))
    for supervisor in ids:
        typer.echo(f"supervisor {supervisor} submitted to {overlord}")


@druid_app.command("status")
def druid_status() -> None:
    """Supervisors (state, lag, tasks) and datasources (segments, rows, size)."""
    from rich.table import Table

    from driverscore.adapters.druid.local import (
        coordinator_url,
        datasource_health,
        druid_url,
        supervisor_health,
    )

    settings = _settings()
    console = Console()
    supervisors = Table(title=f"supervisors at {coordinator_url(settings)}", title_justify="left")
    for column in ("supervisor", "topic", "state", "healthy", "lag", "tasks"):
        supervisors.add_column(column)
    for s in supervisor_health(coordinator_url(settings)):
        supervisors.add_row(
            s.id,
            s.topic or "—",
            s.state,
            "yes" if s.healthy else "no",
            "—" if s.lag is None else f"{s.lag:,}",
            str(s.active_tasks),
        )
    console.print(supervisors)
    datasources = Table(title=f"datasources at {druid_url(settings)}", title_justify="left")
    for column in ("datasource", "segments", "rows", "MB"):
        datasources.add_column(column, justify="left" if column == "datasource" else "right")
    for d in datasource_health(druid_url(settings)):
        datasources.add_row(d.name, f"{d.segments:,}", f"{d.rows:,}", f"{d.size_bytes / 1e6:,.1f}")
    console.print(datasources)


superset_app = typer.Typer(
    help="A local Apache Superset with the score store's dashboards (see docs/superset.md).",
    no_args_is_help=True,
)
app.add_typer(superset_app, name="superset")

SupersetEngine = Annotated[
    str,
    typer.Option(
        "--engine",
        help="Stores to point the bundle at: auto (DuckDB, and Druid when a Druid URL is "
        "configured or recorded), duckdb, druid, both.",
    ),
]


def _local_superset(settings: Settings) -> LocalSuperset:
    from driverscore.adapters.superset.local import (
        LocalSuperset,
        default_venv_dir,
        superset_state_dir,
    )

    return LocalSuperset(
        superset_state_dir(settings.home),
        settings.superset.venv or default_venv_dir(),
        port=settings.superset.port,
        admin_user=settings.superset.admin_user,
    )


@superset_app.command("up")
def superset_up(engine: SupersetEngine = "auto") -> None:
    """Install Superset in its own environment (once), set it up, import the bundle pointed
    at this home's store, start it in the background; prints the URL and the login."""
    from driverscore.adapters.superset.bundle import bundle_zip
    from driverscore.adapters.superset.local import ensure_venv, store_targets, venv_ready

    settings = _settings()
    targets = store_targets(settings, engine)
    local = _local_superset(settings)
    if not venv_ready(local.venv):
        err_console.print(
            f"building Superset's environment in {local.venv} (pip, ~800 MB, a few minutes; once)",
            highlight=False,
            soft_wrap=True,
        )
    ensure_venv(local.venv)
    if any(t.engine == "duckdb" for t in targets) and not settings.store_path.is_file():
        err_console.print(
            f"note: no score store at {settings.store_path} yet: the DuckDB charts fill once "
            "`driverscore score`, `demo` or `sink` writes it",
            highlight=False,
            soft_wrap=True,
        )
    url = local.up(bundle_zip(targets))
    from driverscore.adapters.superset.bundle import DASHBOARD_SLUGS

    for target in targets:
        typer.echo(f"{url}/superset/dashboard/{DASHBOARD_SLUGS[target.engine]}/")
    err_console.print(
        f"Superset at {url}: login {local.admin_user} / {local.admin_password()} "
        f"(kept in {local.state_dir}); log {local.log_file}; stop: `driverscore superset down`",
        highlight=False,
        soft_wrap=True,
    )


@superset_app.command("down")
def superset_down() -> None:
    """Stop the local Superset (its metadata, config and environment are kept)."""
    local = _local_superset(_settings())
    if local.stop():
        typer.echo(f"stopped Superset at {local.url}")
    else:
        typer.echo("Superset was not running")


@superset_app.command("status")
def superset_status() -> None:
    """Whether the local Superset runs and answers, where its environment and state are."""
    from driverscore.adapters.superset.local import venv_ready

    local = _local_superset(_settings())
    pid = local.pid()
    if pid is None:
        state = "not running"
    else:
        state = f"running (pid {pid}), " + ("healthy" if local.healthy() else "not answering")
    typer.echo(f"superset: {state} at {local.url}")
    typer.echo(f"environment: {local.venv} ({'ready' if venv_ready(local.venv) else 'not built'})")
    typer.echo(f"state: {local.state_dir}")
    if pid is None:
        raise typer.Exit(code=EXIT_ERROR)


@superset_app.command("bundle")
def superset_bundle(
    out: Annotated[Path, typer.Option("--out", help="Folder for the zips.")] = Path(),
    engine: SupersetEngine = "both",
) -> None:
    """Write the bundle as importable zips (one per engine), pointed at this home's store."""
    from driverscore.adapters.superset.bundle import bundle_zip
    from driverscore.adapters.superset.local import store_targets

    out.mkdir(parents=True, exist_ok=True)
    for target in store_targets(_settings(), engine):
        path = out / f"driverscore_superset_{target.engine}.zip"
        path.write_bytes(bundle_zip([target]))
        typer.echo(str(path))


@app.command()
def stream(
    pings: Annotated[
        str | None, typer.Argument(help="--source file: ping file or folder (local or s3://).")
    ] = None,
    source: Annotated[
        str, typer.Option(help="kafka: the pings topic; file: replay PINGS without Kafka.")
    ] = "kafka",
    mapping: Annotated[Path | None, typer.Option(help="YAML mapping for the ping file.")] = None,
    speed: Annotated[
        float, typer.Option(min=0, help="--source file: × real time (60: 1 min/s); 0: max.")
    ] = 0.0,
    out: Annotated[
        Path | None, typer.Option(help="--source file: Parquet folder (default <home>/stream).")
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(help="Serve Prometheus /metrics on this port; 0: off.")
    ] = 0,
    store: Annotated[
        bool, typer.Option(help="--source file: also write to the score store (<home>).")
    ] = True,
) -> None:
    """Score trips as they close, from the pings topic or a replayed ping file."""
    if source not in ("kafka", "file"):
        raise ConfigError(f"--source: '{source}' is neither kafka nor file")
    if (source == "file") != (pings is not None):
        raise ConfigError("PINGS is required with --source file and not allowed otherwise")
    settings = _settings()
    if source == "kafka":
        from driverscore.adapters.kafka.broker import require_broker

        # Before the stream's heavy imports and the registry: an absent broker is said at once.
        settings = require_broker(settings)
    from driverscore.adapters.registry import open_registry
    from driverscore.services.stream import (
        StreamMetrics,
        TripScoringStep,
        build_stream_application,
        stream_models,
        stream_scoring,
    )

    scoring = stream_scoring(settings)
    from driverscore.adapters.registry_http import configure_registry_http

    # The processor polls the registry between messages: a registry that is down must fail
    # a poll within seconds (the loaded models keep scoring), not stall the stream for minutes.
    configure_registry_http(settings.service.registry_timeout_s, settings.service.registry_retries)
    models = stream_models(settings, lambda: open_registry(settings))
    scorer = models.current().champion
    metrics = StreamMetrics()
    from driverscore.services.live_monitor import build_live_monitor

    live_monitor = build_live_monitor(
        settings, lambda: open_registry(settings), lambda: models.current().champion.card
    ).register(metrics.registry)
    from driverscore.services.profile_writer import build_profile_writer

    # Trips scored through the service are in the service's profile parts already.
    profile_writer = (
        build_profile_writer(settings, lambda: open_registry(settings), "stream")
        if settings.kafka.scoring_url is None
        else None
    )
    step = TripScoringStep(
        models,
        metrics,
        policy=settings.kafka.rollout,
        scoring=scoring,
        live_monitor=live_monitor,
        profile_writer=profile_writer,
    )
    if metrics_port:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=metrics.registry)
    if pings is not None:
        from driverscore.adapters.ping_files import load_canonical_pings
        from driverscore.services.prediction_log import open_prediction_log
        from driverscore.services.stream_embedded import (
            ParquetScoreSink,
            ScoreSink,
            ScoreStoreSink,
            TeeSink,
            run_embedded_stream,
        )

        frame, rejected = load_canonical_pings(
            pings, _load_mapping(mapping), settings.storage_options()
        )
        folder = (out or settings.home / "stream").resolve()
        # Decisions go where the service and batch scoring log theirs.
        prediction_log = open_prediction_log(settings)
        prediction_log.setup()
        sink: ScoreSink = ParquetScoreSink(folder)
        if store:
            from driverscore.adapters.score_store.duckdb_store import open_score_store

            sink = TeeSink((sink, ScoreStoreSink(open_score_store(settings))))
        result = run_embedded_stream(
            frame,
            step,
            sink,
            grace_s=settings.kafka.grace_s,
            prediction_log=prediction_log,
            profile_flush_s=settings.monitoring.profile_flush_s,
            speed=speed,
        )
        typer.echo(
            f"replayed {result.pings:,} pings: {result.trips:,} trips scored, "
            f"{result.alerts:,} alerts, in {result.wall_s:.1f}s → {folder}"
        )
        if store:
            typer.echo(f"score store: {settings.store_path} (driverscore scores --help)")
        if result.set_aside:
            typer.echo(f"{result.set_aside:,} trips set aside, with the reason: {folder}/set_aside")
        if result.late_pings:
            typer.echo(f"{result.late_pings:,} pings behind a closed trip (not scored)")
        if rejected:
            typer.echo(f"{rejected:,} rows rejected by the column mapping (not replayed)")
        return
    from driverscore.services.api.logs import configure_json_logging, flush_logs

    state_dir = settings.kafka.state_dir or (settings.home / "stream-state")
    app_ = build_stream_application(
        settings.kafka,
        step,
        state_dir.resolve(),
        metrics,
        profile_flush_s=settings.monitoring.profile_flush_s,
    )
    err_console.print(
        f"streaming with {scorer.model_name} v{scorer.model_version} from "
        f"{settings.kafka.topics.pings} at {settings.kafka.bootstrap_servers}",
        highlight=False,
    )
    # A long-running processor logs as the service does: JSON lines on stderr, which log
    # collectors parse (failed trips, registry polls, retries of the scoring service).
    configure_json_logging()
    try:
        app_.run()
    finally:
        flush_logs()


@app.command()
def sink(
    stop_when_idle: Annotated[
        float | None,
        typer.Option(min=0.1, help="Stop once no message came for this many seconds."),
    ] = None,
) -> None:
    """Store the scores, alerts and routes topics in the score store (<home>/scores.duckdb)."""
    import signal

    from driverscore.adapters.kafka.broker import require_broker

    settings = require_broker(_settings())
    from driverscore.adapters.kafka.consumer import TopicReader
    from driverscore.adapters.score_store.duckdb_store import open_score_store
    from driverscore.services.score_sink import ScoreSinkRunner

    config = settings.store
    runner = ScoreSinkRunner(
        open_score_store(settings),
        settings.kafka.topics,
        batch_records=config.sink_batch_records,
        batch_wait_s=config.sink_batch_wait_s,
    )
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    # A stop signal ends the loop after the batch in hand is written and committed.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reader = TopicReader(
        settings.kafka.bootstrap_servers,
        config.sink_group,
        runner.topics,
        runner.flush,
        session_timeout_s=settings.kafka.session_timeout_s,
    )
    err_console.print(
        f"storing {', '.join(runner.topics)} from {settings.kafka.bootstrap_servers} in "
        f"{settings.store_path} (group {config.sink_group})",
        highlight=False,
    )
    try:
        stats = runner.run(
            reader, should_stop=lambda: bool(stopping), stop_when_idle_s=stop_when_idle
        )
    finally:
        reader.close()
    typer.echo(
        f"stored {stats.messages:,} messages in {stats.batches:,} batches: "
        f"{stats.records:,} new or newer trip records, {stats.alerts:,} alerts, "
        f"{stats.routes:,} routes, {stats.rejects:,} rejected (store_rejects)"
    )


def _quiet_libraries() -> None:
    """MLflow's INFO chatter and progress bars would drown the command's own output."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow configures its own loggers on import, so a level set here would be overridden;
    # its environment variable is read at that moment. Its pickle warning concerns the
    # sklearn artifact kept for `mlflow models serve`; serving uses the ONNX export.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _exit_code(exc: DriverscoreError) -> int:
    if isinstance(exc, GateFailedError):
        return EXIT_GATE_FAILED
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    return EXIT_ERROR


def _s3_uris(argv: list[str]) -> str:
    """The command's s3:// arguments: where an object-store failure happened."""
    uris = [a.split("=", 1)[-1] for a in argv if a.split("=", 1)[-1].startswith("s3://")]
    return ", ".join(uris) or "S3 (DRIVERSCORE_DATA_URI)"


def main() -> None:
    """Console entry point: a user error prints one line, without a traceback, and exits
    1 (error), 2 (wrong option, setting or mapping file) or 3 (a trained model failed its
    validation gate); see docs/operations.md."""
    _quiet_libraries()
    try:
        app()
    except DriverscoreError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(_exit_code(exc))
    except Exception as exc:
        # botocore's failures reach here from any s3:// read or write, untranslated by
        # fsspec; anything else is a bug and keeps its traceback.
        from driverscore.adapters.storage import storage_failure

        failure = storage_failure(exc, where=_s3_uris(sys.argv[1:]))
        if failure is None:
            raise
        err_console.print(f"[bold red]error:[/] {failure}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
