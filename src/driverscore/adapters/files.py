"""Write a table to a local path or an object-store URI, the format chosen by the extension."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import PurePosixPath

import fsspec
import polars as pl

from driverscore.errors import ConfigError

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
    """Write ``frame`` to ``uri`` (parquet, csv or jsonl by extension) and return the URI."""
    fmt = table_format(uri)
    buffer = io.BytesIO()
    if fmt == "parquet":
        frame.write_parquet(buffer, compression="zstd", statistics=True)
    elif fmt == "csv":
        _flatten_lists(frame).write_csv(buffer)
    else:
        frame.write_ndjson(buffer)
    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return uri
