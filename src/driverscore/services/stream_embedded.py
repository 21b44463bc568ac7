"""The stream processor without Kafka: replay a ping file through the same trip closing.

`driverscore stream --source file PINGS` reads pings in timestamp order (optionally paced
at ``speed`` × real time), cuts them into trips with the same
:class:`~driverscore.domain.sessions.TripAssembler` as the Kafka processor (the whole file
is one partition, its state in memory), and hands the closed sessions to the same
:class:`~driverscore.services.stream.TripScoringStep`. The feature rows, score records,
alerts, shadow records and set-aside trips go to a sink: Parquet files under the home
folder, the score store (answer records, alerts and routes), or memory (tests); the
rollout decisions go to a prediction log, as the service's do. At the end of the file
every open session closes (what the Kafka replay's closing clock does).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from driverscore.adapters.prediction_log import PredictionLog
from driverscore.adapters.score_store import ScoreBatch, ScoreWriter
from driverscore.domain.schema import PING_SCHEMA
from driverscore.domain.sessions import ClosedSession, MemoryScope, SessionRules, TripAssembler
from driverscore.domain.trip_scoring import PredictionRecord
from driverscore.services.stream import ScoredSession, TripScoringStep

__all__ = [
    "EmbeddedRunResult",
    "MemoryScoreSink",
    "ParquetScoreSink",
    "ScoreSink",
    "ScoreStoreSink",
    "TeeSink",
    "run_embedded_stream",
]


class ScoreSink(Protocol):
    """Where the embedded runner writes what a closed session produced."""

    def add(self, scored: ScoredSession) -> None: ...
    def flush(self) -> None: ...


@dataclass
class MemoryScoreSink:
    """Keeps every session's output in memory; ``scores`` etc. concatenate them."""

    sessions: list[ScoredSession] = field(default_factory=list)

    def add(self, scored: ScoredSession) -> None:
        self.sessions.append(scored)

    def flush(self) -> None:
        return None

    @property
    def scores(self) -> pl.DataFrame:
        return _concat(s.records for s in self.sessions)

    @property
    def features(self) -> pl.DataFrame:
        return _concat(s.features for s in self.sessions)

    @property
    def alerts(self) -> pl.DataFrame:
        return _concat(s.alerts for s in self.sessions)

    @property
    def shadow(self) -> pl.DataFrame:
        return _concat(s.shadow for s in self.sessions)

    @property
    def set_aside(self) -> pl.DataFrame:
        return _concat(s.set_aside for s in self.sessions)

    @property
    def decisions(self) -> list[PredictionRecord]:
        return [d for s in self.sessions for d in s.decisions]


def _concat(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
    parts = [f for f in frames if f.height]
    return pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()


class ParquetScoreSink:
    """Parquet part files under ``folder``: ``scores/``, ``trip_features/``, ``alerts/``,
    ``shadow/`` (the other model's records in canary and shadow mode) and ``set_aside/``
    (trips not scored, with the reason).

    Parts are written every ``flush_every`` sessions and on :meth:`flush`; each name carries
    the run's start time, so later runs add files next to earlier ones
    (``pl.scan_parquet(folder / "scores")`` reads them all).
    """

    def __init__(self, folder: Path, flush_every: int = 500) -> None:
        self.folder = folder
        self.flush_every = flush_every
        self._run = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self._parts = itertools.count()
        self._pending: list[ScoredSession] = []
        self.written: list[Path] = []

    def add(self, scored: ScoredSession) -> None:
        self._pending.append(scored)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        part = next(self._parts)
        pending, self._pending = self._pending, []
        for name, frame in (
            ("scores", _concat(s.records for s in pending)),
            ("trip_features", _concat(s.features for s in pending)),
            ("alerts", _concat(s.alerts for s in pending)),
            ("shadow", _concat(s.shadow for s in pending)),
            ("set_aside", _concat(s.set_aside for s in pending)),
        ):
            if frame.height == 0:
                continue
            path = self.folder / name / f"{self._run}-{part:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(path, compression="zstd")
            self.written.append(path)


class ScoreStoreSink:
    """The score store (``adapters/score_store``): answer records, alerts and routes,
    written in batches of ``flush_every`` sessions and on :meth:`flush` (never row by row:
    each write opens the store's file for one transaction)."""

    def __init__(self, store: ScoreWriter, flush_every: int = 500, source: str = "stream") -> None:
        self.store = store
        self.flush_every = flush_every
        self.source = source
        self._pending: list[ScoredSession] = []
        self.records = 0

    def add(self, scored: ScoredSession) -> None:
        self._pending.append(scored)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        batch = ScoreBatch(
            self.source,
            scores=_concat(s.records for s in pending),
            alerts=_concat(s.alerts for s in pending),
            routes=_concat(s.routes for s in pending),
        )
        if len(batch):
            self.records += self.store.write(batch).scores


@dataclass(frozen=True)
class TeeSink:
    """Every session to each of ``sinks``, in order."""

    sinks: tuple[ScoreSink, ...]

    def add(self, scored: ScoredSession) -> None:
        for sink in self.sinks:
            sink.add(scored)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()


@dataclass(frozen=True)
class EmbeddedRunResult:
    """How much one replay read and produced."""

    pings: int
    sessions: int
    trips: int
    alerts: int
    #: Trips (or shadow scores) set aside by scoring, each with its reason in the sink.
    set_aside: int
    #: Pings behind a closed trip (only in a file not in time order per vehicle).
    late_pings: int
    wall_s: float


def _ping_dicts(pings: pl.DataFrame) -> Iterator[dict[str, Any]]:
    """Canonical pings in timestamp order as the decoded-message dicts of the Kafka path."""
    columns = [c for c in PING_SCHEMA if c in pings.columns]
    ordered = (
        pings.select(columns)
        .with_row_index("_row")
        .sort(["ts", "_row"])
        .drop("_row")
        .with_columns(pl.col("ts").dt.epoch("us"))
    )
    for row in ordered.iter_rows(named=True):
        yield {k: v for k, v in row.items() if v is not None}


def run_embedded_stream(
    pings: pl.DataFrame,
    step: TripScoringStep,
    sink: ScoreSink,
    *,
    grace_s: float,
    prediction_log: PredictionLog | None = None,
    score_batch_trips: int = 200,
    profile_flush_s: float = 300.0,
    speed: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> EmbeddedRunResult:
    """Replay canonical ``pings`` through the stream's trip closing and scoring into ``sink``.

    ``speed`` paces the replay: 1.0 is real time, 60.0 a minute of driving per second,
    0 as fast as possible. Trips are cut by the scoring model card's trip rules (``TripConfig``:
    gap, ``max_trip_pings``).
    ``prediction_log`` receives the rollout decisions (set up by the caller; flushed at the
    end). The step's profile writer, when it has one, writes its parts every
    ``profile_flush_s`` of the replay and at the end.
    """
    card = step.scorer.card
    assembler = TripAssembler(SessionRules.of_trips(card.trip_config, grace_s))
    scope = MemoryScope()
    started = clock()
    first_us: int | None = None
    count = sessions = trips = alerts = set_aside = late = 0

    # Paced ("live") replays score each trip as it closes; a replay at full speed scores
    # closed trips in batches, which costs a fraction per trip and gives the same rows.
    batch = 1 if speed > 0 else score_batch_trips
    waiting: list[ClosedSession] = []
    profiles = step.profile_writer
    flushed_at = started

    def close(closed: list[ClosedSession], *, final: bool = False) -> None:
        nonlocal sessions, trips, alerts, set_aside, flushed_at
        waiting.extend(closed)
        if not waiting or (len(waiting) < batch and not final):
            return
        sessions += len(waiting)
        for scored in step.close_sessions(waiting):
            trips += scored.records.height
            alerts += scored.alerts.height
            set_aside += scored.set_aside.height
            sink.add(scored)
            if prediction_log is not None and scored.decisions:
                prediction_log.add(scored.decisions)
        waiting.clear()
        if profiles is not None and clock() - flushed_at >= profile_flush_s:
            profiles.flush()
            flushed_at = clock()

    for ping in _ping_dicts(pings):
        if speed > 0:
            first_us = ping["ts"] if first_us is None else first_us
            ahead = (ping["ts"] - first_us) / 1e6 / speed - (clock() - started)
            if ahead > 0:
                sleep(ahead)
        count += 1
        assembled = assembler.add(scope, str(ping["vehicle_id"]), [ping])
        late += len(assembled.late)
        if assembled.closed:
            close(assembled.closed)
    close(assembler.close_all(scope).closed, final=True)
    sink.flush()
    if prediction_log is not None:
        prediction_log.flush()
    if profiles is not None:
        profiles.flush()
    return EmbeddedRunResult(count, sessions, trips, alerts, set_aside, late, clock() - started)
