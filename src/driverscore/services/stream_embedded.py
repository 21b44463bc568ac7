"""The stream processor without Kafka: replay a ping file through the same trip closing.

`driverscore stream --source file PINGS` reads pings in timestamp order (optionally paced
at ``speed`` × real time), cuts them per vehicle into session windows with the rules of
the Kafka processor's Quix Streams session windows, and hands every closed session to the
same :class:`~driverscore.services.stream.TripScoringStep` the Kafka processor uses. The
feature rows, score records and alerts go to a sink: Parquet files under the home folder,
or memory (tests, the demo).

Session rules (Quix ``session_window`` with ``closing_strategy="partition"``; the whole
file is one partition): a ping joins its vehicle's open session when it is less than one
inactivity gap after the session's last ping, otherwise it starts a new one; a session
closes once the event time seen so far passes its last ping + 2 × gap + grace. At the end
of the file every open session closes (what the Kafka replay's closing clock does).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from driverscore.domain.schema import PING_SCHEMA
from driverscore.services.stream import ScoredSession, TripScoringStep

__all__ = [
    "EmbeddedRunResult",
    "MemoryScoreSink",
    "ParquetScoreSink",
    "ScoreSink",
    "SessionWindows",
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


def _concat(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
    parts = [f for f in frames if f.height]
    return pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()


class ParquetScoreSink:
    """Parquet part files under ``folder``: ``scores/``, ``trip_features/``, ``alerts/``, and
    ``shadow/`` (the challenger's records in shadow mode).

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
        ):
            if frame.height == 0:
                continue
            path = self.folder / name / f"{self._run}-{part:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(path, compression="zstd")
            self.written.append(path)


@dataclass
class _Session:
    vehicle: str
    start_ms: int
    end_ms: int
    pings: list[dict[str, Any]]


class SessionWindows:
    """Per-vehicle session windows over time-ordered pings (the Quix session rules).

    :meth:`add` returns the sessions the new event time closed; :meth:`close_all` the rest.
    """

    def __init__(self, gap_ms: int, grace_ms: int) -> None:
        self.gap_ms = gap_ms
        self.grace_ms = grace_ms
        self.watermark_ms: int | None = None
        self._open: dict[str, _Session] = {}
        # (last ping + 2 gap + grace, tie-breaker, session); re-pushed when a session grew.
        self._expiry: list[tuple[int, int, _Session]] = []
        self._seq = itertools.count()

    def add(self, ping: dict[str, Any]) -> list[_Session]:
        vehicle = str(ping["vehicle_id"])
        ts_ms = int(ping["ts"]) // 1000
        session = self._open.get(vehicle)
        if session is not None and ts_ms < session.end_ms + self.gap_ms:
            session.pings.append(ping)
            session.end_ms = max(session.end_ms, ts_ms)
        else:
            session = _Session(vehicle, ts_ms, ts_ms, [ping])
            self._open[vehicle] = session
            self._push(session)
        self.watermark_ms = ts_ms if self.watermark_ms is None else max(self.watermark_ms, ts_ms)
        return self._expire(self.watermark_ms - 2 * self.gap_ms - self.grace_ms)

    def close_all(self) -> list[_Session]:
        closed = sorted(
            {id(s): s for _, _, s in self._expiry}.values(), key=lambda s: (s.end_ms, s.vehicle)
        )
        self._expiry.clear()
        self._open.clear()
        return closed

    def _push(self, session: _Session) -> None:
        expiry = session.end_ms + 2 * self.gap_ms + self.grace_ms
        heapq.heappush(self._expiry, (expiry, next(self._seq), session))

    def _expire(self, close_before_ms: int) -> list[_Session]:
        closed: list[_Session] = []
        while self._expiry and self._expiry[0][0] - 2 * self.gap_ms - self.grace_ms <= (
            close_before_ms
        ):
            _, _, session = heapq.heappop(self._expiry)
            if session.end_ms > close_before_ms:
                self._push(session)  # it grew since it was queued
                continue
            if self._open.get(session.vehicle) is session:
                del self._open[session.vehicle]
            closed.append(session)
        return closed


@dataclass(frozen=True)
class EmbeddedRunResult:
    """How much one replay read and produced."""

    pings: int
    sessions: int
    trips: int
    alerts: int
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
    speed: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> EmbeddedRunResult:
    """Replay canonical ``pings`` through the stream's trip closing and scoring into ``sink``.

    ``speed`` paces the replay: 1.0 is real time, 60.0 a minute of driving per second,
    0 as fast as possible. The session gap is the scoring model card's ``TripConfig.gap_s``.
    """
    gap_ms = round(step.scorer.card.trip_config.gap_s * 1000)
    windows = SessionWindows(gap_ms, round(grace_s * 1000))
    started = clock()
    first_us: int | None = None
    count = sessions = trips = alerts = 0

    def close(closed: list[_Session]) -> None:
        nonlocal sessions, trips, alerts
        for session in closed:
            sessions += 1
            start = datetime.fromtimestamp(session.start_ms / 1000, UTC)
            scored = step.close(session.vehicle, start, session.pings)
            if scored is not None:
                trips += scored.records.height
                alerts += scored.alerts.height
                sink.add(scored)

    for ping in _ping_dicts(pings):
        if speed > 0:
            first_us = ping["ts"] if first_us is None else first_us
            ahead = (ping["ts"] - first_us) / 1e6 / speed - (clock() - started)
            if ahead > 0:
                sleep(ahead)
        count += 1
        close(windows.add(ping))
    close(windows.close_all())
    sink.flush()
    return EmbeddedRunResult(count, sessions, trips, alerts, clock() - started)
