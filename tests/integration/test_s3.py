"""The same import and dataset-store code against a real S3 API server and local disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pytest

from driverscore.adapters.readers import list_sources, read_table
from driverscore.adapters.storage import DataStore, filesystem
from driverscore.errors import InputDataError
from driverscore.pipelines.importing import import_telemetry, load_mapping

if TYPE_CHECKING:
    # conftest is not a package module; the class is only needed for annotations.
    from conftest import S3Server

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PARTS = [
    pl.DataFrame({"vehicle_id": ["v1", "v2"], "speed_mps": [1.0, 2.0]}),
    pl.DataFrame({"vehicle_id": ["v3"], "speed_mps": [3.0]}),
]


def _upload(s3: S3Server, local: Path, uri: str) -> None:
    fs, path = filesystem(uri, s3.storage_options())
    fs.put_file(str(local), path)


def test_import_from_s3_to_s3(s3_server: S3Server, tmp_path: Path) -> None:
    prefix = s3_server.fresh_prefix("import")
    options = s3_server.storage_options()
    _upload(s3_server, EXAMPLES / "gps_only_kmh.csv", f"{prefix}/in/gps_only_kmh.csv")
    _upload(s3_server, EXAMPLES / "gps_only_kmh.mapping.yaml", f"{prefix}/mapping.yaml")
    bad = tmp_path / "bad.csv"
    bad.write_text("time,unit,latitude,longitude,speed_kmh,course\nnot-a-time,v9,1,2,3,4\n")
    _upload(s3_server, bad, f"{prefix}/in/more/bad.csv")
    mapping = load_mapping(f"{prefix}/mapping.yaml", options)

    result = import_telemetry(f"{prefix}/in", mapping, f"{prefix}/out/pings.parquet", options)

    assert result.sources == (f"{prefix}/in/gps_only_kmh.csv", f"{prefix}/in/more/bad.csv")
    assert (result.rows_in, result.rows_rejected) == (result.rows_out + 1, 1)
    pings = read_table(f"{prefix}/out/pings.parquet", None, options)
    assert pings.height == result.rows_out
    assert pings["source"][0] == f"{prefix}/in/gps_only_kmh.csv"
    assert result.rejects_uri == f"{prefix}/out/pings.rejects.parquet"
    rejects = read_table(result.rejects_uri, None, options)
    assert rejects["reason"].to_list() == ["unparseable_timestamp"]


def test_local_import_matches_s3_import(s3_server: S3Server, tmp_path: Path) -> None:
    prefix = s3_server.fresh_prefix("parity")
    options = s3_server.storage_options()
    mapping = load_mapping(str(EXAMPLES / "gps_only_kmh.mapping.yaml"), {})
    _upload(s3_server, EXAMPLES / "gps_only_kmh.csv", f"{prefix}/gps_only_kmh.csv")

    import_telemetry(f"{prefix}/gps_only_kmh.csv", mapping, f"{prefix}/out", options)
    import_telemetry(str(EXAMPLES / "gps_only_kmh.csv"), mapping, str(tmp_path / "out"), {})

    from_s3 = read_table(f"{prefix}/out/part-00000.parquet", None, options).drop("source")
    local = pl.read_parquet(tmp_path / "out" / "part-00000.parquet").drop("source")
    assert from_s3.equals(local)


def test_datastore_on_s3_gives_the_same_versions_as_on_disk(
    s3_server: S3Server, tmp_path: Path
) -> None:
    remote = DataStore(s3_server.fresh_prefix("store"), s3_server.storage_options())
    local = DataStore(str(tmp_path / "data"), {})

    remote_refs = [
        remote.write_dataset("cleaned", iter(PARTS)),
        remote.write_dataset("features", PARTS[0], name="features"),
    ]
    local_refs = [
        local.write_dataset("cleaned", iter(PARTS)),
        local.write_dataset("features", PARTS[0], name="features"),
    ]

    assert [r.version for r in remote_refs] == [r.version for r in local_refs]
    assert remote_refs[0].uri == f"{remote.root_uri}/cleaned/{remote_refs[0].version}"
    assert remote.read_dataset(remote_refs[0]).equals(pl.concat(PARTS))
    assert [p.height for p in remote.scan_dataset(remote_refs[0])] == [2, 1]
    assert remote.latest("features") == remote_refs[1]
    # Idempotent on S3 too: the second write finds the committed version.
    assert remote.write_dataset("cleaned", iter(PARTS)) == remote_refs[0]
    fs, root = filesystem(remote.root_uri, s3_server.storage_options())
    assert not fs.exists(f"{root}/_staging") or not fs.ls(f"{root}/_staging")


def test_raw_snapshot_reports_and_run_manifest_on_s3(s3_server: S3Server, tmp_path: Path) -> None:
    prefix = s3_server.fresh_prefix("raw")
    options = s3_server.storage_options()
    source = f"{prefix}/landing/gps_only_kmh.csv"
    _upload(s3_server, EXAMPLES / "gps_only_kmh.csv", source)
    remote = DataStore(f"{prefix}/data", options)
    local = DataStore(str(tmp_path / "data"), {})

    raw = remote.snapshot_raw(list_sources(f"{prefix}/landing", options))
    report_uri = remote.write_json("reports", "run-1", "quality.json", {"rows": 1})
    run_uri = remote.write_run_manifest("run-1", {"raw": raw})

    assert raw.version == local.snapshot_raw([str(EXAMPLES / "gps_only_kmh.csv")]).version
    manifest = remote.read_json(f"{raw.uri}/manifest.json")
    assert manifest["files"][0]["uri"] == source
    assert manifest["files"][0]["size"] == (EXAMPLES / "gps_only_kmh.csv").stat().st_size
    assert report_uri == f"{prefix}/data/reports/run-1/quality.json"
    assert remote.read_json(run_uri)["artifacts"]["raw"]["version"] == raw.version
    assert json.loads(json.dumps(remote.read_json(report_uri))) == {"rows": 1}
    assert remote.latest("raw") == raw


def test_missing_s3_object_is_a_one_line_input_error(s3_server: S3Server) -> None:
    options = s3_server.storage_options()
    missing = s3_server.uri("nowhere", "pings.csv")

    with pytest.raises(InputDataError, match="file not found"):
        read_table(missing, None, options)
    with pytest.raises(InputDataError, match="no such file or folder"):
        list_sources(missing, options)
