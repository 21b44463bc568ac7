"""`driverscore import`: telemetry in another layout or units -> canonical ping Parquet.

Sources are read and mapped one at a time, so memory holds one source file. Rows whose
values do not parse are not dropped: they go to a rejects file next to the output with
their reason and original values, and ``rows_in == rows_out + rows_rejected`` always holds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import polars as pl
import pyarrow.parquet as pq

from driverscore.adapters.readers import list_sources, no_rows_error, read_table, read_text
from driverscore.adapters.storage import filesystem, join_uri
from driverscore.domain.mapping import ColumnMapping, apply_mapping

__all__ = ["ImportResult", "import_telemetry", "load_mapping", "rejects_uri_for"]

_PART_FILE: Final = re.compile(r"^part-\d{5}\.parquet$")


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What one import read and wrote."""

    sources: tuple[str, ...]
    dest: str
    rows_in: int
    rows_out: int
    rows_rejected: int
    #: The rejects file, or None when every row was imported.
    rejects_uri: str | None


def load_mapping(uri: str, storage_options: Mapping[str, object]) -> ColumnMapping:
    """A mapping file from a local path or an s3:// URI."""
    return ColumnMapping.from_yaml_text(read_text(uri, storage_options), where=uri)


def rejects_uri_for(dest: str) -> str:
    """``out/pings.parquet`` -> ``out/pings.rejects.parquet``; ``out/pings/`` likewise."""
    base = dest.rstrip("/")
    base = base.removesuffix(".parquet")
    return f"{base}.rejects.parquet"


class _ParquetFileSink:
    """Appends each source's pings to one Parquet file as its own row group."""

    def __init__(self, dest: str, storage_options: Mapping[str, object]) -> None:
        self._fs, self._path = filesystem(dest, storage_options)
        self._handle: Any = None
        self._writer: pq.ParquetWriter | None = None

    def add(self, pings: pl.DataFrame) -> None:
        table = pings.to_arrow()
        if self._writer is None:
            self._handle = self._fs.open(self._path, "wb")
            self._writer = pq.ParquetWriter(self._handle, table.schema, compression="zstd")
        self._writer.write_table(table.cast(self._writer.schema))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._handle is not None:
            self._handle.close()


class _ParquetFolderSink:
    """Writes each source's pings to ``part-NNNNN.parquet`` in the destination folder."""

    def __init__(self, dest: str, storage_options: Mapping[str, object]) -> None:
        self._fs, path = filesystem(dest.rstrip("/"), storage_options)
        self._path = str(path).rstrip("/")
        self._count = 0
        # Parts of an earlier import would silently mix with this one's; other files in
        # the folder are left alone.
        self._fs.invalidate_cache()
        if self._fs.isdir(path):
            for existing in self._fs.ls(path, detail=False):
                if _PART_FILE.match(str(existing).rsplit("/", 1)[-1]):
                    self._fs.rm(existing)

    def add(self, pings: pl.DataFrame) -> None:
        path = join_uri(self._path, f"part-{self._count:05d}.parquet")
        with self._fs.open(path, "wb") as handle:
            pings.write_parquet(handle, compression="zstd", statistics=True)
        self._count += 1

    def close(self) -> None:
        return None


def import_telemetry(
    src: str,
    mapping: ColumnMapping | None,
    dest: str,
    storage_options: Mapping[str, object],
) -> ImportResult:
    """Read every source under ``src``, map it to canonical pings and write them to ``dest``.

    ``dest`` ending in ``.parquet`` is one file; anything else is a folder of
    ``part-NNNNN.parquet`` files, one per source. Rejected rows go to
    :func:`rejects_uri_for` ``(dest)``; a stale rejects file from an earlier import is
    removed when this one rejects nothing.
    """
    sources = list_sources(src, storage_options)
    fmt = mapping.format if mapping is not None else None
    delimiter = mapping.delimiter if mapping is not None else ","
    single_file = dest.rstrip("/").endswith(".parquet")
    sink: _ParquetFileSink | _ParquetFolderSink = (
        _ParquetFileSink(dest, storage_options)
        if single_file
        else _ParquetFolderSink(dest, storage_options)
    )
    rows_in = rows_out = 0
    rejects: list[pl.DataFrame] = []
    try:
        for source in sources:
            raw = read_table(source, fmt, storage_options, delimiter=delimiter)
            if raw.height == 0:
                continue  # a header-only source: nothing to write (all empty: an error below)
            mapped = apply_mapping(raw, mapping, source)
            sink.add(mapped.pings)
            rows_in += raw.height
            rows_out += mapped.pings.height
            if mapped.rejected.height:
                rejects.append(mapped.rejected)
    finally:
        sink.close()
    if rows_in == 0:
        raise no_rows_error(src, sources)

    rejects_uri: str | None = rejects_uri_for(dest)
    fs, rejects_path = filesystem(rejects_uri_for(dest), storage_options)
    if rejects:
        with fs.open(rejects_path, "wb") as handle:
            pl.concat(rejects).write_parquet(handle, compression="zstd")
    else:
        fs.invalidate_cache()
        if fs.exists(rejects_path):
            fs.rm(rejects_path)
        rejects_uri = None
    rows_rejected = sum(r.height for r in rejects)
    return ImportResult(
        sources=tuple(sources),
        dest=dest,
        rows_in=rows_in,
        rows_out=rows_out,
        rows_rejected=rows_rejected,
        rejects_uri=rejects_uri,
    )
