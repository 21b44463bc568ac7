"""The training pipeline as Dagster assets, with a daily or weekly schedule, and the
monitoring job (``driverscore monitor`` as an asset), hourly by default; the sensors that
retrain on new data or a monitor verdict and start the rollout decision live in
:mod:`driverscore.pipelines.triggers`.

`dagster dev -m driverscore.pipelines.dagster_defs` shows the asset graph, its runs and
the schedule. The assets call the same step functions as `driverscore train`; only the
wiring lives here. Definitions are built lazily (``@dg.definitions``): importing this
module does nothing.
"""

# No `from __future__ import annotations` here: Dagster inspects the asset functions'
# annotations at definition time and cannot resolve strings inside a closure.

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
from dagster import AssetExecutionContext

from driverscore.adapters.registry import RegisteredVersion, open_registry
from driverscore.adapters.spark.session import spark_session
from driverscore.adapters.storage import DataStore
from driverscore.domain.mapping import ColumnMapping
from driverscore.errors import ConfigError
from driverscore.pipelines.monitoring_run import run_monitor
from driverscore.pipelines.spark_steps import ENGINES, ingest_spark, prepare_spark
from driverscore.pipelines.steps import (
    IngestedTelemetry,
    PreparedDataset,
    RunContext,
    ingest,
    new_run_id,
    prepare,
)
from driverscore.pipelines.training_run import (
    ClaimLabels,
    TrainingData,
    ValidatedCandidate,
    check_claims,
    label_and_split,
    register_candidate,
    train_candidate,
    validate_candidate,
)
from driverscore.pipelines.triggers import TRIGGER_TAG, EvidenceReader, loop_definitions
from driverscore.settings import Settings
from driverscore.training.model import TrainedModel

JOB_NAME = "driverscore_training"
#: The monitoring job: one window of scored trips judged, on ``settings.monitoring_cron``.
MONITOR_JOB_NAME = "driverscore_monitoring"
#: Asset check on ``registered_model``: fails (and fails the run) when the gate failed.
GATE_CHECK = "gate_passed"


class TelemetrySource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Where the pipeline reads pings and claims; values default to the environment."""

    pings_uri: str
    incidents_uri: str
    mapping_path: str | None = None
    reference_time: str | None = None

    def mapping(self) -> ColumnMapping | None:
        if not self.mapping_path:
            return None
        path = Path(self.mapping_path)
        return ColumnMapping.from_yaml_text(path.read_text(encoding="utf-8"), where=str(path))

    def resolved_reference_time(self) -> datetime:
        if not self.reference_time:
            return datetime.now(UTC)
        parsed = datetime.fromisoformat(self.reference_time.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class PrepareEngine(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Where the ingest and prepare assets run: ``embedded`` (in the Dagster worker) or
    ``spark`` (a SparkSession from ``settings.spark``, or the one the worker runs in)."""

    engine: str = "embedded"

    def ingest(
        self, ctx: RunContext, pings_uri: str, mapping: ColumnMapping | None
    ) -> IngestedTelemetry:
        if self._engine() == "embedded":
            return ingest(ctx, pings_uri, mapping)
        return ingest_spark(ctx, spark_session(ctx.settings), pings_uri, mapping)

    def prepare(self, ctx: RunContext, ingested: IngestedTelemetry) -> PreparedDataset:
        if self._engine() == "embedded":
            return prepare(ctx, ingested)
        return prepare_spark(ctx, spark_session(ctx.settings), ingested)

    def _engine(self) -> str:
        if self.engine not in ENGINES:
            raise ConfigError(f"prepare_engine: '{self.engine}' is neither embedded nor spark")
        return self.engine


class MonitoringWindow(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Which window the monitoring job judges: ending now unless ``as_of`` is set."""

    as_of: str | None = None
    window_hours: float | None = None
    labels_uri: str | None = None

    def resolved_as_of(self) -> datetime:
        if not self.as_of:
            return datetime.now(UTC)
        parsed = datetime.fromisoformat(self.as_of.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class IngestedRun:
    """The run's identity travels with the first asset so every later step shares it."""

    run_id: str
    reference_time: datetime
    telemetry: IngestedTelemetry


def _context(
    settings: Settings, run_id: str, reference_time: datetime, log: dg.DagsterLogManager
) -> RunContext:
    return RunContext(
        settings=settings,
        store=DataStore(settings.resolved_data_uri, settings.storage_options()),
        run_id=run_id,
        reference_time=reference_time,
        progress=log.info,
    )


def _run_context(settings: Settings, run: IngestedRun, log: dg.DagsterLogManager) -> RunContext:
    return _context(settings, run.run_id, run.reference_time, log)


def build_definitions(
    settings: Settings,
    source: TelemetrySource,
    window: MonitoringWindow | None = None,
    engine: PrepareEngine | None = None,
    *,
    evidence_of: EvidenceReader | None = None,
) -> dg.Definitions:
    """Assets, jobs, schedules and sensors for ``settings``; one function so tests can build
    their own (``evidence_of`` stands in for ``challenger_evidence``)."""

    @dg.asset(group_name="driverscore", description="Raw snapshot and canonical pings.")
    def raw_telemetry(
        context: AssetExecutionContext, telemetry: TelemetrySource, prepare_engine: PrepareEngine
    ) -> IngestedRun:
        reference_time = telemetry.resolved_reference_time()
        run_id = new_run_id(reference_time)
        ctx = _context(settings, run_id, reference_time, context.log)
        ingested = prepare_engine.ingest(ctx, telemetry.pings_uri, telemetry.mapping())
        context.add_output_metadata(
            {
                "raw_version": ingested.raw.version,
                "canonical_rows": ingested.canonical.rows,
                # What started the run (sensor, schedule or a person), shown with the asset.
                "trigger": context.run.tags.get(TRIGGER_TAG, "manual"),
            }
        )
        return IngestedRun(run_id=run_id, reference_time=reference_time, telemetry=ingested)

    @dg.asset(group_name="driverscore", description="Cleaned pings, trip features, quarantine.")
    def prepared_trips(
        context: AssetExecutionContext, raw_telemetry: IngestedRun, prepare_engine: PrepareEngine
    ) -> PreparedDataset:
        prepared = prepare_engine.prepare(
            _run_context(settings, raw_telemetry, context.log), raw_telemetry.telemetry
        )
        context.add_output_metadata(
            {
                "trips": prepared.features.rows,
                "rows_quarantined": int(prepared.quality["rows_quarantined"]),
                "quality_report": prepared.quality_uri,
            }
        )
        return prepared

    @dg.asset(
        group_name="driverscore",
        description="Claims checked: usable ones, and the rejected rows with their reasons.",
    )
    def claim_labels(
        context: AssetExecutionContext, raw_telemetry: IngestedRun, telemetry: TelemetrySource
    ) -> ClaimLabels:
        claims = check_claims(
            _run_context(settings, raw_telemetry, context.log), telemetry.incidents_uri
        )
        context.add_output_metadata(
            {
                "labels_in": int(claims.report["labels_in"]),
                "labels_kept": int(claims.report["labels_kept"]),
                "labels_rejected_share": float(claims.report["labels_rejected_share"]),
                "label_quarantine": claims.quarantine.uri,
            }
        )
        return claims

    @dg.asset(
        group_name="driverscore", description="Mature trips labelled by claims, split in time."
    )
    def training_data(
        context: AssetExecutionContext,
        raw_telemetry: IngestedRun,
        prepared_trips: PreparedDataset,
        claim_labels: ClaimLabels,
    ) -> TrainingData:
        ctx = _run_context(settings, raw_telemetry, context.log)
        data = label_and_split(ctx, prepared_trips, claim_labels)
        context.add_output_metadata(
            {"train_trips": data.train.height, "holdout_trips": data.holdout.height}
        )
        return data

    @dg.asset(group_name="driverscore", description="Calibrated monotone gradient boosting.")
    def candidate_model(
        context: AssetExecutionContext, raw_telemetry: IngestedRun, training_data: TrainingData
    ) -> TrainedModel:
        return train_candidate(_run_context(settings, raw_telemetry, context.log), training_data)

    @dg.asset(group_name="driverscore", description="ONNX export, holdout metrics and gate.")
    def validated_candidate(
        context: AssetExecutionContext,
        raw_telemetry: IngestedRun,
        candidate_model: TrainedModel,
        training_data: TrainingData,
        prepared_trips: PreparedDataset,
    ) -> ValidatedCandidate:
        ctx = _run_context(settings, raw_telemetry, context.log)
        validated = validate_candidate(
            ctx, candidate_model, training_data, prepared_trips, open_registry(settings)
        )
        ctx.store.write_json(
            "reports", ctx.run_id, "gate.json", validated.gate.model_dump(mode="json")
        )
        context.add_output_metadata(
            {
                "gate_passed": validated.gate.passed,
                "roc_auc": validated.gate.candidate.roc_auc or 0.0,
                "brier": validated.gate.candidate.brier,
            }
        )
        return validated

    @dg.asset(
        group_name="driverscore",
        description="MLflow model version; champion or challenger if it passed.",
        # Blocking with ERROR severity: a candidate that fails the gate is still recorded
        # (the materialisation), then the check fails the step and so the run, which is
        # what a schedule's alerting and a retry policy look at.
        check_specs=[
            dg.AssetCheckSpec(
                GATE_CHECK,
                asset="registered_model",
                blocking=True,
                description="The candidate passed the validation gate and got an alias.",
            )
        ],
    )
    def registered_model(
        context: AssetExecutionContext,
        raw_telemetry: IngestedRun,
        validated_candidate: ValidatedCandidate,
        training_data: TrainingData,
        prepared_trips: PreparedDataset,
    ) -> Iterator[dg.Output[RegisteredVersion] | dg.AssetCheckResult]:
        ctx = _run_context(settings, raw_telemetry, context.log)
        registered = register_candidate(
            ctx, validated_candidate, training_data, prepared_trips, open_registry(settings)
        )
        yield dg.Output(
            registered,
            metadata={
                "version": registered.version,
                "alias": registered.alias or "none",
                "gate": registered.gate_status,
            },
        )
        gate = validated_candidate.gate
        yield dg.AssetCheckResult(
            check_name=GATE_CHECK,
            passed=gate.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "version": registered.version,
                "failures": "; ".join(gate.failures) or "none",
            },
        )

    @dg.asset(
        group_name="driverscore_monitoring",
        description="Drift, data quality and performance of the champion over one window.",
    )
    def monitoring_result(
        context: AssetExecutionContext, monitoring_window: MonitoringWindow
    ) -> dict[str, object]:
        result = run_monitor(
            settings,
            as_of=monitoring_window.resolved_as_of(),
            window_hours=monitoring_window.window_hours,
            labels_uri=monitoring_window.labels_uri,
            progress=context.log.info,
        )
        context.add_output_metadata(
            {
                "verdict": result.verdict,
                "summary": result.judgement.summary,
                "trips": result.judgement.trips,
                "result": result.result_uri,
                "report": result.report_uri,
            }
        )
        return {"verdict": result.verdict, "result": result.result_uri}

    monitor_job = dg.define_asset_job(
        MONITOR_JOB_NAME, selection=dg.AssetSelection.assets(monitoring_result)
    )
    monitor_schedule = dg.ScheduleDefinition(
        name=f"{MONITOR_JOB_NAME}_schedule",
        job=monitor_job,
        cron_schedule=settings.monitoring_cron,
        execution_timezone="UTC",
    )

    assets = [
        raw_telemetry,
        prepared_trips,
        claim_labels,
        training_data,
        candidate_model,
        validated_candidate,
        registered_model,
    ]
    job = dg.define_asset_job(JOB_NAME, selection=dg.AssetSelection.assets(*assets))
    # The training schedule, the retrain and decision sensors and the rollback watch.
    loop = loop_definitions(settings, source.pings_uri, job, evidence_of=evidence_of)
    return dg.Definitions(
        assets=[*assets, monitoring_result, *loop.assets],
        jobs=[job, monitor_job, *loop.jobs],
        schedules=[*loop.schedules, monitor_schedule],
        sensors=loop.sensors,
        resources={
            "telemetry": source,
            "monitoring_window": window or MonitoringWindow(),
            "prepare_engine": engine or PrepareEngine(),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    """Entry point for `dagster dev -m driverscore.pipelines.dagster_defs`.

    Sources come from ``DRIVERSCORE_PINGS_URI`` / ``DRIVERSCORE_INCIDENTS_URI`` (default:
    the demo's simulated fleet under the home folder); ``DRIVERSCORE_ENGINE=spark`` runs
    ingest and prepare on Spark.
    """
    settings = Settings()
    demo = (settings.home / "demo" / "fleet-seed42").resolve()
    source = TelemetrySource(
        pings_uri=dg.EnvVar("DRIVERSCORE_PINGS_URI").get_value(str(demo / "pings")) or "",
        incidents_uri=dg.EnvVar("DRIVERSCORE_INCIDENTS_URI").get_value(
            str(demo / "incidents.parquet")
        )
        or "",
        mapping_path=dg.EnvVar("DRIVERSCORE_MAPPING").get_value(None),
    )
    engine = PrepareEngine(engine=dg.EnvVar("DRIVERSCORE_ENGINE").get_value("embedded") or "")
    return build_definitions(settings, source, engine=engine)
