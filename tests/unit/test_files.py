"""Output tables: written whole or not at all, and failures said in one line."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from driverscore.adapters.files import write_table
from driverscore.adapters.storage import storage_failure
from driverscore.errors import StorageError

SCORES = pl.DataFrame({"trip_id": ["t1", "t2"], "score": [91.0, 48.5]})


@pytest.mark.parametrize("name", ["scores.csv", "scores.parquet", "scores.jsonl"])
def test_output_replaces_the_old_file_instead_of_writing_into_it(tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    target.write_bytes(b"old scores")
    # A second name for the old file: a reader that opened it before the write. Written
    # in place, it would see the new bytes arrive (and a half file meanwhile).
    reader_view = tmp_path / f"reader-{name}"
    os.link(target, reader_view)

    write_table(SCORES, str(target), {})

    assert reader_view.read_bytes() == b"old scores"
    assert target.read_bytes() != b"old scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, reader_view.name])


def test_output_folder_is_created(tmp_path: Path) -> None:
    target = tmp_path / "new" / "folder" / "scores.csv"
    write_table(SCORES, str(target), {})
    assert pl.read_csv(target)["trip_id"].to_list() == ["t1", "t2"]


def test_unwritable_output_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match=r"a-file/scores\.csv: cannot write the output"):
        write_table(SCORES, str(blocker / "scores.csv"), {})


def test_missing_credentials_say_what_to_set() -> None:
    failure = storage_failure(NoCredentialsError(), where="s3://bucket/pings")
    assert failure is not None
    assert str(failure).startswith("s3://bucket/pings: no S3 credentials found — set ")
    assert "DRIVERSCORE_AWS_ACCESS_KEY_ID" in str(failure)


def test_unreachable_endpoint_names_the_endpoint_not_the_request() -> None:
    error = EndpointConnectionError(
        endpoint_url="http://127.0.0.1:9/bucket?list-type=2&prefix=x", error="refused"
    )
    failure = storage_failure(error, where="s3://bucket/x")
    assert failure is not None
    assert "cannot connect to the S3 endpoint http://127.0.0.1:9 —" in str(failure)
    assert "list-type" not in str(failure)


def test_a_storage_failure_is_found_behind_a_wrapping_error() -> None:
    try:
        try:
            raise ReadTimeoutError(endpoint_url="http://minio:9000/b/k", error="slow")
        except ReadTimeoutError as inner:
            raise RuntimeError("while writing") from inner
    except RuntimeError as outer:
        failure = storage_failure(outer)
    assert failure is not None
    assert "http://minio:9000 accepted the connection but did not answer" in str(failure)


def test_other_errors_are_not_storage_failures() -> None:
    assert storage_failure(ValueError("a bug")) is None
