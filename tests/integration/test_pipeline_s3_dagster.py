"""The training pipeline on S3 (a real S3 API server) and as Dagster assets.

A small simulated fleet is enough here: these tests check where data goes and how the
steps are wired, not model quality (the demo test does that).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl
import pytest
from pydantic import SecretStr

from driverscore.adapters.readers import list_sources
from driverscore.adapters.registry import open_registry
from driverscore.adapters.storage import DataStore
from driverscore.domain.profiles import TripProfile
from driverscore.pipelines.dagster_defs import (
    GATE_CHECK,
    JOB_NAME,
    TelemetrySource,
    build_definitions,
)
from driverscore.pipelines.simulation_run import SimulationOutput, write_simulation
from driverscore.pipelines.steps import RunContext, ingest, prepare
from driverscore.pipelines.training_run import run_training
from driverscore.settings import GateConfig, Settings
from driverscore.simulation import SimulationConfig

if TYPE_CHECKING:
    from conftest import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL_FLEET = SimulationConfig(vehicles=40, days=18, seed=3)
REFERENCE_TIME = SMALL_FLEET.start + timedelta(days=SMALL_FLEET.days)


@pytest.fixture(scope="module")
def local_fleet(tmp_path_factory: pytest.TempPathFactory) -> SimulationOutput:
    out = tmp_path_factory.mktemp("fleet")
    return write_simulation(SMALL_FLEET, str(out), {})


def _s3_settings(s3: S3Server, home: Path, prefix: str) -> Settings:
    return Settings(
        home=home,
        data_uri=prefix,
        s3_endpoint_url=s3.endpoint_url,
        aws_access_key_id=SecretStr("driverscore-test"),
        aws_secret_access_key=SecretStr("driverscore-test-secret"),
    )


def test_training_reads_and_writes_s3_with_the_same_versions_as_local(
    s3_server: S3Server, local_fleet: SimulationOutput, tmp_path: Path
) -> None:
    s3_settings = _s3_settings(s3_server, tmp_path / "home", s3_server.fresh_prefix("data"))
    fleet_uri = s3_server.fresh_prefix("fleet")
    s3_fleet = write_simulation(SMALL_FLEET, fleet_uri, s3_settings.storage_options())

    result = run_training(
        s3_settings,
        pings_uri=s3_fleet.pings_uri,
        incidents_uri=s3_fleet.incidents_uri,
        reference_time=REFERENCE_TIME,
    )
    assert result.prepared.features.uri.startswith("s3://")
    assert result.manifest_uri.startswith("s3://")
    assert result.prepared.quality["balanced"] is True
    s3_store = DataStore(s3_settings.resolved_data_uri, s3_settings.storage_options())
    features_from_s3 = s3_store.read_dataset(result.prepared.features)
    assert features_from_s3.height == result.prepared.features.rows > 0
    tags = open_registry(s3_settings).version_tags(result.registered.version)
    assert tags["data_version.features"] == result.prepared.features.version

    # Same bytes in, same code: the local run must produce the very same raw snapshot and
    # feature versions (canonical and cleaned pings name their source URI, so they differ).
    local_settings = Settings(home=tmp_path / "local")
    local_store = DataStore(local_settings.resolved_data_uri, {})
    ctx = RunContext(
        settings=local_settings,
        store=local_store,
        run_id="local-check",
        reference_time=REFERENCE_TIME,
    )
    local_prepared = prepare(ctx, ingest(ctx, local_fleet.pings_uri))
    for kind in ("raw", "features"):
        assert local_prepared.quality["datasets"][kind] == result.prepared.quality["datasets"][kind]
    assert len(list_sources(s3_fleet.pings_uri, s3_settings.storage_options())) >= 1


def test_dagster_assets_materialise_the_pipeline(
    local_fleet: SimulationOutput, tmp_path: Path
) -> None:
    # A gate the small fleet's model always passes: this test is about the assets; the
    # failed gate has its own test below.
    lenient = GateConfig(min_roc_auc=0.5, max_brier=0.5, max_calibration_error=0.5)
    settings = Settings(home=tmp_path / "home", schedule="weekly", gate=lenient)
    source = TelemetrySource(
        pings_uri=local_fleet.pings_uri,
        incidents_uri=local_fleet.incidents_uri,
        reference_time=REFERENCE_TIME.isoformat(),
    )
    defs = build_definitions(settings, source)
    schedule = defs.resolve_schedule_def(f"{JOB_NAME}_weekly")
    assert schedule.cron_schedule == "0 3 * * 1"
    assert schedule.job_name == JOB_NAME

    job = defs.resolve_job_def(JOB_NAME)
    with dg.DagsterInstance.ephemeral() as instance:
        outcome = job.execute_in_process(instance=instance)
    assert outcome.success
    [check] = outcome.get_asset_check_evaluations()
    registered = outcome.output_for_node("registered_model")
    assert check.check_name == GATE_CHECK and check.passed
    assert registered.gate_status == "passed"
    registry = open_registry(settings)
    assert registry.version_tags(registered.version)["gate_status"] == "passed"
    assert registry.alias_version("champion") == registered.version
    # The drift reference is fitted with the model and stored beside its card.
    stored = registry.load_reference_profile(registered.version)
    assert stored is not None
    card = registry.load_card(registered.version)
    assert TripProfile.from_json(stored).sha256() == card.reference_profile_sha256
    assert set(TripProfile.from_json(stored).edges.numeric) >= set(card.feature_names)
    prepared = outcome.output_for_node("prepared_trips")
    features = DataStore(settings.resolved_data_uri, {}).read_dataset(prepared.features)
    assert isinstance(features, pl.DataFrame)
    assert features.height == prepared.features.rows > 0


def test_a_failed_gate_fails_the_dagster_run_and_its_asset_check(
    local_fleet: SimulationOutput, tmp_path: Path
) -> None:
    # No model has a Brier score of 0: the candidate fails the gate whatever it learns.
    settings = Settings(home=tmp_path / "home", gate=GateConfig(max_brier=0.0))
    source = TelemetrySource(
        pings_uri=local_fleet.pings_uri,
        incidents_uri=local_fleet.incidents_uri,
        reference_time=REFERENCE_TIME.isoformat(),
    )
    job = build_definitions(settings, source).resolve_job_def(JOB_NAME)
    with dg.DagsterInstance.ephemeral() as instance:
        outcome = job.execute_in_process(instance=instance, raise_on_error=False)

    assert not outcome.success, "a scheduler must see the run fail"
    [check] = outcome.get_asset_check_evaluations()
    assert check.check_name == GATE_CHECK
    assert check.asset_key == dg.AssetKey("registered_model")
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "Brier" in str(check.metadata["failures"].value)
    # The attempt is still recorded, without an alias, for traceability.
    registered = outcome.output_for_node("registered_model")
    assert registered.gate_status == "failed" and registered.alias is None
    registry = open_registry(settings)
    assert registry.version_tags(registered.version)["gate_status"] == "failed"
    assert registry.alias_version("champion") is None


def test_daily_schedule_is_the_default(local_fleet: SimulationOutput, tmp_path: Path) -> None:
    defs = build_definitions(
        Settings(home=tmp_path),
        TelemetrySource(pings_uri=local_fleet.pings_uri, incidents_uri=local_fleet.incidents_uri),
    )
    assert defs.resolve_schedule_def(f"{JOB_NAME}_daily").cron_schedule == "0 3 * * *"
