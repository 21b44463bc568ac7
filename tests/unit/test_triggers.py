"""The loop's Dagster sensors and schedule, evaluated with Dagster's test utilities.

No training runs here: a sensor tick only reads the telemetry source's listing, the
monitoring results and the instance's runs. Training started by each trigger in a real
instance is in tests/integration/test_triggers_dagster.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from dagster._core.test_utils import create_run_for_test

from driverscore.adapters.storage import DataStore
from driverscore.pipelines.dagster_defs import JOB_NAME, TelemetrySource, build_definitions
from driverscore.pipelines.triggers import (
    DECISION_JOB_NAME,
    DECISION_SENSOR,
    RAW_FINGERPRINT_TAG,
    REASON_TAG,
    RETRAIN_SENSOR,
    TRIGGER_TAG,
    EvidenceReader,
    RetrainCursor,
)
from driverscore.settings import Settings, TriggerConfig


@dataclass(frozen=True)
class FakeEvidence:
    challenger_version: str | None
    paired_trips: int
    labelled_trips: int
    ready: bool


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    # A test instance (temporary folder) rather than an ephemeral one: a schedule's
    # context needs an instance it can reference.
    with dg.instance_for_test() as test_instance:
        yield test_instance


def _pings(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"vehicle_id": ["v1"], "lat": [45.0]}).write_parquet(folder / name)


def _verdict(settings: Settings, run_id: str, verdict: str, summary: str) -> None:
    store = DataStore(settings.resolved_data_uri, {})
    store.write_json(
        "monitoring", run_id, "monitoring.json", {"verdict": verdict, "summary": summary}
    )


def _defs(
    tmp_path: Path, new_data: str = "immediate", evidence: EvidenceReader | None = None
) -> tuple[Settings, dg.Definitions]:
    settings = Settings(
        home=tmp_path / "home",
        triggers=TriggerConfig.model_validate({"new_data": new_data}),
    )
    source = TelemetrySource(
        pings_uri=str(tmp_path / "pings"), incidents_uri=str(tmp_path / "claims.parquet")
    )
    return settings, build_definitions(settings, source, evidence_of=evidence)


def _tick(
    defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None = None
) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def(RETRAIN_SENSOR)
    result = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs))
    assert isinstance(result, dg.SensorResult)
    return result


def _skip(result: dg.SensorResult) -> str:
    assert not result.run_requests
    assert result.skip_reason is not None
    return str(result.skip_reason.skip_message)


def test_new_raw_data_requests_training_once_per_snapshot(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    _pings(tmp_path / "pings" / "day=2026-01-05", "part-00000.parquet")
    _, defs = _defs(tmp_path)

    first = _tick(defs, instance)
    [request] = first.run_requests or []
    assert request.job_name == JOB_NAME
    assert request.tags[TRIGGER_TAG] == "new_raw_data"
    assert "1 files" in request.tags[REASON_TAG]
    # The next tick has seen these data: nothing to do.
    assert "no new raw data" in _skip(_tick(defs, instance, first.cursor))

    _pings(tmp_path / "pings" / "day=2026-01-06", "part-00000.parquet")
    [again] = _tick(defs, instance, first.cursor).run_requests or []
    assert again.tags[TRIGGER_TAG] == "new_raw_data"
    assert again.run_key != request.run_key
    assert again.tags[RAW_FINGERPRINT_TAG] != request.tags[RAW_FINGERPRINT_TAG]


def test_on_the_schedule_setting_new_data_waits_for_the_schedule(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    _pings(tmp_path / "pings", "part-00000.parquet")
    settings, defs = _defs(tmp_path, new_data="schedule")
    assert "new_data=schedule" in _skip(_tick(defs, instance))

    schedule = defs.resolve_schedule_def(f"{JOB_NAME}_{settings.schedule}")
    [request] = (
        schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests or []
    )
    assert request.tags[TRIGGER_TAG] == "schedule"
    # Once a training run recorded these data, the schedule's next tick skips.
    create_run_for_test(
        instance,
        job_name=JOB_NAME,
        status=dg.DagsterRunStatus.SUCCESS,
        tags=dict(request.tags),
    )
    skipped = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert not skipped.run_requests
    assert "no new raw data since the last training run" in str(skipped.skip_message)


def test_a_drift_verdict_requests_training_with_the_verdict_as_reason(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    settings, defs = _defs(tmp_path, new_data="schedule")
    _verdict(settings, "20260110T000000Z-aaaa", "ok", "ok: 900 trips, no drift")
    cursor = _tick(defs, instance).cursor
    assert RetrainCursor.parse(cursor).monitoring == "20260110T000000Z-aaaa"

    _verdict(settings, "20260111T000000Z-bbbb", "drift", "drift: speed_over_limit_share PSI 0.41")
    result = _tick(defs, instance, cursor)
    [request] = result.run_requests or []
    assert request.tags[TRIGGER_TAG] == "monitor_drift"
    assert "speed_over_limit_share PSI 0.41" in request.tags[REASON_TAG]
    assert request.tags["driverscore/monitoring_run"] == "20260111T000000Z-bbbb"
    # The same verdict never starts a second run.
    assert "no new raw data" in _skip(_tick(defs, instance, result.cursor))


def test_two_triggers_at_once_make_one_run_naming_both(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    _pings(tmp_path / "pings", "part-00000.parquet")
    settings, defs = _defs(tmp_path)
    _verdict(settings, "20260111T000000Z-bbbb", "degraded", "degraded: ROC-AUC 0.61 < 0.70")

    [request] = _tick(defs, instance).run_requests or []
    assert request.tags[TRIGGER_TAG] == "new_raw_data+monitor_degraded"
    assert "ROC-AUC 0.61" in request.tags[REASON_TAG]
    assert "new raw data" in request.tags[REASON_TAG]


def test_a_training_run_in_flight_absorbs_the_trigger(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    _pings(tmp_path / "pings", "part-00000.parquet")
    settings, defs = _defs(tmp_path)
    running = create_run_for_test(instance, job_name=JOB_NAME, status=dg.DagsterRunStatus.STARTED)
    _verdict(settings, "20260111T000000Z-bbbb", "drift", "drift: hard_brake_rate")

    result = _tick(defs, instance)
    assert f"training run {running.run_id} is in flight" in _skip(result)
    # Data newer than the running run's stay pending; the verdict is absorbed.
    cursor = RetrainCursor.parse(result.cursor)
    assert cursor.raw is None and cursor.monitoring == "20260111T000000Z-bbbb"


def test_decision_sensor_waits_for_enough_evidence(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    evidence = FakeEvidence("3", paired_trips=900, labelled_trips=40, ready=False)
    _, defs = _defs(tmp_path, evidence=lambda _settings: evidence)
    sensor = defs.resolve_sensor_def(DECISION_SENSOR)

    def tick() -> dg.SensorResult | dg.RunRequest | dg.SkipReason:
        return sensor(dg.build_sensor_context(instance=instance, definitions=defs))  # type: ignore[no-any-return]

    waiting = tick()
    assert isinstance(waiting, dg.SkipReason)
    assert "challenger v3: 900 paired trips, 40 with matured labels" in str(waiting.skip_message)
    evidence = FakeEvidence("3", paired_trips=2400, labelled_trips=1800, ready=True)
    request = tick()
    assert isinstance(request, dg.RunRequest)
    assert request.job_name == DECISION_JOB_NAME
    assert request.tags[TRIGGER_TAG] == "challenger_evidence"
    assert request.run_key == "decide-v3-1800"

    evidence = FakeEvidence(None, paired_trips=0, labelled_trips=0, ready=False)
    nothing = tick()
    assert isinstance(nothing, dg.SkipReason)
    assert "no challenger" in str(nothing.skip_message)


def test_the_loop_jobs_and_sensors_are_in_the_definitions(tmp_path: Path) -> None:
    _, defs = _defs(tmp_path)
    assert defs.resolve_sensor_def(RETRAIN_SENSOR).job_name == JOB_NAME
    assert defs.resolve_job_def(DECISION_JOB_NAME) is not None
    watch = defs.resolve_schedule_def("driverscore_rollback_watch_schedule")
    assert watch.cron_schedule == "*/15 * * * *"
