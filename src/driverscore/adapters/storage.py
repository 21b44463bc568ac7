"""Versioned, content-addressed datasets on a local directory or an S3 API bucket.

One code path for both: every file operation goes through fsspec, and URIs are plain
strings (``/abs/path/...`` or ``s3://bucket/prefix/...``). The layout is the one in
``docs/design.md``::

    <root>/<kind>/<version>/part-00000.parquet   (or <name>.parquet for a one-part dataset)
    <root>/<kind>/<version>/_dataset.json        commit marker: parts, hashes, row counts
    <root>/<kind>/LATEST                         version most recently written
    <root>/raw/<version>/manifest.json           raw snapshot: source URIs, sizes, sha256
    <root>/<kind>/<run_id>/<name>.json           reports
    <root>/runs/<run_id>.json                    run manifest
    <root>/profiles/<model_version>/...          profile parts (``adapters/profile_parts.py``)

How a write stays bounded in memory and safe to repeat: each part is serialised to
Parquet once, hashed and uploaded to ``<root>/_staging/<token>/``; only the part in hand
is in memory. When the last part is written the version is known: if that version is
already committed (its ``_dataset.json`` exists) the staged copy is deleted, otherwise the
parts are moved under ``<root>/<kind>/<version>/`` and ``_dataset.json`` is written last.
A dataset directory without ``_dataset.json`` is an interrupted write and is never read.

The version is the first 16 hex digits of a sha256 of the dataset's content, not of its
files: the column names and types, the row count and, for each of four seeds, the sum
(mod 2^64) of every row's 64-bit hash (:class:`ContentDigest`). A sum does not depend on
the order it is taken in, so the version is that of the rows as a sorted multiset: the
same rows written in another order or split into other parts (one engine's vehicle
buckets, another's Spark partitions) are the same version, and partial digests of parts
written in different places merge into the whole one. Row hashes are Polars' and are
stable within a Polars version; a Polars upgrade may change the versions of re-written
data. Once a version is committed its files stay as first written.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import fsspec
import numpy as np
import polars as pl

from driverscore.errors import StorageError

__all__ = [
    "ContentDigest",
    "DataStore",
    "DatasetRef",
    "StagedPart",
    "filesystem",
    "join_uri",
    "storage_failure",
]

_VERSION_CHARS: Final = 16
_COMMIT_MARKER: Final = "_dataset.json"
_RAW_MANIFEST: Final = "manifest.json"
_LATEST: Final = "LATEST"
_STAGING: Final = "_staging"
_HASH_CHUNK_BYTES: Final = 8 * 1024 * 1024
_NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")
_LOCAL_PROTOCOLS: Final = ("file", "local")
#: One row hash per seed: four independent 64-bit sums make a 256-bit content digest.
_ROW_HASH_SEEDS: Final = (0, 1, 2, 3)
_SUM_MODULUS: Final = 2**64


def _is_local(uri: str) -> bool:
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return protocol in _LOCAL_PROTOCOLS


def filesystem(uri: str, storage_options: Mapping[str, object]) -> tuple[Any, str]:
    """The fsspec filesystem for ``uri`` and the path inside it.

    Storage options (endpoint, keys) are for object stores; a local path ignores them, so
    one ``Settings.storage_options()`` serves a local data root and an s3:// source alike.
    """
    if _is_local(uri):
        local = fsspec.filesystem("file", auto_mkdir=True)
        return local, str(local._strip_protocol(uri))
    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options))
    return fs, str(path)


_CREDENTIALS_HINT: Final = (
    "set DRIVERSCORE_AWS_ACCESS_KEY_ID and DRIVERSCORE_AWS_SECRET_ACCESS_KEY, or configure "
    "the AWS credential chain (AWS_PROFILE, ~/.aws/credentials, an instance role)"
)


def _endpoint(url: object) -> str:
    """``scheme://host:port`` of a request URL: the endpoint, without bucket and query."""
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else str(url)


def storage_failure(exc: BaseException, where: str = "S3") -> StorageError | None:
    """The object-store failure behind ``exc`` as one actionable line, or None if it is not one.

    botocore raises these below fsspec, which passes them through untranslated: no
    credentials to sign with, an endpoint that refuses or does not answer. ``where`` names
    what the command was reading or writing (its s3:// URIs).
    """
    try:
        from botocore import exceptions as boto  # type: ignore[import-untyped]
    except ImportError:  # no S3 support installed, so no S3 failure
        return None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, boto.NoCredentialsError | boto.PartialCredentialsError):
            return StorageError(f"{where}: no S3 credentials found — {_CREDENTIALS_HINT}")
        if isinstance(current, boto.ConnectTimeoutError | boto.EndpointConnectionError):
            endpoint = _endpoint(current.kwargs.get("endpoint_url", "?"))
            return StorageError(
                f"{where}: cannot connect to the S3 endpoint {endpoint} — check that it is up "
                "and DRIVERSCORE_S3_ENDPOINT_URL (unset for AWS)"
            )
        if isinstance(current, boto.ReadTimeoutError):
            endpoint = _endpoint(current.kwargs.get("endpoint_url", "?"))
            return StorageError(
                f"{where}: the S3 endpoint {endpoint} accepted the connection but did not "
                "answer in time — check the server, or raise DRIVERSCORE_S3_READ_TIMEOUT_S"
            )
        current = current.__cause__ or current.__context__
    return None


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def _check_name(value: str, what: str) -> str:
    if not _NAME_PATTERN.match(value):
        raise ValueError(f"{what} {value!r}: use letters, digits and _ . = - (no slashes)")
    return value


def _json_default(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _json_bytes(obj: object) -> bytes:
    # Sorted keys and a fixed layout: the same object always gives the same bytes.
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default)
    return (text + "\n").encode("utf-8")


def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    # One chunk in, one layout out: the bytes then depend on the rows, not on how they
    # happened to be chunked in memory.
    frame.rechunk().write_parquet(buffer, compression="zstd", statistics=True)
    return buffer.getvalue()


class ContentDigest:
    """What a dataset version hashes: its rows as a multiset, whatever their order or parts.

    ``add`` a frame, or ``merge`` the digest of frames added elsewhere (an executor's);
    ``version`` is the same for the same rows however they were split and ordered. Columns
    are taken in name order, so their order in a frame does not matter either. A frame
    with no rows adds its schema: an empty dataset with columns is not one without.
    """

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        #: schema (name, type) pairs -> [rows, sum per seed]
        self._groups: dict[tuple[tuple[str, str], ...], list[int]] = {}

    def add(self, frame: pl.DataFrame) -> ContentDigest:
        ordered = frame.select(sorted(frame.columns))
        schema = tuple((name, str(dtype)) for name, dtype in ordered.schema.items())
        group = self._groups.setdefault(schema, [0] * (1 + len(_ROW_HASH_SEEDS)))
        group[0] += ordered.height
        if ordered.height == 0:
            return self
        for index, seed in enumerate(_ROW_HASH_SEEDS, start=1):
            # numpy's uint64 sum wraps around: exactly the sum mod 2^64.
            total = int(ordered.hash_rows(seed=seed).to_numpy().sum(dtype=np.uint64))
            group[index] = (group[index] + total) % _SUM_MODULUS
        return self

    def merge(self, other: ContentDigest) -> ContentDigest:
        for schema, values in other._groups.items():
            group = self._groups.setdefault(schema, [0] * len(values))
            group[0] += values[0]
            for index in range(1, len(values)):
                group[index] = (group[index] + values[index]) % _SUM_MODULUS
        return self

    def to_json(self) -> list[Any]:
        """A JSON-able form (what an executor sends back to the driver)."""
        return [[list(map(list, schema)), values] for schema, values in self._groups.items()]

    @classmethod
    def from_json(cls, data: list[Any]) -> ContentDigest:
        digest = cls()
        for schema, values in data:
            key = tuple((str(name), str(dtype)) for name, dtype in schema)
            digest._groups[key] = [int(v) for v in values]
        return digest

    @property
    def rows(self) -> int:
        return sum(values[0] for values in self._groups.values())

    def version(self) -> str:
        listing = sorted(
            json.dumps([list(map(list, schema)), values]) for schema, values in self._groups.items()
        )
        return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:_VERSION_CHARS]


@dataclass(frozen=True, slots=True)
class DatasetRef:
    """A committed dataset: ``uri`` is its version directory."""

    kind: str
    version: str
    uri: str
    rows: int
    parts: int


@dataclass(frozen=True, slots=True)
class StagedPart:
    """A part written to a staging folder, with its rows' :class:`ContentDigest` (JSON)."""

    name: str
    sha256: str
    rows: int
    bytes: int
    digest: list[Any]


@dataclass(frozen=True, slots=True)
class _Part:
    name: str
    sha256: str
    rows: int
    bytes: int


class DataStore:
    """Content-addressed datasets, reports and run manifests under one root URI."""

    def __init__(self, root_uri: str, storage_options: Mapping[str, object]) -> None:
        self._fs, root_path = filesystem(root_uri, storage_options)
        # Local roots become absolute so every URI the store hands out is usable anywhere.
        self.root_uri = root_path if _is_local(root_uri) else root_uri.rstrip("/")
        self._local = _is_local(root_uri)
        self._storage_options = dict(storage_options)

    def __repr__(self) -> str:
        return f"DataStore({self.root_uri!r})"

    # -- paths -------------------------------------------------------------------------

    def _path(self, uri: str) -> str:
        """Path inside the filesystem for a URI under (or outside) the root."""
        return str(self._fs._strip_protocol(uri))

    def _uri(self, *parts: str) -> str:
        return join_uri(self.root_uri, *parts)

    def dataset_uri(self, kind: str, version: str) -> str:
        return self._uri(_check_name(kind, "kind"), _check_name(version, "version"))

    # -- low-level file operations -----------------------------------------------------

    def _write_bytes(self, uri: str, data: bytes) -> None:
        with self._fs.open(self._path(uri), "wb") as handle:
            handle.write(data)

    def _read_bytes(self, uri: str) -> bytes:
        with self._fs.open(self._path(uri), "rb") as handle:
            data: bytes = handle.read()
        return data

    def _exists(self, uri: str) -> bool:
        # s3fs caches listings; another writer may have committed since.
        self._fs.invalidate_cache()
        return bool(self._fs.exists(self._path(uri)))

    def _move(self, source_uri: str, dest_uri: str) -> None:
        if self._local:
            self._fs.makedirs(self._path(dest_uri).rsplit("/", 1)[0], exist_ok=True)
        self._fs.mv(self._path(source_uri), self._path(dest_uri))

    def _remove_tree(self, uri: str) -> None:
        path = self._path(uri)
        self._fs.invalidate_cache()
        if self._fs.exists(path):
            self._fs.rm(path, recursive=True)

    # -- datasets ----------------------------------------------------------------------

    def write_dataset(
        self,
        kind: str,
        parts: Iterable[pl.DataFrame] | pl.DataFrame,
        name: str = "part",
        *,
        set_latest: bool = True,
    ) -> DatasetRef:
        """Write parts as one immutable dataset and return its reference.

        Parts are consumed one at a time (pass a generator to keep memory bounded) and
        read back in the same order. The version is the content's (:class:`ContentDigest`):
        writing the same rows again, in any order or split, returns the same version and
        leaves the stored files untouched.
        """
        _check_name(kind, "kind")
        _check_name(name, "name")
        frames: Iterable[pl.DataFrame] = [parts] if isinstance(parts, pl.DataFrame) else parts
        staging = self.new_staging()
        try:
            staged = [
                self.stage_part(staging, f"{name}-{index:05d}", frame)
                for index, frame in enumerate(frames)
            ]
            return self.commit_staged(kind, staging, staged, name, set_latest=set_latest)
        finally:
            self._remove_tree(staging)

    def new_staging(self) -> str:
        """A fresh staging folder: parts written there become a dataset on commit."""
        return self._uri(_STAGING, uuid.uuid4().hex)

    def stage_part(self, staging: str, stem: str, frame: pl.DataFrame) -> StagedPart:
        """Write one part of a dataset to ``staging`` (any process may: a Spark executor
        does) and return what the commit needs, its content digest included."""
        _check_name(stem, "part")
        data = _parquet_bytes(frame)
        part = StagedPart(
            name=f"{stem}.parquet",
            sha256=hashlib.sha256(data).hexdigest(),
            rows=frame.height,
            bytes=len(data),
            digest=ContentDigest().add(frame).to_json(),
        )
        self._write_bytes(join_uri(staging, part.name), data)
        return part

    def commit_staged(
        self,
        kind: str,
        staging: str,
        staged: list[StagedPart],
        name: str = "part",
        *,
        set_latest: bool = True,
    ) -> DatasetRef:
        """Commit parts staged in ``staging`` (in list order) as one dataset version.

        The version is the merge of the parts' digests, so parts written by many
        processes give the version one process writing the same rows gives. The caller
        removes ``staging`` afterwards (:meth:`discard_staging`).
        """
        _check_name(kind, "kind")
        _check_name(name, "name")
        digest = ContentDigest()
        for part in staged:
            digest.merge(ContentDigest.from_json(part.digest))
        final = self._final_names([_Part(p.name, p.sha256, p.rows, p.bytes) for p in staged], name)
        version = digest.version()
        target = self.dataset_uri(kind, version)
        if not self._exists(join_uri(target, _COMMIT_MARKER)):
            for staged_part, final_part in zip(staged, final, strict=True):
                self._move(join_uri(staging, staged_part.name), join_uri(target, final_part.name))
            marker = {
                "kind": kind,
                "version": version,
                "rows": sum(p.rows for p in final),
                "parts": [asdict(p) for p in final],
                "format": "parquet",
            }
            self._write_bytes(join_uri(target, _COMMIT_MARKER), _json_bytes(marker))
        ref = DatasetRef(
            kind=kind,
            version=version,
            uri=target,
            rows=sum(p.rows for p in final),
            parts=len(final),
        )
        if set_latest:
            self._write_bytes(self._uri(kind, _LATEST), f"{version}\n".encode())
        return ref

    def discard_staging(self, staging: str) -> None:
        """Remove a staging folder and whatever parts are left in it."""
        self._remove_tree(staging)

    @staticmethod
    def _final_names(staged: list[_Part], name: str) -> list[_Part]:
        # The default name always numbers its parts in order (the design's
        # part-00000.parquet), whoever staged them under which name; a named one-part
        # dataset is simply <name>.parquet (features.parquet).
        if len(staged) == 1 and name != "part":
            only = staged[0]
            return [_Part(f"{name}.parquet", only.sha256, only.rows, only.bytes)]
        return [
            _Part(f"{name}-{index:05d}.parquet", p.sha256, p.rows, p.bytes)
            for index, p in enumerate(staged)
        ]

    def dataset(self, kind: str, version: str) -> DatasetRef:
        """The reference of a committed dataset; ``FileNotFoundError`` when there is none."""
        return self._ref_from_uri(self.dataset_uri(kind, version))

    def _marker(self, dataset_uri: str) -> dict[str, Any]:
        marker_uri = join_uri(dataset_uri, _COMMIT_MARKER)
        if not self._exists(marker_uri):
            raise FileNotFoundError(f"{dataset_uri}: no committed dataset here")
        loaded: dict[str, Any] = json.loads(self._read_bytes(marker_uri))
        return loaded

    def _ref_from_uri(self, dataset_uri: str) -> DatasetRef:
        marker = self._marker(dataset_uri)
        return DatasetRef(
            kind=str(marker["kind"]),
            version=str(marker["version"]),
            uri=dataset_uri.rstrip("/"),
            rows=int(marker["rows"]),
            parts=len(marker["parts"]),
        )

    def part_uris(self, ref_or_uri: DatasetRef | str) -> list[str]:
        """Part files of a dataset in read order (a ``.parquet`` URI is its own part)."""
        uri = ref_or_uri.uri if isinstance(ref_or_uri, DatasetRef) else ref_or_uri.rstrip("/")
        if uri.endswith(".parquet"):
            return [uri]
        return [join_uri(uri, str(part["name"])) for part in self._marker(uri)["parts"]]

    def scan_dataset(
        self, ref_or_uri: DatasetRef | str, columns: Iterable[str] | None = None
    ) -> Iterator[pl.DataFrame]:
        """The dataset part by part, in write order: memory holds one part at a time.

        ``columns``: read only those of them a part has (Parquet reads no other column's
        bytes); every column when None.
        """
        wanted = None if columns is None else list(columns)
        for part_uri in self.part_uris(ref_or_uri):
            with self._fs.open(self._path(part_uri), "rb") as handle:
                if wanted is None:
                    yield pl.read_parquet(handle)
                    continue
                present = set(pl.read_parquet_schema(handle))
                handle.seek(0)
                yield pl.read_parquet(handle, columns=[c for c in wanted if c in present])

    def read_dataset(self, ref_or_uri: DatasetRef | str) -> pl.DataFrame:
        """The whole dataset as one frame (an empty frame for a dataset without parts)."""
        frames = list(self.scan_dataset(ref_or_uri))
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames, how="vertical_relaxed")

    def latest(self, kind: str) -> DatasetRef | None:
        """The dataset of ``kind`` written last, or None when there is none yet."""
        pointer = self._uri(_check_name(kind, "kind"), _LATEST)
        if not self._exists(pointer):
            return None
        version = self._read_bytes(pointer).decode().strip()
        if kind == "raw":
            return self._raw_ref(version)
        return self.dataset(kind, version)

    def versions(self, kind: str) -> list[DatasetRef]:
        """Every committed dataset of ``kind`` (interrupted writes left out), by version."""
        base = self._path(self._uri(_check_name(kind, "kind")))
        self._fs.invalidate_cache()
        if not self._fs.exists(base):
            return []
        refs: list[DatasetRef] = []
        for entry in sorted(self._fs.ls(base, detail=False)):
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name == _LATEST or not _NAME_PATTERN.match(name):
                continue
            try:
                refs.append(self._ref_from_uri(self._uri(kind, name)))
            except FileNotFoundError:
                continue
        return refs

    def report_uris(self, kind: str, name: str) -> list[str]:
        """URIs of ``<root>/<kind>/<run_id>/<name>`` for every run that wrote one, by run id."""
        base = self._path(self._uri(_check_name(kind, "kind")))
        self._fs.invalidate_cache()
        if not self._fs.exists(base):
            return []
        found = self._fs.glob(f"{base}/*/{_check_name(name, 'name')}")
        run_ids = sorted(str(path).rstrip("/").split("/")[-2] for path in found)
        return [self._uri(kind, run_id, name) for run_id in run_ids]

    def run_manifests(self) -> list[dict[str, Any]]:
        """Every run manifest (``runs/<run_id>.json``), by run id."""
        base = self._path(self._uri("runs"))
        self._fs.invalidate_cache()
        if not self._fs.exists(base):
            return []
        paths = sorted(str(p) for p in self._fs.glob(f"{base}/*.json"))
        return [
            json.loads(self._read_bytes(self._uri("runs", p.rsplit("/", 1)[-1]))) for p in paths
        ]

    def write_text(self, kind: str, run_id: str, name: str, text: str) -> str:
        """Write a text file (an HTML report) to ``<root>/<kind>/<run_id>/<name>``."""
        uri = self._uri(
            _check_name(kind, "kind"), _check_name(run_id, "run id"), _check_name(name, "name")
        )
        self._write_bytes(uri, text.encode("utf-8"))
        return uri

    # -- plain objects (profile parts) ---------------------------------------------------

    def object_uri(self, *parts: str) -> str:
        """``<root>/<part>/<part>/...``, each part a plain name (no slashes)."""
        return self._uri(*(_check_name(p, "path part") for p in parts))

    def write_object(self, uri: str, data: bytes) -> None:
        """Write ``data`` at ``uri`` so that no reader ever sees part of it: a local file is
        written beside and renamed; an object store's put is whole already."""
        if not self._local:
            self._write_bytes(uri, data)
            return
        path = self._path(uri)
        folder, name = path.rsplit("/", 1)
        self._fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with self._fs.open(tmp, "wb") as handle:
            handle.write(data)
        Path(tmp).replace(path)

    def read_object(self, uri: str) -> bytes:
        return self._read_bytes(uri)

    def list_objects(self, uri: str, suffix: str = "") -> list[str]:
        """URIs of the files directly under the folder ``uri`` whose name ends with
        ``suffix``, by name (none when the folder does not exist; files being written are
        not listed)."""
        path = self._path(uri)
        self._fs.invalidate_cache()
        if not self._fs.exists(path):
            return []
        names = sorted(
            str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in self._fs.ls(path, detail=False)
        )
        return [
            join_uri(uri, name)
            for name in names
            if name.endswith(suffix) and not name.startswith(".")
        ]

    # -- raw snapshots -----------------------------------------------------------------

    def snapshot_raw(
        self, sources: list[str], storage_options: Mapping[str, object] | None = None
    ) -> DatasetRef:
        """Record each source's URI, size and sha256 in ``raw/<version>/manifest.json``.

        The version hashes the sources' bytes only, not where they were read from: the
        same files copied elsewhere are the same raw data. The first manifest written for
        a version stays (datasets are immutable); each run manifest records its own
        sources. Files are hashed as streams, never loaded whole. ``storage_options``
        are for sources on another store (default: this store's).
        """
        files = [self._describe_source(uri, storage_options) for uri in sorted(sources)]
        listing = "".join(f"{f['sha256']}\n" for f in sorted(files, key=lambda f: f["sha256"]))
        version = hashlib.sha256(listing.encode()).hexdigest()[:_VERSION_CHARS]
        target = self.dataset_uri("raw", version)
        manifest_uri = join_uri(target, _RAW_MANIFEST)
        if not self._exists(manifest_uri):
            manifest = {"kind": "raw", "version": version, "files": files}
            self._write_bytes(manifest_uri, _json_bytes(manifest))
        self._write_bytes(self._uri("raw", _LATEST), f"{version}\n".encode())
        return DatasetRef(kind="raw", version=version, uri=target, rows=0, parts=len(files))

    def _describe_source(
        self, uri: str, storage_options: Mapping[str, object] | None
    ) -> dict[str, Any]:
        options = self._storage_options if storage_options is None else storage_options
        fs, path = filesystem(uri, options)
        digest = hashlib.sha256()
        size = 0
        with fs.open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
        return {"uri": uri, "size": size, "sha256": digest.hexdigest()}

    def _raw_ref(self, version: str) -> DatasetRef:
        target = self.dataset_uri("raw", version)
        manifest_uri = join_uri(target, _RAW_MANIFEST)
        if not self._exists(manifest_uri):
            raise FileNotFoundError(f"{target}: no raw snapshot here")
        manifest = json.loads(self._read_bytes(manifest_uri))
        return DatasetRef(
            kind="raw", version=version, uri=target, rows=0, parts=len(manifest["files"])
        )

    # -- reports and run manifests -----------------------------------------------------

    def write_json(self, kind: str, run_id: str, name: str, obj: object) -> str:
        """Write ``obj`` to ``<root>/<kind>/<run_id>/<name>.json`` and return its URI."""
        file_name = name if name.endswith(".json") else f"{name}.json"
        uri = self._uri(
            _check_name(kind, "kind"), _check_name(run_id, "run id"), _check_name(file_name, "name")
        )
        self._write_bytes(uri, _json_bytes(obj))
        return uri

    def write_run_manifest(self, run_id: str, artifacts: Mapping[str, object]) -> str:
        """Write ``<root>/runs/<run_id>.json``: every artifact of the run, refs as dicts."""
        uri = self._uri("runs", f"{_check_name(run_id, 'run id')}.json")
        self._write_bytes(uri, _json_bytes({"run_id": run_id, "artifacts": dict(artifacts)}))
        return uri

    def read_json(self, uri: str) -> Any:
        return json.loads(self._read_bytes(uri))
