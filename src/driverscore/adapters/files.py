"""Write a table to a local path or an object-store URI, the format chosen by the extension."""

from __future__ import annotations

import io
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import polars as pl
from fsspec.implementations.local import LocalFileSystem

from driverscore.adapters.storage import filesystem, storage_failure
from driverscore.errors import ConfigError, StorageError

WRITABLE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def table_format(uri: str) -> str:
    suffix = PurePosixPath(uri.split("?", 1)[0]).suffix.lower()
    try:
        return WRITABLE_FORMATS[suffix]
    except KeyError:
        allowed = ", ".join(sorted(WRITABLE_FORMATS))
        raise ConfigError(
            f"{uri}: unknown output format '{suffix}' — use one of {allowed}"
        ) from None


def _flatten_lists(frame: pl.DataFrame) -> pl.DataFrame:
    """CSV has no list type: list columns (reasons) become '; '-joined text."""
    list_columns = [name for name, dtype in frame.schema.items() if isinstance(dtype, pl.List)]
    if not list_columns:
        return frame
    return frame.with_columns(pl.col(c).list.join("; ") for c in list_columns)


def write_table(frame: pl.DataFrame, uri: str, storage_options: Mapping[str, object]) -> str:
    """Write ``frame`` to ``uri`` (parquet, csv or jsonl by extension) and return the URI.

    A reader never sees a half-written file: a local file is written beside the target and
    renamed over it; an object store makes an object visible only once its upload is
    complete (one PUT, or the completion of a multipart upload), so it is written directly.
    """
    fmt = table_format(uri)
    buffer = io.BytesIO()
    if fmt == "parquet":
        frame.write_parquet(buffer, compression="zstd", statistics=True)
    elif fmt == "csv":
        _flatten_lists(frame).write_csv(buffer)
    else:
        frame.write_ndjson(buffer)
    fs, path = filesystem(uri, storage_options)
    try:
        if isinstance(fs, LocalFileSystem):
            _replace_local(Path(path), buffer.getvalue())
        else:
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            if parent:
                fs.makedirs(parent, exist_ok=True)
            with fs.open(path, "wb") as handle:
                handle.write(buffer.getvalue())
    except Exception as exc:
        failure = storage_failure(exc, where=uri)
        if failure is not None:
            raise failure from None
        if isinstance(exc, OSError):
            raise StorageError(
                f"{uri}: cannot write the output ({exc.strerror or exc}) — check that the "
                "folder exists or can be created, and is writable"
            ) from None
        raise
    return uri


def _replace_local(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the rename stays on one filesystem and is atomic.
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temporary.write_bytes(data)
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)
