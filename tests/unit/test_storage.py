from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from driverscore.adapters.storage import ContentDigest, DatasetRef, DataStore

A = pl.DataFrame({"vehicle_id": ["v1", "v2", "v3"], "speed_mps": [1.0, 2.0, 3.0]})
B = pl.DataFrame({"vehicle_id": ["v4", "v5"], "speed_mps": [4.0, 5.0]})


@pytest.fixture
def store(tmp_path: Path) -> DataStore:
    return DataStore(str(tmp_path / "data"), {})


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_layout_follows_the_design(store: DataStore, tmp_path: Path) -> None:
    cleaned = store.write_dataset("cleaned", [A, B])
    features = store.write_dataset("features", A, name="features")

    assert _files(tmp_path / "data") == sorted(
        [
            f"cleaned/{cleaned.version}/_dataset.json",
            f"cleaned/{cleaned.version}/part-00000.parquet",
            f"cleaned/{cleaned.version}/part-00001.parquet",
            "cleaned/LATEST",
            f"features/{features.version}/_dataset.json",
            f"features/{features.version}/features.parquet",
            "features/LATEST",
        ]
    )
    assert cleaned == DatasetRef(
        kind="cleaned",
        version=cleaned.version,
        uri=str(tmp_path / "data" / "cleaned" / cleaned.version),
        rows=5,
        parts=2,
    )


def test_version_is_the_content_hash_not_the_file_bytes(store: DataStore, tmp_path: Path) -> None:
    one = store.write_dataset("features", A, name="features")

    single_file = tmp_path / "data" / "features" / one.version / "features.parquet"
    assert one.version != hashlib.sha256(single_file.read_bytes()).hexdigest()[:16]
    assert one.version == ContentDigest().add(A).version()
    # What an executor digests elsewhere merges into the driver's: the same version.
    merged = (
        ContentDigest()
        .add(A.head(1))
        .merge(
            ContentDigest.from_json(
                json.loads(json.dumps(ContentDigest().add(A.tail(2)).to_json()))
            )
        )
    )
    assert merged.version() == one.version
    assert merged.rows == A.height


def test_same_data_same_version_and_idempotent(store: DataStore, tmp_path: Path) -> None:
    first = store.write_dataset("cleaned", [A, B])
    part = tmp_path / "data" / "cleaned" / first.version / "part-00000.parquet"
    written_at = part.stat().st_mtime_ns

    again = store.write_dataset("cleaned", iter([A.clone(), B.clone()]))

    assert again == first
    assert part.stat().st_mtime_ns == written_at
    assert not list((tmp_path / "data" / "_staging").glob("*"))


def test_chunking_in_memory_does_not_change_the_version(store: DataStore) -> None:
    chunked = pl.concat([A.head(1), A.tail(2)], rechunk=False)

    assert store.write_dataset("x", chunked).version == store.write_dataset("x", A).version


def test_same_rows_in_another_order_or_split_are_the_same_version(store: DataStore) -> None:
    base = store.write_dataset("cleaned", [A, B]).version

    assert store.write_dataset("cleaned", [B, A]).version == base
    assert store.write_dataset("cleaned", [pl.concat([A, B]).reverse()]).version == base
    assert store.write_dataset("cleaned", [A.tail(1), B, A.head(2)]).version == base
    assert store.write_dataset("cleaned", [A.select("speed_mps", "vehicle_id"), B]).version == base


def test_different_rows_or_types_are_a_different_version(store: DataStore) -> None:
    base = store.write_dataset("cleaned", [A, B]).version

    assert store.write_dataset("cleaned", [A, B.head(1)]).version != base
    # A row twice is not the row once.
    assert store.write_dataset("cleaned", [A, B, B.head(1)]).version != base
    assert (
        store.write_dataset("cleaned", [A, B.with_columns(pl.col("speed_mps") + 1)]).version != base
    )
    as_float32 = [f.with_columns(pl.col("speed_mps").cast(pl.Float32)) for f in (A, B)]
    assert store.write_dataset("cleaned", as_float32).version != base


def test_parts_are_streamed_and_read_back_in_order(store: DataStore) -> None:
    consumed: list[int] = []

    def parts() -> Iterator[pl.DataFrame]:
        for index, frame in enumerate([A, B]):
            consumed.append(index)
            yield frame

    ref = store.write_dataset("cleaned", parts())

    assert consumed == [0, 1]
    assert [f.height for f in store.scan_dataset(ref)] == [3, 2]
    assert store.read_dataset(ref).equals(pl.concat([A, B]))
    assert store.read_dataset(ref.uri).equals(pl.concat([A, B]))
    assert store.dataset("cleaned", ref.version) == ref


def test_types_survive_including_utc_timestamps(store: DataStore) -> None:
    frame = pl.DataFrame(
        {"ts": [datetime(2024, 5, 1, 8, tzinfo=UTC)], "reasons": [["hard_brake", "night"]]}
    ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))

    assert store.read_dataset(store.write_dataset("scores", frame)).equals(frame)


def test_empty_datasets(store: DataStore) -> None:
    no_rows = store.write_dataset("quarantine", pl.DataFrame(schema={"reason": pl.String}))
    no_parts = store.write_dataset("quarantine", iter([]))

    assert no_rows.rows == 0
    assert store.read_dataset(no_rows).schema == pl.Schema({"reason": pl.String})
    assert no_parts.parts == 0
    assert store.read_dataset(no_parts).shape == (0, 0)


def test_latest_points_at_the_last_write(store: DataStore) -> None:
    assert store.latest("features") is None
    store.write_dataset("features", A, name="features")
    second = store.write_dataset("features", B, name="features")
    store.write_dataset("features", A, name="features", set_latest=False)

    assert store.latest("features") == second


def test_uncommitted_dataset_is_not_read(store: DataStore, tmp_path: Path) -> None:
    ref = store.write_dataset("cleaned", A)
    (tmp_path / "data" / "cleaned" / ref.version / "_dataset.json").unlink()

    with pytest.raises(FileNotFoundError, match="no committed dataset"):
        store.read_dataset(ref)


def test_raw_snapshot_records_sources_and_hashes_content(store: DataStore, tmp_path: Path) -> None:
    first = tmp_path / "in" / "a.csv"
    first.parent.mkdir()
    first.write_bytes(b"ts,vehicle_id\n1,v1\n")
    copy = tmp_path / "elsewhere.csv"
    copy.write_bytes(first.read_bytes())

    ref = store.snapshot_raw([str(first)])
    manifest = json.loads((Path(ref.uri) / "manifest.json").read_text())

    assert manifest["files"] == [
        {
            "uri": str(first),
            "size": first.stat().st_size,
            "sha256": hashlib.sha256(first.read_bytes()).hexdigest(),
        }
    ]
    assert ref.kind == "raw" and ref.parts == 1
    assert store.snapshot_raw([str(copy)]).version == ref.version
    assert store.latest("raw") == ref
    first.write_bytes(b"ts,vehicle_id\n2,v1\n")
    assert store.snapshot_raw([str(first)]).version != ref.version


def test_reports_and_run_manifest(store: DataStore, tmp_path: Path) -> None:
    ref = store.write_dataset("features", A, name="features")

    report_uri = store.write_json("reports", "run-1", "quality.json", {"rows": 3})
    gate_uri = store.write_json("reports", "run-1", "gate", {"passed": True})
    run_uri = store.write_run_manifest(
        "run-1", {"features": ref, "at": datetime(2024, 5, 1, tzinfo=UTC)}
    )

    assert report_uri == str(tmp_path / "data" / "reports" / "run-1" / "quality.json")
    assert gate_uri.endswith("reports/run-1/gate.json")
    assert run_uri == str(tmp_path / "data" / "runs" / "run-1.json")
    manifest = store.read_json(run_uri)
    assert manifest["artifacts"]["features"]["version"] == ref.version
    assert manifest["artifacts"]["features"]["uri"] == ref.uri
    assert manifest["artifacts"]["at"] == "2024-05-01T00:00:00+00:00"


@pytest.mark.parametrize("kind", ["", "../up", "a/b"])
def test_kind_must_be_a_plain_name(store: DataStore, kind: str) -> None:
    with pytest.raises(ValueError, match="no slashes"):
        store.write_dataset(kind, A)


def test_local_root_ignores_object_store_options(tmp_path: Path) -> None:
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}, "key": "k", "secret": "s"}
    store = DataStore(str(tmp_path), options)

    assert store.read_dataset(store.write_dataset("x", A)).equals(A)


def test_parts_staged_by_other_processes_commit_as_one_writer_writes_them(
    store: DataStore, tmp_path: Path
) -> None:
    """Executors stage parts under their own names; the driver commits their digests."""
    one_writer = store.write_dataset("cleaned", [A, B])
    # Another process's view of the same store (what a Spark executor builds).
    executor = DataStore(str(tmp_path / "data"), {})
    staging = store.new_staging()
    staged = [
        executor.stage_part(staging, "part-000007", B.slice(1)),
        executor.stage_part(staging, "part-000002", pl.concat([A, B.head(1)])),
    ]
    ordered = sorted(staged, key=lambda part: part.name)
    staged_ref = store.commit_staged("cleaned", staging, ordered)
    store.discard_staging(staging)

    assert staged_ref.version == one_writer.version
    assert staged_ref.rows == 5 and staged_ref.parts == 1 + 1
    assert store.read_dataset(staged_ref).sort("vehicle_id").equals(pl.concat([A, B]))
    # Committing the same rows again over the existing version leaves its files alone.
    other = store.new_staging()
    fresh = [executor.stage_part(other, "part-000000", pl.concat([B, A]))]
    assert store.commit_staged("cleaned", other, fresh).version == one_writer.version
    store.discard_staging(other)
    assert not (tmp_path / "data" / "_staging").exists() or not any(
        (tmp_path / "data" / "_staging").iterdir()
    )
    assert _files(tmp_path / "data" / "cleaned" / one_writer.version) == [
        "_dataset.json",
        "part-00000.parquet",
        "part-00001.parquet",
    ]
