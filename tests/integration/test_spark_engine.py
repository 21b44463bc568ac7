"""The Spark engine (local mode, 2 cores) against the embedded one on the same input.

Parity is row for row: the same features, the same quarantine rows with their reasons,
the same counts and the same dataset versions. The Spark session is the suite's one
(``spark`` in conftest); each test reads its own files.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from pydantic import SecretStr

from driverscore.adapters.files import write_table
from driverscore.pipelines.spark_steps import ingest_spark, prepare_spark
from driverscore.pipelines.steps import RunContext, ingest, prepare
from driverscore.settings import Settings
from driverscore.simulation import SimulationConfig, simulate

pytestmark = [pytest.mark.spark, pytest.mark.integration, pytest.mark.slow]

REFERENCE = datetime(2030, 1, 1, tzinfo=UTC)


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(frame.columns, nulls_last=True)


@pytest.fixture(scope="module")
def fleet_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dirty fleet in four files, each vehicle's days split across two of them."""
    pings = simulate(SimulationConfig(vehicles=6, days=2, seed=3)).pings
    folder = tmp_path_factory.mktemp("fleet")
    middle = pings.get_column("ts").drop_nulls().sort()[pings.height // 2]
    early = (pl.col("ts") < middle).fill_null(True)
    halves = {"early": pings.filter(early), "late": pings.filter(~early)}
    for name, half in halves.items():
        odd = pl.col("vehicle_id").str.tail(1).is_in(["1", "3", "5", "7", "9"]).fill_null(False)
        write_table(half.filter(odd), str(folder / f"{name}-odd.parquet"), {})
        write_table(half.filter(~odd), str(folder / f"{name}-even.parquet"), {})
    return folder


def test_spark_prepare_equals_the_embedded_engine_row_for_row(
    spark: Any, spark_settings: Settings, fleet_files: Path
) -> None:
    ctx = RunContext.start(spark_settings, REFERENCE)
    embedded = prepare(ctx, ingest(ctx, str(fleet_files)))
    ingested = ingest_spark(ctx, spark, str(fleet_files))
    on_spark = prepare_spark(ctx, spark, ingested)

    read = ctx.store.read_dataset
    assert_frame_equal(read(on_spark.features), read(embedded.features))
    quarantine = read(on_spark.quarantine)
    assert quarantine.height > 0
    assert_frame_equal(_sorted(quarantine), _sorted(read(embedded.quarantine)))
    assert_frame_equal(_sorted(read(on_spark.cleaned)), _sorted(read(embedded.cleaned)))
    assert on_spark.quality["datasets"] == embedded.quality["datasets"]
    assert on_spark.quality["balanced"]
    for key in ("rows_in", "rows_kept", "rows_quarantined", "quarantined_per_rule", "trips"):
        assert on_spark.quality[key] == embedded.quality[key]
    assert on_spark.quality["stage_counts"] == embedded.quality["stage_counts"]


def test_a_vehicle_split_across_files_and_partitions_still_gives_whole_trips(
    spark: Any, spark_settings: Settings, fleet_files: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole.parquet"
    write_table(
        pl.concat([pl.read_parquet(p) for p in sorted(fleet_files.glob("*.parquet"))]),
        str(whole),
        {},
    )
    ctx = RunContext.start(spark_settings, REFERENCE)
    ingested = ingest_spark(ctx, spark, str(fleet_files))
    split = prepare_spark(ctx, spark, ingested)
    one_file = prepare(ctx, ingest(ctx, str(whole)))

    # Four files, several input partitions per file (small splits), several groups.
    assert ingested.raw.parts == 4
    features = ctx.store.read_dataset(split.features)
    assert features.height == one_file.quality["trips"] > 0
    expected = ctx.store.read_dataset(one_file.features).drop("source", strict=False)
    assert_frame_equal(features.drop("source", strict=False), expected)


def test_csv_with_a_mapping_and_rejects_matches_the_embedded_import(
    spark: Any, spark_settings: Settings, tmp_path: Path
) -> None:
    from driverscore.domain.mapping import ColumnMapping

    rows = [
        "time,vehicle,lat,lon,kmh",
        *[f"{1_700_000_000 + i},veh-1,48.0{i:03d},11.0,{36 + i % 5}" for i in range(40)],
        "1700000040,veh-1,n/a,11.0,40",
        *[f"{1_700_000_100 + i},veh-2,48.1{i:03d},11.1,{50 + i % 3}" for i in range(40)],
    ]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pings.csv").write_text("\n".join(rows) + "\n")
    mapping = ColumnMapping(
        columns={"ts": "time", "vehicle_id": "vehicle", "speed_mps": "kmh"},
        units={"ts": "epoch_s", "speed_mps": "km/h"},
    )
    ctx = RunContext.start(spark_settings, REFERENCE)
    embedded = ingest(ctx, str(tmp_path / "src"), mapping)
    on_spark = ingest_spark(ctx, spark, str(tmp_path / "src"), mapping)

    assert on_spark.canonical.version == embedded.canonical.version
    assert on_spark.rejected_rows == embedded.rejected_rows == 1
    assert_frame_equal(on_spark.rejects, embedded.rejects)
    assert on_spark.rejects.item(0, "row") == 41


def test_spark_reads_pings_from_s3_through_s3a(
    spark: Any, spark_settings: Settings, fleet_files: Path, s3_server: Any
) -> None:
    from driverscore.adapters.spark.session import spark_session

    prefix = s3_server.fresh_prefix("spark")
    options = s3_server.storage_options()
    for path in sorted(fleet_files.glob("*.parquet")):
        write_table(pl.read_parquet(path), f"{prefix}/pings/{path.name}", options)
    settings = spark_settings.model_copy(
        update={
            "s3_endpoint_url": s3_server.endpoint_url,
            "aws_access_key_id": SecretStr(str(options["key"])),
            "aws_secret_access_key": SecretStr(str(options["secret"])),
        }
    )
    # The suite's session, given the S3 endpoint and keys of this test's server.
    session = spark_session(settings)
    ctx = RunContext.start(settings, REFERENCE)

    from_s3 = ingest_spark(ctx, session, f"{prefix}/pings")
    local = ingest(ctx, str(fleet_files))

    assert from_s3.raw.version == local.raw.version
    assert from_s3.canonical.rows == local.canonical.rows > 0
    canonical = ctx.store.read_dataset(from_s3.canonical)
    assert canonical.get_column("source").str.starts_with(f"{prefix}/pings/").all()
    assert_frame_equal(
        _sorted(canonical.drop("source")),
        _sorted(ctx.store.read_dataset(local.canonical).drop("source")),
    )


def test_dagster_prepare_engine_resource_runs_the_assets_on_spark(
    spark: Any, spark_settings: Settings, fleet_files: Path
) -> None:
    import dagster as dg

    from driverscore.pipelines.dagster_defs import (
        PrepareEngine,
        TelemetrySource,
        build_definitions,
    )

    source = TelemetrySource(
        pings_uri=str(fleet_files),
        incidents_uri=str(fleet_files / "unused.parquet"),
        reference_time=REFERENCE.isoformat(),
    )
    defs = build_definitions(spark_settings, source, engine=PrepareEngine(engine="spark"))
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.ephemeral() as instance:
        outcome = job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey("raw_telemetry"), dg.AssetKey("prepared_trips")],
        )
    assert outcome.success
    prepared = outcome.output_for_node("prepared_trips")
    ctx = RunContext.start(spark_settings, REFERENCE)
    embedded = prepare(ctx, ingest(ctx, str(fleet_files)))
    assert prepared.quality["engine"] == "spark"
    assert prepared.quality["datasets"] == embedded.quality["datasets"]
