"""Profile parts written as trips are scored, by every writer of trip records.

Batch scoring (``pipelines/scoring_run.py``) profiles the records of the ``scores`` dataset
it wrote, one part per model version and hour of trip end (:func:`write_scores_profiles`).
The service and the stream processor hand their scored trips to a :class:`ProfileWriter`
(a list append on the scoring path), which profiles what waits and writes parts, with the
trips' key columns beside them, every ``monitoring.profile_flush_s`` and when the process
stops. Records are only ever scored by ``domain/trip_scoring.py``; this module profiles
what it produced, on the edges of the scoring model version's reference profile.

A model version without a reference profile yet (registered before profiles existed, until
the first ``driverscore monitor`` builds it): batch scoring leaves its trips to the monitor,
which profiles the ``scores`` dataset once; the service and the stream keep the trips (at
most ``max_pending`` rows, the rest dropped and counted) and ask for the reference again
every ``retry_s``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import polars as pl

from driverscore.adapters.profile_parts import ProfilePartStore
from driverscore.adapters.storage import DatasetRef, DataStore
from driverscore.domain.profiles import TripProfile, profile_trips_by_hour
from driverscore.services.live_monitor import ReferenceSource
from driverscore.settings import Settings

__all__ = [
    "FlushResult",
    "PartsNotWrittenError",
    "PeriodicFlush",
    "ProfileWriter",
    "ReferenceCache",
    "build_profile_writer",
    "write_profile_parts",
    "write_scores_profiles",
]

_log = logging.getLogger("driverscore.monitor")
_MAX_PENDING: Final = 200_000


class ReferenceCache:
    """Reference profiles by model version, from ``loader`` (JSON bytes or None); a version
    that had none is asked again after ``retry_s``, a failing loader is logged."""

    def __init__(
        self,
        loader: Callable[[str], bytes | None],
        retry_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loader = loader
        self.retry_s = retry_s
        self._clock = clock
        self._loaded: dict[str, TripProfile] = {}
        self._missing_at: dict[str, float] = {}

    def __call__(self, version: str) -> TripProfile | None:
        found = self._loaded.get(version)
        if found is not None:
            return found
        asked = self._missing_at.get(version)
        now = self._clock()
        if asked is not None and now - asked < self.retry_s:
            return None
        self._missing_at[version] = now
        try:
            stored = self._loader(version)
        except Exception:
            _log.exception("reference profile of version %s could not be loaded", version)
            return None
        if stored is None:
            _log.warning(
                "model version %s has no reference profile yet: its trips wait for it "
                "(driverscore monitor builds it once from the version's lineage)",
                version,
            )
            return None
        profile = TripProfile.from_json(stored)
        self._loaded[version] = profile
        self._missing_at.pop(version, None)
        return profile


def write_profile_parts(
    parts: ProfilePartStore,
    records: pl.DataFrame,
    reference: TripProfile,
    *,
    version: str,
    part_id: str,
    source: Mapping[str, Any],
    with_keys: bool,
) -> list[str]:
    """Profile ``version``'s ``records`` per hour of trip end and store one part per hour
    (with the trips' key columns when ``with_keys``); the parts' URIs."""
    hourly = profile_trips_by_hour(records, reference.edges)
    sha = reference.sha256()
    hours = (
        records.with_columns(
            _hour=pl.col("end_ts").cast(pl.Datetime("us", "UTC")).dt.truncate("1h")
        )
        if with_keys and hourly
        else None
    )
    written: list[str] = []
    ordered = sorted(hourly.items())
    for k, (hour, profile) in enumerate(ordered):
        keys = hours.filter(pl.col("_hour") == hour).drop("_hour") if hours is not None else None
        try:
            written.append(
                parts.write_part(version, hour, part_id, profile, sha, source, keys=keys)
            )
        except Exception as exc:
            raise PartsNotWrittenError(written, {h for h, _ in ordered[k:]}) from exc
    return written


class PartsNotWrittenError(Exception):
    """Writing parts failed part way: ``written`` are stored, the trips of ``hours`` not."""

    def __init__(self, written: list[str], hours: set[datetime]) -> None:
        super().__init__(f"{len(hours)} hours of profile parts not written")
        self.written = written
        self.hours = hours


def write_scores_profiles(
    parts: ProfilePartStore,
    scores: pl.DataFrame,
    scores_ref: DatasetRef,
    references: Mapping[str, TripProfile],
) -> dict[str, list[str]]:
    """The parts of a ``scores`` dataset: for each model version in ``references``, its
    trips' parts (none when it has no trips there), then the mark that says the dataset's
    trips of that version are in parts. Writing the same dataset again writes the same
    parts (their names carry the dataset version)."""
    written: dict[str, list[str]] = {}
    has_version = "model_version" in scores.columns
    for version, reference in references.items():
        rows = scores.filter(pl.col("model_version") == version) if has_version else scores.clear()
        written[version] = write_profile_parts(
            parts,
            rows,
            reference,
            version=version,
            part_id=f"scores-{scores_ref.version}",
            source={"kind": "scores", "scores": scores_ref.uri},
            with_keys=False,
        )
        parts.mark_scores(version, scores_ref.version, written[version])
    return written


@dataclass(frozen=True)
class FlushResult:
    """What one flush wrote, and what it could not profile yet."""

    parts: list[str] = field(default_factory=list)
    rows_profiled: int = 0
    #: Trips of model versions without a reference profile yet (kept for the next flush).
    rows_waiting: int = 0
    #: Trips without an end time: in no hour, so in no window (as they never were).
    rows_without_end: int = 0


class ProfileWriter:
    """Scored trips of a long-running process → profile parts in the data store.

    :meth:`observe` (records) and :meth:`observe_later` (answers turned into records only
    when flushed) cost the scoring path a list append; :meth:`flush`, from a background
    thread and at shutdown, profiles what waits and writes the parts. ``source`` names the
    writer in each part (``service``, ``stream``).
    """

    def __init__(
        self,
        parts: ProfilePartStore,
        references: Callable[[str], TripProfile | None],
        *,
        source: Mapping[str, Any],
        max_pending: int = _MAX_PENDING,
    ) -> None:
        self.parts = parts
        self.references = references
        self.source = dict(source)
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: list[pl.DataFrame] = []
        self._lazy: list[tuple[Sequence[Any], Callable[[Sequence[Any]], pl.DataFrame]]] = []
        self._pending_rows = 0
        #: Trips dropped because too many waited (a reference that never came, a store
        #: that stayed down); logged, never silent.
        self.dropped_rows = 0
        self.rows_without_end = 0

    def _admit(self, rows: int) -> bool:
        if self._pending_rows + rows > self.max_pending:
            if self.dropped_rows == 0:
                _log.error(
                    "profile parts: more than %d trips wait to be profiled; dropping new ones "
                    "(is the data store reachable, has the champion a reference profile?)",
                    self.max_pending,
                )
            self.dropped_rows += rows
            return False
        self._pending_rows += rows
        return True

    def observe(self, records: pl.DataFrame) -> None:
        """Trip score records (``TRIP_RECORD_SCHEMA`` columns) this process answered."""
        if records.height == 0:
            return
        with self._lock:
            if self._admit(records.height):
                self._pending.append(records)

    def observe_later(
        self, items: Sequence[Any], to_records: Callable[[Sequence[Any]], pl.DataFrame]
    ) -> None:
        """Answers in any shape, turned into records by ``to_records`` when flushed."""
        if not items:
            return
        with self._lock:
            if self._admit(len(items)):
                self._lazy.append((items, to_records))

    def flush(self) -> FlushResult:
        """Write the parts of every trip waiting whose version has a reference profile."""
        with self._flush_lock:
            with self._lock:
                pending, lazy = self._pending, self._lazy
                self._pending, self._lazy, self._pending_rows = [], [], 0
            frames = [f for f in pending if f.height]
            frames += [frame for items, convert in lazy if (frame := convert(items)).height]
            if not frames:
                return FlushResult()
            records = pl.concat(frames, how="diagonal_relaxed")
            return self._write(records)

    def _write(self, records: pl.DataFrame) -> FlushResult:
        without_end = records.filter(pl.col("end_ts").is_null()).height
        self.rows_without_end += without_end
        records = records.filter(pl.col("end_ts").is_not_null())
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        part_id = f"{self.source.get('kind', 'process')}-{stamp}-{uuid.uuid4().hex[:8]}"
        written: list[str] = []
        waiting: list[pl.DataFrame] = []
        profiled = 0
        failure: Exception | None = None
        for (version,), rows in records.group_by("model_version", maintain_order=True):
            reference = self.references(str(version)) if failure is None else None
            if reference is None:
                waiting.append(rows)
                continue
            try:
                written += write_profile_parts(
                    self.parts,
                    rows,
                    reference,
                    version=str(version),
                    part_id=part_id,
                    source=self.source,
                    with_keys=True,
                )
                profiled += rows.height
            except PartsNotWrittenError as exc:
                # The hours written stay; the trips of the others wait for the next flush
                # (so no trip is counted twice, none lost while the store is down).
                failure = exc
                written += exc.written
                hour = pl.col("end_ts").cast(pl.Datetime("us", "UTC")).dt.truncate("1h")
                unwritten = rows.filter(hour.is_in(sorted(exc.hours)))
                profiled += rows.height - unwritten.height
                waiting.append(unwritten)
        rows_waiting = sum(f.height for f in waiting)
        if waiting:
            with self._lock:
                kept = pl.concat(waiting, how="diagonal_relaxed")
                if self._admit(kept.height):
                    self._pending.append(kept)
        if failure is not None:
            raise failure.__cause__ or failure
        return FlushResult(written, profiled, rows_waiting, without_end)


def build_profile_writer(
    settings: Settings, registry_factory: Callable[[], Any], kind: str
) -> ProfileWriter:
    """The profile writer of a long-running process (``kind``: ``service`` or ``stream``):
    parts in the settings' data store, references from the registry the process uses."""
    store = DataStore(settings.resolved_data_uri, settings.storage_options())
    return ProfileWriter(
        ProfilePartStore(store),
        ReferenceCache(ReferenceSource(registry_factory)),
        source={"kind": kind, "host": socket.gethostname(), "pid": os.getpid()},
    )


class PeriodicFlush:
    """Flushes a :class:`ProfileWriter` every ``interval_s`` on a thread of its own, and
    once more on :meth:`stop`; a failed flush is logged and tried again next time."""

    def __init__(self, writer: ProfileWriter, interval_s: float) -> None:
        self.writer = writer
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profile-parts", daemon=True)

    def start(self) -> PeriodicFlush:
        self._thread.start()
        return self

    def flush(self) -> None:
        try:
            self.writer.flush()
        except Exception:
            _log.exception("profile parts could not be written; the trips wait for the next flush")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.flush()
