"""Read telemetry tables (CSV, Parquet, JSON Lines) from a local path or an s3:// URI.

CSV columns are read as text: the column mapping, not a type guess over the first rows,
decides what each column is, so a stray "n/a" in row 90 000 rejects that row instead of
failing the file or turning a numeric column into text. Parquet and JSON keep their own
types. Every problem with a file as a whole is an :class:`InputDataError` on one line.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any, Final

import polars as pl

from driverscore.adapters.storage import filesystem
from driverscore.errors import InputDataError

__all__ = [
    "SUPPORTED_FORMATS",
    "list_sources",
    "no_rows_error",
    "read_table",
    "read_text",
    "table_format",
]

#: File extensions and the format they imply (``.gz`` etc. are decompressed first).
SUPPORTED_FORMATS: Final[dict[str, str]] = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
_FORMAT_ALIASES: Final[dict[str, str]] = {"ndjson": "jsonl", "json": "jsonl"}
_COMPRESSIONS: Final = (".gz", ".bz2", ".xz", ".zst", ".zstd")
_GLOB_CHARS: Final = ("*", "?", "[")
_MAX_DETAIL_CHARS: Final = 160


def _suffixes(uri: str) -> tuple[str, str | None]:
    """The format-bearing suffix and the compression suffix (or None)."""
    name = PurePosixPath(uri.split("?", 1)[0]).name.lower()
    path = PurePosixPath(name)
    if path.suffix in _COMPRESSIONS:
        return PurePosixPath(path.stem).suffix, path.suffix
    return path.suffix, None


def table_format(uri: str, fmt: str | None = None) -> str:
    """``csv``, ``parquet`` or ``jsonl``: the given format, else the file extension's."""
    if fmt is not None:
        normalised = _FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
        if normalised not in ("csv", "parquet", "jsonl"):
            raise InputDataError(f"{uri}: unknown format {fmt!r} — use csv, parquet or jsonl")
        return normalised
    suffix, _ = _suffixes(uri)
    if suffix not in SUPPORTED_FORMATS:
        raise InputDataError(
            f"{uri}: cannot tell the format from the extension {suffix or '(none)'!r} — "
            "set format: csv, parquet or jsonl in the mapping file"
        )
    return SUPPORTED_FORMATS[suffix]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= _MAX_DETAIL_CHARS else text[: _MAX_DETAIL_CHARS - 1] + "…"


def _read_bytes(uri: str, storage_options: Mapping[str, object]) -> bytes:
    fs, path = filesystem(uri, storage_options)
    _, compression = _suffixes(uri)
    try:
        with fs.open(path, "rb", compression="infer" if compression else None) as handle:
            data: bytes = handle.read()
    except FileNotFoundError:
        raise InputDataError(f"{uri}: file not found — check the path") from None
    except IsADirectoryError:
        raise InputDataError(f"{uri}: is a folder, not a file") from None
    except PermissionError:
        raise InputDataError(f"{uri}: permission denied — check access rights") from None
    except OSError as exc:
        raise InputDataError(f"{uri}: cannot be read ({_one_line(exc)})") from None
    return data


def read_text(uri: str, storage_options: Mapping[str, object]) -> str:
    """A small text file (a mapping file) from a path or URI."""
    data = _read_bytes(uri, storage_options)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputDataError(f"{uri}: not UTF-8 text") from None


def _read_json(data: bytes) -> pl.DataFrame:
    # A .json file may be JSON Lines or one array of objects; the first byte tells.
    if data.lstrip()[:1] == b"[":
        return pl.read_json(io.BytesIO(data), infer_schema_length=None)
    # Inferring over all rows: a field that is a number in one line and text in another
    # becomes text, and the mapping then rejects just the rows that do not parse.
    return pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)


def read_table(
    uri: str,
    fmt: str | None,
    storage_options: Mapping[str, object],
    *,
    delimiter: str = ",",
) -> pl.DataFrame:
    """Read one table; CSV columns come back as text for the column mapping to parse."""
    table_fmt = table_format(uri, fmt)
    data = _read_bytes(uri, storage_options)
    if not data.strip():
        raise InputDataError(f"{uri}: file is empty — nothing to import")
    try:
        frame: pl.DataFrame
        if table_fmt == "csv":
            separator = "\t" if delimiter == "," and _suffixes(uri)[0] == ".tsv" else delimiter
            # utf8-lossy: a stray byte spoils one value (which then fails to parse and is
            # rejected with its row), not the whole file.
            frame = pl.read_csv(
                data, infer_schema=False, separator=separator, encoding="utf8-lossy"
            )
        elif table_fmt == "parquet":
            frame = pl.read_parquet(io.BytesIO(data))
        else:
            frame = _read_json(data)
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise InputDataError(
            f"{uri}: cannot be read as {table_fmt} ({_one_line(exc)}) — "
            "check the file, or set format: in the mapping file"
        ) from None
    if frame.width == 0:
        raise InputDataError(f"{uri}: no columns found — is it really {table_fmt}?")
    return frame


def no_rows_error(uri: str, sources: list[str]) -> InputDataError:
    """Telemetry at ``uri`` with column names and no rows: nothing to import, train or score.

    Said as an error rather than an empty result, so that an export that came out empty
    does not pass for a quiet day (and a scheduler sees it).
    """
    if len(sources) == 1:
        has = "a header" if table_format(sources[0]) == "csv" else "columns"
        return InputDataError(f"no pings in {uri}: the file has {has} and no rows")
    return InputDataError(f"no pings in {uri}: its {len(sources)} files have no rows")


def _is_data_file(path: str, root: str) -> bool:
    relative = path[len(root) :].strip("/") if path.startswith(root) else path
    # Hidden and underscore files (.DS_Store, _SUCCESS, _staging/) are not data.
    if any(part.startswith((".", "_")) for part in relative.split("/")):
        return False
    suffix, _ = _suffixes(path)
    return suffix in SUPPORTED_FORMATS


def list_sources(uri: str, storage_options: Mapping[str, object]) -> list[str]:
    """The data files at ``uri``: the file itself, the files under a folder or prefix
    (recursively), or the files matching a glob, as sorted URIs."""
    fs, path = filesystem(uri, storage_options)
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    local = protocol in ("", "file://", "local://")

    def as_uri(found: str) -> str:
        return found if local else protocol + found.lstrip("/")

    fs.invalidate_cache()
    found: list[str]
    if any(char in path for char in _GLOB_CHARS):
        root = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rsplit("/", 1)[0]
        matches: Any = fs.glob(path)
        found = [m for m in matches if fs.isfile(m) and _is_data_file(m, root)]
    elif fs.isdir(path):
        found = [m for m in fs.find(path) if _is_data_file(m, path)]
    elif fs.exists(path):
        # Local paths come back absolute: the raw snapshot records where data came from.
        return [path if local else uri]
    else:
        raise InputDataError(f"{uri}: no such file or folder — check the path")
    if not found:
        kinds = ", ".join(SUPPORTED_FORMATS)
        raise InputDataError(f"{uri}: no data files found (looked for {kinds})")
    return sorted(as_uri(str(m)) for m in found)
