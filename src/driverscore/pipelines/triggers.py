"""What starts the closed loop's Dagster jobs, and how a run records why it started.

- **Retrain sensor** (``driverscore_retrain_sensor``): watches two signals and requests the
  training job when either fires: new raw data (a new or changed file under the telemetry
  source: a new partition, a new part, a rewritten snapshot) when
  ``triggers.new_data=immediate``, and a monitoring result whose verdict is in
  ``triggers.retrain_on_verdicts`` (drift, degraded), the verdict's summary becoming the
  run's reason. One sensor reads both, so two triggers on the same tick make one run whose
  tags name both; a training run already queued or running absorbs later triggers (it
  trains on the newest data); and the run key (the data's fingerprint and the newest
  verdict) never starts a second run for the same signals.
- **Training schedule** (daily or weekly, ``settings.schedule``): trains when the raw data
  changed since the last training run, and skips otherwise (``triggers.new_data=schedule``
  makes this the way new data retrains).
- **Decision sensor** (``driverscore_decision_sensor``): a running challenger with enough
  evidence (``challenger_evidence(...).ready``) → the decision job, which calls
  ``run_decision``; the **rollback watch** job runs on ``triggers.rollback_watch_cron``.

Every run carries ``driverscore/trigger`` (what started it: ``new_raw_data``,
``monitor_drift``, ``monitor_degraded``, ``schedule``, ``challenger_evidence``…, joined
with ``+`` when several fired) and ``driverscore/reason`` (in words, with the numbers).
The signal readers are plain functions of the settings and the data store, so the sensors
only wire them to Dagster; nothing here runs at import.
"""

# No `from __future__ import annotations`: Dagster inspects the asset functions'
# annotations at definition time and cannot resolve strings inside a closure.

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import dagster as dg
from dagster import AssetExecutionContext
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)

from driverscore.adapters.readers import list_sources
from driverscore.adapters.storage import DataStore, filesystem
from driverscore.errors import InputDataError
from driverscore.pipelines.monitoring_run import MONITORING_KIND, RESULT_NAME
from driverscore.settings import Settings

__all__ = [
    "DECISION_JOB_NAME",
    "DECISION_SENSOR",
    "RAW_FINGERPRINT_TAG",
    "REASON_TAG",
    "RETRAIN_SENSOR",
    "ROLLBACK_JOB_NAME",
    "TRIGGER_TAG",
    "MonitorVerdict",
    "RawDataState",
    "RetrainCursor",
    "loop_definitions",
    "new_verdicts",
    "raw_data_state",
    "training_in_flight",
]

TRIGGER_TAG: Final = "driverscore/trigger"
REASON_TAG: Final = "driverscore/reason"
#: The fingerprint of the raw data a training run was started for.
RAW_FINGERPRINT_TAG: Final = "driverscore/raw_fingerprint"
#: The monitoring run whose verdict started a training run.
MONITORING_RUN_TAG: Final = "driverscore/monitoring_run"
RETRAIN_SENSOR: Final = "driverscore_retrain_sensor"
DECISION_SENSOR: Final = "driverscore_decision_sensor"
DECISION_JOB_NAME: Final = "driverscore_decision"
ROLLBACK_JOB_NAME: Final = "driverscore_rollback_watch"

#: Runs that have not finished: a trigger seen meanwhile is absorbed by them.
_IN_FLIGHT: Final = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
#: Cron of the training schedule per ``settings.schedule``.
CRON: Final = {"daily": "0 3 * * *", "weekly": "0 3 * * 1"}
#: Dagster keeps tag values short; a reason longer than this is cut with an ellipsis.
_MAX_TAG: Final = 480


# -- signals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawDataState:
    """What the telemetry source holds now, summed up in one fingerprint."""

    fingerprint: str
    files: int


def raw_data_state(uri: str, storage_options: Mapping[str, object]) -> RawDataState:
    """Fingerprint of the data files under ``uri``: their names, sizes and modification
    times, so a new partition, a new part or a rewritten file changes it, and listing is
    all it costs (no file is read)."""
    try:
        files = list_sources(uri, storage_options)
    except InputDataError:
        return RawDataState(fingerprint="empty", files=0)
    fs, _ = filesystem(uri, storage_options)
    digest = hashlib.sha256()
    for file in files:
        info = fs.info(file)
        modified = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
        digest.update(f"{file}\x00{info.get('size')}\x00{modified}\n".encode())
    return RawDataState(fingerprint=digest.hexdigest()[:20], files=len(files))


@dataclass(frozen=True)
class MonitorVerdict:
    """One monitoring result, as the retrain sensor reads it."""

    run_id: str
    verdict: str
    summary: str
    result_uri: str


def new_verdicts(store: DataStore, after: str | None) -> list[MonitorVerdict]:
    """Monitoring results whose run id sorts after ``after``, oldest first.

    Run ids start with the window's end time, so a result about an older window than one
    already seen is not new: re-judging the past does not retrain.
    """
    found: list[MonitorVerdict] = []
    for uri in store.report_uris(MONITORING_KIND, RESULT_NAME):
        run_id = uri.rstrip("/").split("/")[-2]
        if after is not None and run_id <= after:
            continue
        try:
            result = store.read_json(uri)
        except (OSError, ValueError):
            continue  # being written; the next tick reads it
        found.append(
            MonitorVerdict(
                run_id=run_id,
                verdict=str(result.get("verdict", "")),
                summary=str(result.get("summary", "")),
                result_uri=uri,
            )
        )
    return found


def training_in_flight(instance: dg.DagsterInstance, job_name: str) -> dg.DagsterRun | None:
    """A run of ``job_name`` queued or running, if any."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=_IN_FLIGHT), limit=1)
    return runs[0] if runs else None


def _last_trained_fingerprint(instance: dg.DagsterInstance, job_name: str) -> str | None:
    """The raw fingerprint of the newest training run that recorded one (any outcome: a
    run that failed on these data would fail again on the same data)."""
    for run in instance.get_runs(filters=dg.RunsFilter(job_name=job_name), limit=20):
        fingerprint = run.tags.get(RAW_FINGERPRINT_TAG)
        if fingerprint:
            return fingerprint
    return None


def _tag(text: str) -> str:
    return text if len(text) <= _MAX_TAG else text[: _MAX_TAG - 1] + "…"


@dataclass(frozen=True)
class RetrainCursor:
    """What the retrain sensor has acted on: the raw fingerprint and the newest
    monitoring run it has read."""

    raw: str | None = None
    monitoring: str | None = None

    @classmethod
    def parse(cls, cursor: str | None) -> "RetrainCursor":
        if not cursor:
            return cls()
        values = json.loads(cursor)
        return cls(raw=values.get("raw"), monitoring=values.get("monitoring"))

    def dump(self) -> str:
        return json.dumps({"raw": self.raw, "monitoring": self.monitoring}, sort_keys=True)


def _retrain_evaluation(
    settings: Settings,
    pings_uri: str,
    instance: dg.DagsterInstance,
    cursor: RetrainCursor,
    job_name: str,
) -> tuple[dg.RunRequest | dg.SkipReason, RetrainCursor]:
    """One tick of the retrain sensor: the request (or why not) and the next cursor."""
    config = settings.triggers
    store = DataStore(settings.resolved_data_uri, settings.storage_options())
    raw = raw_data_state(pings_uri, settings.storage_options())
    verdicts = new_verdicts(store, cursor.monitoring)
    newest_run = verdicts[-1].run_id if verdicts else cursor.monitoring
    alarming = [v for v in verdicts if v.verdict in config.retrain_on_verdicts]

    triggers: list[str] = []
    reasons: list[str] = []
    raw_is_new = (
        config.new_data == "immediate"
        and raw.files > 0
        and raw.fingerprint != cursor.raw
        and raw.fingerprint != _last_trained_fingerprint(instance, job_name)
    )
    if raw_is_new:
        triggers.append("new_raw_data")
        reasons.append(f"new raw data: {raw.files} files under {pings_uri}")
    if alarming:
        latest = alarming[-1]
        triggers.append(f"monitor_{latest.verdict}")
        reasons.append(f"monitor {latest.run_id}: {latest.summary}")

    if not triggers:
        return (
            dg.SkipReason(
                f"no new raw data ({raw.files} files, new_data={config.new_data}) and no "
                f"monitoring verdict in {list(config.retrain_on_verdicts)} "
                f"({len(verdicts)} new results)"
            ),
            RetrainCursor(raw=raw.fingerprint, monitoring=newest_run),
        )
    running = training_in_flight(instance, job_name)
    if running is not None:
        # The running training reads the monitor's window and, if it started for these
        # data, these data: both are absorbed. Data newer than the running run's stays
        # pending (the cursor keeps the old fingerprint) and trains after it.
        absorbed = running.tags.get(RAW_FINGERPRINT_TAG) == raw.fingerprint or not raw_is_new
        return (
            dg.SkipReason(
                f"training run {running.run_id} is in flight; it absorbs: {'; '.join(reasons)}"
            ),
            RetrainCursor(raw=raw.fingerprint if absorbed else cursor.raw, monitoring=newest_run),
        )
    tags = {
        TRIGGER_TAG: "+".join(triggers),
        REASON_TAG: _tag("; ".join(reasons)),
        RAW_FINGERPRINT_TAG: raw.fingerprint,
    }
    if alarming:
        tags[MONITORING_RUN_TAG] = alarming[-1].run_id
    request = dg.RunRequest(
        run_key=f"train-{raw.fingerprint}-{alarming[-1].run_id if alarming else 'data'}",
        job_name=job_name,
        tags=tags,
    )
    return request, RetrainCursor(raw=raw.fingerprint, monitoring=newest_run)


def _scheduled_training(
    settings: Settings, pings_uri: str, instance: dg.DagsterInstance, job_name: str
) -> dg.RunRequest | dg.SkipReason:
    """The schedule's tick: train when the raw data changed since the last training run."""
    raw = raw_data_state(pings_uri, settings.storage_options())
    if raw.files == 0:
        return dg.SkipReason(f"no raw data under {pings_uri}")
    running = training_in_flight(instance, job_name)
    if running is not None:
        return dg.SkipReason(f"training run {running.run_id} is in flight")
    last = _last_trained_fingerprint(instance, job_name)
    if raw.fingerprint == last:
        return dg.SkipReason(f"no new raw data since the last training run ({raw.files} files)")
    return dg.RunRequest(
        run_key=f"train-{raw.fingerprint}-schedule",
        tags={
            TRIGGER_TAG: "schedule",
            REASON_TAG: _tag(
                f"{settings.schedule} schedule: raw data changed since the last training run "
                f"({raw.files} files under {pings_uri})"
            ),
            RAW_FINGERPRINT_TAG: raw.fingerprint,
        },
    )


# -- the decision and the rollback watch ------------------------------------------------------


class Evidence(Protocol):
    """What the decision sensor reads of ``challenger_evidence`` (pipelines/decision_run)."""

    @property
    def challenger_version(self) -> str | None: ...
    @property
    def paired_trips(self) -> int: ...
    @property
    def labelled_trips(self) -> int: ...
    @property
    def ready(self) -> bool: ...


EvidenceReader = Callable[[Settings], Evidence]


def _challenger_evidence(settings: Settings) -> Evidence:
    from driverscore.pipelines.decision_run import challenger_evidence

    return challenger_evidence(settings)


def _decision_evaluation(
    settings: Settings,
    evidence_of: EvidenceReader,
    instance: dg.DagsterInstance,
) -> dg.RunRequest | dg.SkipReason:
    evidence = evidence_of(settings)
    if evidence.challenger_version is None:
        return dg.SkipReason("no challenger is running")
    counts = (
        f"challenger v{evidence.challenger_version}: {evidence.paired_trips:,} paired trips, "
        f"{evidence.labelled_trips:,} with matured labels"
    )
    if not evidence.ready:
        return dg.SkipReason(f"{counts}; not enough evidence for a decision yet")
    running = training_in_flight(instance, DECISION_JOB_NAME)
    if running is not None:
        return dg.SkipReason(f"decision run {running.run_id} is in flight ({counts})")
    return dg.RunRequest(
        # A decision that keeps collecting is asked again once more labels matured.
        run_key=f"decide-v{evidence.challenger_version}-{evidence.labelled_trips}",
        job_name=DECISION_JOB_NAME,
        tags={
            TRIGGER_TAG: "challenger_evidence",
            REASON_TAG: _tag(f"{counts}: enough evidence for a decision"),
        },
    )


@dataclass(frozen=True)
class LoopDefinitions:
    """The loop's sensors, schedules, assets and jobs, to add to the Definitions."""

    assets: Sequence[dg.AssetsDefinition]
    jobs: Sequence[UnresolvedAssetJobDefinition]
    sensors: Sequence[dg.SensorDefinition]
    schedules: Sequence[dg.ScheduleDefinition]


def loop_definitions(
    settings: Settings,
    pings_uri: str,
    training_job: UnresolvedAssetJobDefinition,
    *,
    evidence_of: EvidenceReader | None = None,
) -> LoopDefinitions:
    """Sensors and schedules that start ``training_job``, the decision job and the rollback
    watch. ``evidence_of`` replaces ``challenger_evidence`` (tests)."""
    config = settings.triggers
    read_evidence = evidence_of or _challenger_evidence
    job_name = training_job.name

    @dg.sensor(
        name=RETRAIN_SENSOR,
        job=training_job,
        minimum_interval_seconds=config.sensor_interval_s,
        description=(
            "Starts training on new raw data (triggers.new_data=immediate) or a monitoring "
            "verdict of drift or degradation; one run for triggers seen together."
        ),
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def retrain_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        outcome, cursor = _retrain_evaluation(
            settings, pings_uri, context.instance, RetrainCursor.parse(context.cursor), job_name
        )
        if isinstance(outcome, dg.SkipReason):
            return dg.SensorResult(skip_reason=outcome, cursor=cursor.dump())
        return dg.SensorResult(run_requests=[outcome], cursor=cursor.dump())

    def scheduled(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        return _scheduled_training(settings, pings_uri, context.instance, job_name)

    training_schedule = dg.ScheduleDefinition(
        name=f"{job_name}_{settings.schedule}",
        job=training_job,
        cron_schedule=settings.schedule_cron or CRON[settings.schedule],
        execution_timezone="UTC",
        execution_fn=scheduled,
        description="Trains when the raw data changed since the last training run.",
    )

    @dg.asset(
        group_name="driverscore_rollout",
        description="Promote, reject or keep collecting: the challenger against the champion.",
    )
    def rollout_decision(context: AssetExecutionContext) -> dict[str, Any]:
        from driverscore.pipelines.decision_run import run_decision

        outcome = run_decision(settings, actor="decision-job")
        context.log.info(f"{outcome.action}: {'; '.join(outcome.reasons)}")
        context.add_output_metadata(
            {
                "action": outcome.action,
                "reasons": "; ".join(outcome.reasons) or "none",
                "trigger": context.run.tags.get(TRIGGER_TAG, "manual"),
            }
        )
        return {"action": outcome.action, "reasons": list(outcome.reasons)}

    @dg.asset(
        group_name="driverscore_rollout",
        description="After a promotion: moves champion back to previous on a guardrail breach.",
    )
    def rollback_watch(context: AssetExecutionContext) -> dict[str, Any]:
        from driverscore.pipelines.decision_run import run_rollback_watch

        outcome = run_rollback_watch(settings)
        context.add_output_metadata(
            {
                "rolled_back": outcome.rolled_back,
                "reasons": "; ".join(outcome.reasons) or "none",
            }
        )
        return {"rolled_back": outcome.rolled_back, "reasons": list(outcome.reasons)}

    decision_job = dg.define_asset_job(
        DECISION_JOB_NAME, selection=dg.AssetSelection.assets(rollout_decision)
    )
    rollback_job = dg.define_asset_job(
        ROLLBACK_JOB_NAME, selection=dg.AssetSelection.assets(rollback_watch)
    )

    @dg.sensor(
        name=DECISION_SENSOR,
        job=decision_job,
        minimum_interval_seconds=config.decision_interval_s,
        description="Starts the decision job once the running challenger has enough evidence.",
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def decision_sensor(context: dg.SensorEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        return _decision_evaluation(settings, read_evidence, context.instance)

    rollback_schedule = dg.ScheduleDefinition(
        name=f"{ROLLBACK_JOB_NAME}_schedule",
        job=rollback_job,
        cron_schedule=config.rollback_watch_cron,
        execution_timezone="UTC",
        tags={TRIGGER_TAG: "schedule", REASON_TAG: "rollback watch window check"},
    )
    return LoopDefinitions(
        assets=[rollout_decision, rollback_watch],
        jobs=[decision_job, rollback_job],
        sensors=[retrain_sensor, decision_sensor],
        schedules=[training_schedule, rollback_schedule],
    )
