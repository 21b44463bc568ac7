"""Each trigger starts the training job in a real Dagster instance, and the run says why.

The sensor or schedule is evaluated against the instance, its run request executed in
process with the request's tags (what the daemon does with it), and the instance then
holds the run, its trigger and its materialisations: the next tick sees it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from driverscore.adapters.storage import DataStore
from driverscore.pipelines.dagster_defs import JOB_NAME, TelemetrySource, build_definitions
from driverscore.pipelines.simulation_run import SimulationOutput, write_simulation
from driverscore.pipelines.triggers import (
    DECISION_JOB_NAME,
    RAW_FINGERPRINT_TAG,
    REASON_TAG,
    RETRAIN_SENSOR,
    ROLLBACK_JOB_NAME,
    TRIGGER_TAG,
)
from driverscore.settings import GateConfig, Settings, TriggerConfig
from driverscore.simulation import SimulationConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET = SimulationConfig(vehicles=30, days=16, seed=5)
REFERENCE_TIME = FLEET.start + timedelta(days=FLEET.days)
# A gate a small fleet's model passes: these runs are about what starts them.
LENIENT = GateConfig(min_roc_auc=0.5, max_brier=0.5, max_calibration_error=0.5, min_pr_auc_lift=0)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> SimulationOutput:
    return write_simulation(FLEET, str(tmp_path_factory.mktemp("fleet")), {})


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def _defs(tmp_path: Path, fleet: SimulationOutput, new_data: str) -> dg.Definitions:
    settings = Settings(
        home=tmp_path / "home",
        gate=LENIENT,
        triggers=TriggerConfig.model_validate({"new_data": new_data}),
    )
    source = TelemetrySource(
        pings_uri=fleet.pings_uri,
        incidents_uri=fleet.incidents_uri,
        reference_time=REFERENCE_TIME.isoformat(),
    )
    return build_definitions(settings, source)


def _run(
    defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest
) -> dg.DagsterRun:
    assert request.job_name in (None, JOB_NAME)
    outcome = defs.resolve_job_def(JOB_NAME).execute_in_process(
        instance=instance, tags=request.tags
    )
    assert outcome.success
    run = instance.get_run_by_id(outcome.run_id)
    assert run is not None
    # The run's first asset records what started it beside its data versions.
    [materialization] = outcome.asset_materializations_for_node("raw_telemetry")
    assert materialization.metadata["trigger"].value == request.tags[TRIGGER_TAG]
    return run


def test_each_trigger_starts_the_training_job(
    tmp_path: Path, fleet: SimulationOutput, instance: dg.DagsterInstance
) -> None:
    immediate = _defs(tmp_path, fleet, "immediate")
    sensor = immediate.resolve_sensor_def(RETRAIN_SENSOR)

    def tick(defs: dg.Definitions, cursor: str | None) -> dg.SensorResult:
        result = defs.resolve_sensor_def(RETRAIN_SENSOR)(
            dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
        )
        assert isinstance(result, dg.SensorResult)
        return result

    # 1. New raw data, trained at once.
    first = tick(immediate, None)
    [request] = first.run_requests or []
    run = _run(immediate, instance, request)
    assert run.tags[TRIGGER_TAG] == "new_raw_data"
    assert sensor.job_name == JOB_NAME

    # 2. A monitor verdict of drift: the same data, a new reason.
    settings_home = tmp_path / "home"
    DataStore(str((settings_home / "data").resolve()), {}).write_json(
        "monitoring",
        "20260121T000000Z-drift",
        "monitoring.json",
        {"verdict": "drift", "summary": "drift: avg_speed_kmh drifted: psi 1.7 ≥ 0.200"},
    )
    second = tick(immediate, first.cursor)
    [request] = second.run_requests or []
    run = _run(immediate, instance, request)
    assert run.tags[TRIGGER_TAG] == "monitor_drift"
    assert "avg_speed_kmh drifted" in run.tags[REASON_TAG]
    # Nothing new after that: the instance holds the runs, the cursor the signals.
    assert not tick(immediate, second.cursor).run_requests

    # 3. New data on the schedule setting: the sensor leaves it to the schedule.
    parts = sorted(Path(fleet.pings_uri).glob("*.parquet"))
    shutil.copy(parts[0], Path(fleet.pings_uri) / "part-09999.parquet")
    scheduled = _defs(tmp_path, fleet, "schedule")
    assert not tick(scheduled, second.cursor).run_requests
    schedule = scheduled.resolve_schedule_def(f"{JOB_NAME}_daily")
    [request] = (
        schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests or []
    )
    run = _run(scheduled, instance, request)
    assert run.tags[TRIGGER_TAG] == "schedule"
    skipped = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
    assert not skipped.run_requests

    runs = instance.get_runs(filters=dg.RunsFilter(job_name=JOB_NAME))
    assert sorted(r.tags[TRIGGER_TAG] for r in runs) == [
        "monitor_drift",
        "new_raw_data",
        "schedule",
    ]
    assert len({r.tags[RAW_FINGERPRINT_TAG] for r in runs}) == 2


def test_decision_and_rollback_jobs_run_the_loops_functions(
    tmp_path: Path, fleet: SimulationOutput, instance: dg.DagsterInstance
) -> None:
    # No model yet: both jobs run, decide nothing, and say why in their materialisations.
    defs = _defs(tmp_path, fleet, "schedule")
    decided = defs.resolve_job_def(DECISION_JOB_NAME).execute_in_process(
        instance=instance,
        tags={TRIGGER_TAG: "challenger_evidence", REASON_TAG: "enough evidence"},
    )
    assert decided.success
    [decision] = decided.asset_materializations_for_node("rollout_decision")
    assert decision.metadata["action"].value == "none"
    assert decision.metadata["trigger"].value == "challenger_evidence"
    assert "no challenger" in str(decision.metadata["reasons"].value)

    watched = defs.resolve_job_def(ROLLBACK_JOB_NAME).execute_in_process(instance=instance)
    assert watched.success
    [watch] = watched.asset_materializations_for_node("rollback_watch")
    assert watch.metadata["rolled_back"].value is False
