"""Trips of a ping stream: open sessions per vehicle in key-value state, closed by event time.

Pure logic shared by every stream runner: the Kafka processor keeps the state in Quix
Streams' RocksDB stores (changelogged, so it survives restarts and moves with its
partition), the embedded runner in dicts. The rules, in event time (the pings' ``ts``):

* A ping joins its vehicle's open session when it is at most one gap (``TripConfig.gap_s``,
  the batch rule) before the session's first or after its last ping and carries the same
  ``trip_id`` (both absent counts as the same); a ping bridging two sessions merges them.
  Otherwise it opens a new session. A ping of a new ``trip_id`` ends the overlapping
  session of the old one: that trip is over, whatever the gap.
* The partition's **watermark** is the latest ``ts`` seen on it (pings and clock messages).
  A session closes once the watermark is past its last ping + gap + grace (an ended
  session: last ping + grace), and at ``max_trip_pings`` pings at once, so no trip's state
  grows without bound.
* A ping is **late** when a closed session would have had to take it (at most one gap
  after the vehicle's last closed trip) or when it is more than gap + grace behind the
  watermark. Late pings are handed back to the caller (the dead-letter topic), never
  silently dropped.

Work per ping is constant: each message's pings are stored as one new chunk of the
session, and a closing session reads each chunk once. Sessions due to close are found
with in-memory timers per partition (a heap with one live entry per vehicle, re-armed
when it fires early), rebuilt from the persisted list of vehicles with open sessions
after a restart or a rebalance.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

__all__ = [
    "Assembled",
    "ClosedSession",
    "KeyValue",
    "MemoryScope",
    "PartitionScope",
    "SessionRules",
    "TripAssembler",
]

CloseReason = Literal["gap", "trip_id", "max_pings", "end"]

_META: Final = "meta"
_WATERMARK: Final = "wm"
_OPEN: Final = "open"
_PENDING: Final = "pending"
_PERSIST_EVERY_US: Final = 1_000_000


class KeyValue(Protocol):
    """Get/set/delete of JSON-able values (a Quix ``State``, or a dict wrapper)."""

    def get(self, key: str, default: Any = None) -> Any: ...
    def set(self, key: str, value: Any) -> None: ...
    def delete(self, key: str) -> None: ...


class PartitionScope(Protocol):
    """The state of one input partition: one store per vehicle and one shared by all."""

    @property
    def partition(self) -> Hashable: ...
    @property
    def token(self) -> object:
        """Same object while nothing else can have written this partition's state (for a
        Kafka processor: one transaction); what was read from it may be kept until then."""
        ...

    def vehicle(self, vehicle_id: str) -> KeyValue: ...
    def shared(self) -> KeyValue: ...


@dataclass(frozen=True)
class SessionRules:
    """How sessions are cut and closed, in microseconds of event time."""

    gap_us: int
    grace_us: int
    max_trip_pings: int = 50_000

    @classmethod
    def of(cls, gap_s: float, grace_s: float, max_trip_pings: int = 50_000) -> SessionRules:
        return cls(round(gap_s * 1e6), round(grace_s * 1e6), max_trip_pings)


@dataclass(frozen=True)
class ClosedSession:
    """One vehicle's pings of a closed session, in arrival order."""

    vehicle_id: str
    start_us: int
    last_us: int
    pings: list[dict[str, Any]]
    reason: CloseReason


@dataclass
class Assembled:
    """What one message (or clock tick) did: sessions it closed and pings that came too late."""

    closed: list[ClosedSession] = field(default_factory=list)
    late: list[dict[str, Any]] = field(default_factory=list)
    #: Deferred closing: sessions closed but not yet collected with :meth:`TripAssembler.flush`.
    pending: int = 0


@dataclass
class _Index:
    version: int
    deadlines: dict[str, int]
    #: (deadline, vehicle) timers; a vehicle's entry may be older than its deadline
    #: (it is re-armed when it fires early) or stale (skipped when it fires).
    timers: list[tuple[int, str]] = field(default_factory=list)
    #: Copies of the partition's shared values, valid while ``token`` is the scope's.
    token: object = None
    watermark: int | None = None
    #: The watermark as last written to the shared state.
    persisted: int | None = None
    pending: int = 0


class TripAssembler:
    """Adds pings to their vehicle's sessions and closes the sessions that are due.

    With ``defer=True`` a closing session is only moved to the partition's pending list,
    its pings still in state; :meth:`flush` collects all pending sessions at once. A caller
    that scores trips in batches does so without holding closed trips in memory only,
    where a crash would lose them.
    """

    def __init__(self, rules: SessionRules, *, defer: bool = False) -> None:
        self.rules = rules
        self.defer = defer
        self._indexes: dict[Hashable, _Index] = {}

    # -- entry points ------------------------------------------------------------------

    def add(self, scope: PartitionScope, vehicle_id: str, pings: list[dict[str, Any]]) -> Assembled:
        """One message's pings of ``vehicle_id``."""
        shared = scope.shared()
        index = self._index(scope, shared)
        watermark = index.watermark
        state = scope.vehicle(vehicle_id)
        meta = state.get(_META) or {"seq": 0, "closed_until": None, "open": []}
        had_open = bool(meta["open"])
        out = Assembled()
        if watermark is not None and had_open:
            out.closed.extend(self._close_due(shared, index, state, meta, vehicle_id, watermark))
        # Late: within a gap of the last closed trip, or more than gap + grace behind.
        closed_until = meta["closed_until"]
        too_old = -1 if watermark is None else watermark - self.rules.gap_us - self.rules.grace_us
        if closed_until is not None and closed_until + 1 > too_old:
            too_old = closed_until + 1  # ts <= closed_until is late
        fresh = pings
        if any(p["ts"] < too_old for p in pings):
            fresh = [p for p in pings if p["ts"] >= too_old]
            out.late = [p for p in pings if p["ts"] < too_old]
        if fresh:
            self._assign(state, meta, fresh)
            out.closed.extend(self._close_full(shared, index, state, meta, vehicle_id))
            newest = max(p["ts"] for p in fresh)
            if watermark is None or newest > watermark:
                watermark = index.watermark = newest
                # Persisted once per second of event time, not per message (one state write
                # and changelog record less per ping): after a restart event time resumes at
                # most a second behind, which only makes the late test that much lenient.
                if index.persisted is None or watermark - index.persisted >= _PERSIST_EVERY_US:
                    shared.set(_WATERMARK, watermark)
                    index.persisted = watermark
        state.set(_META, meta)
        self._track(shared, index, vehicle_id, meta, had_open)
        if watermark is not None:
            out.closed.extend(self._expire(scope, shared, index, watermark))
        return self._finish(index, out)

    def advance(self, scope: PartitionScope, ts_us: int) -> Assembled:
        """A clock message: event time of the partition is at least ``ts_us``."""
        shared = scope.shared()
        index = self._index(scope, shared)
        watermark = index.watermark
        if watermark is None or ts_us > watermark:
            watermark = index.watermark = index.persisted = ts_us
            shared.set(_WATERMARK, watermark)
        return self._finish(index, Assembled(closed=self._expire(scope, shared, index, watermark)))

    def close_all(self, scope: PartitionScope) -> Assembled:
        """Close every open session of the partition (the end of a replayed file)."""
        shared = scope.shared()
        index = self._index(scope, shared)
        closed: list[ClosedSession] = []
        for vehicle_id in sorted(index.deadlines):
            state = scope.vehicle(vehicle_id)
            meta = state.get(_META)
            sessions = list(meta["open"])
            meta["open"] = []
            for session in sessions:
                closed.extend(self._close(shared, index, state, meta, vehicle_id, session, "end"))
            state.set(_META, meta)
            self._track(shared, index, vehicle_id, meta, had_open=True)
        closed.sort(key=lambda s: (s.last_us, s.vehicle_id))
        return self._finish(index, Assembled(closed=closed))

    def flush(self, scope: PartitionScope) -> list[ClosedSession]:
        """Deferred closing: every pending session of the partition, with its pings."""
        shared = scope.shared()
        index = self._index(scope, shared)
        pending: list[dict[str, Any]] = (shared.get(_PENDING) or []) if index.pending else []
        if not pending:
            return []
        shared.delete(_PENDING)
        index.pending = 0
        closed: list[ClosedSession] = []
        for entry in pending:
            state = scope.vehicle(entry["vehicle"])
            closed.append(self._collect(state, entry["vehicle"], entry["session"], entry["reason"]))
        return closed

    @staticmethod
    def _finish(index: _Index, out: Assembled) -> Assembled:
        out.pending = index.pending
        return out

    # -- sessions of one vehicle -------------------------------------------------------

    def _assign(self, state: KeyValue, meta: dict[str, Any], pings: list[dict[str, Any]]) -> None:
        gap = self.rules.gap_us
        sessions: list[dict[str, Any]] = meta["open"]
        if len(sessions) == 1 and self._extend(sessions[0], pings):
            self._store_chunk(state, meta, sessions[0], pings)
            return
        # This message's pings with the session each joined; a later ping of the message
        # may merge two sessions, so chunks are grouped only at the end, in arrival order.
        assigned: list[tuple[dict[str, Any], dict[str, Any]]] = []
        merged_into: dict[int, dict[str, Any]] = {}
        for ping in pings:
            ts = int(ping["ts"])
            trip = ping.get("trip_id")
            near = [s for s in sessions if s["start"] - gap <= ts <= s["last"] + gap]
            # An ended trip still takes its own late pings; pings without an id start anew.
            joins = [s for s in near if s["trip"] == trip and (not s["ended"] or trip is not None)]
            if joins:
                session = joins[0]
                for other in joins[1:]:  # the ping bridges them: one trip after all
                    self._merge(session, other)
                    merged_into[id(other)] = session
                    sessions.remove(other)
            else:
                for other in near:  # a new trip id ends the trip it overlaps
                    if other["trip"] != trip and other["last"] <= ts:
                        other["ended"] = True
                session = {
                    "start": ts,
                    "last": ts,
                    "n": 0,
                    "trip": trip,
                    "ended": False,
                    "chunks": [],
                }
                sessions.append(session)
            session["start"] = min(session["start"], ts)
            session["last"] = max(session["last"], ts)
            session["n"] += 1
            assigned.append((session, ping))
        chunks: dict[int, list[dict[str, Any]]] = {}
        for session, ping in assigned:
            while id(session) in merged_into:
                session = merged_into[id(session)]
            chunks.setdefault(id(session), []).append(ping)
        for session in sessions:
            chunk = chunks.get(id(session))
            if chunk:
                self._store_chunk(state, meta, session, chunk)
        sessions.sort(key=lambda s: s["start"])

    def _extend(self, session: dict[str, Any], pings: list[dict[str, Any]]) -> bool:
        """The common case, fast: every ping continues the one open session, in order."""
        if session["ended"]:
            return False
        gap = self.rules.gap_us
        trip = session["trip"]
        start = session["start"]
        last = session["last"]
        for ping in pings:
            ts = ping["ts"]
            if ts > last + gap or ts < start - gap or ping.get("trip_id") != trip:
                return False
            if ts > last:
                last = ts
            elif ts < start:
                start = ts
        session["start"] = start
        session["last"] = last
        session["n"] += len(pings)
        return True

    @staticmethod
    def _store_chunk(
        state: KeyValue, meta: dict[str, Any], session: dict[str, Any], chunk: list[dict[str, Any]]
    ) -> None:
        chunk_id = meta["seq"]
        meta["seq"] = chunk_id + 1
        state.set(f"c{chunk_id}", chunk)
        session["chunks"].append(chunk_id)

    @staticmethod
    def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
        into["start"] = min(into["start"], other["start"])
        into["last"] = max(into["last"], other["last"])
        into["n"] += other["n"]
        into["chunks"] = sorted(into["chunks"] + other["chunks"])

    def _deadline(self, session: dict[str, Any]) -> int:
        wait = 0 if session["ended"] else self.rules.gap_us
        return int(session["last"]) + wait + self.rules.grace_us

    def _close_due(
        self,
        shared: KeyValue,
        index: _Index,
        state: KeyValue,
        meta: dict[str, Any],
        vehicle_id: str,
        watermark: int,
    ) -> list[ClosedSession]:
        due = [s for s in meta["open"] if self._deadline(s) < watermark]
        if not due:
            return []
        meta["open"] = [s for s in meta["open"] if self._deadline(s) >= watermark]
        closed: list[ClosedSession] = []
        for session in due:
            reason: CloseReason = "trip_id" if session["ended"] else "gap"
            closed.extend(self._close(shared, index, state, meta, vehicle_id, session, reason))
        return closed

    def _close_full(
        self,
        shared: KeyValue,
        index: _Index,
        state: KeyValue,
        meta: dict[str, Any],
        vehicle_id: str,
    ) -> list[ClosedSession]:
        full = [s for s in meta["open"] if s["n"] >= self.rules.max_trip_pings]
        if not full:
            return []
        meta["open"] = [s for s in meta["open"] if s["n"] < self.rules.max_trip_pings]
        closed: list[ClosedSession] = []
        for session in full:
            closed.extend(self._close(shared, index, state, meta, vehicle_id, session, "max_pings"))
        return closed

    def _close(
        self,
        shared: KeyValue,
        index: _Index,
        state: KeyValue,
        meta: dict[str, Any],
        vehicle_id: str,
        session: dict[str, Any],
        reason: CloseReason,
    ) -> list[ClosedSession]:
        # Later pings a gap after a trip that ended by the gap rule would have joined it:
        # they are late. After a forced or explicit end the next ping starts a new trip.
        until = int(session["last"]) + (self.rules.gap_us if reason in ("gap", "end") else 0)
        previous = meta["closed_until"]
        meta["closed_until"] = until if previous is None else max(previous, until)
        if self.defer:
            pending: list[dict[str, Any]] = shared.get(_PENDING) or []
            pending.append({"vehicle": vehicle_id, "session": session, "reason": reason})
            shared.set(_PENDING, pending)
            index.pending = len(pending)
            return []
        return [self._collect(state, vehicle_id, session, reason)]

    @staticmethod
    def _collect(
        state: KeyValue, vehicle_id: str, session: dict[str, Any], reason: CloseReason
    ) -> ClosedSession:
        pings: list[dict[str, Any]] = []
        for chunk_id in session["chunks"]:
            pings.extend(state.get(f"c{chunk_id}") or [])
            state.delete(f"c{chunk_id}")
        return ClosedSession(vehicle_id, int(session["start"]), int(session["last"]), pings, reason)

    # -- the partition's index of deadlines ----------------------------------------------

    def _index(self, scope: PartitionScope, shared: KeyValue) -> _Index:
        index = self._indexes.get(scope.partition)
        if index is not None and index.token is scope.token:
            return index
        persisted = shared.get(_OPEN) or {"version": 0, "vehicles": []}
        if index is None or index.version != persisted["version"]:
            # First use, a restart or a rebalance: rebuild from the vehicles' own state.
            deadlines: dict[str, int] = {}
            for vehicle_id in persisted["vehicles"]:
                meta = scope.vehicle(vehicle_id).get(_META)
                if meta and meta["open"]:
                    deadlines[vehicle_id] = min(self._deadline(s) for s in meta["open"])
            timers = [(d, v) for v, d in deadlines.items()]
            heapq.heapify(timers)
            index = _Index(int(persisted["version"]), deadlines, timers)
            self._indexes[scope.partition] = index
        index.watermark = index.persisted = shared.get(_WATERMARK)
        index.pending = len(shared.get(_PENDING) or [])
        index.token = scope.token
        return index

    def _track(
        self,
        shared: KeyValue,
        index: _Index,
        vehicle_id: str,
        meta: dict[str, Any],
        had_open: bool,
    ) -> None:
        sessions = meta["open"]
        if sessions:
            deadline = (
                self._deadline(sessions[0])
                if len(sessions) == 1
                else min(self._deadline(s) for s in sessions)
            )
            before = index.deadlines.get(vehicle_id)
            index.deadlines[vehicle_id] = deadline
            if before is None or deadline < before:
                heapq.heappush(index.timers, (deadline, vehicle_id))
        else:
            index.deadlines.pop(vehicle_id, None)
        if had_open != bool(sessions):
            index.version += 1
            shared.set(_OPEN, {"version": index.version, "vehicles": sorted(index.deadlines)})

    def _expire(
        self, scope: PartitionScope, shared: KeyValue, index: _Index, watermark: int
    ) -> list[ClosedSession]:
        closed: list[ClosedSession] = []
        timers = index.timers
        while timers and timers[0][0] < watermark:
            _, vehicle_id = heapq.heappop(timers)
            deadline = index.deadlines.get(vehicle_id)
            if deadline is None:
                continue  # closed since: a stale timer
            if deadline >= watermark:
                heapq.heappush(timers, (deadline, vehicle_id))  # it moved on: re-arm
                continue
            state = scope.vehicle(vehicle_id)
            meta = state.get(_META)
            closed.extend(self._close_due(shared, index, state, meta, vehicle_id, watermark))
            state.set(_META, meta)
            index.deadlines.pop(vehicle_id, None)
            self._track(shared, index, vehicle_id, meta, had_open=True)
        return closed


class _DictState:
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self._data[key] = value

    def delete(self, key: str) -> None:
        self._data.pop(key, None)


class MemoryScope:
    """A partition's state in dicts (the embedded runner, unit tests)."""

    def __init__(self, partition: Hashable = 0) -> None:
        self._partition = partition
        self._vehicles: dict[str, dict[str, Any]] = {}
        self._shared: dict[str, Any] = {}
        self._token = object()

    @property
    def partition(self) -> Hashable:
        return self._partition

    @property
    def token(self) -> object:
        return self._token

    def hand_over(self) -> None:
        """What a Kafka rebalance does: another processor may write this state from now on."""
        self._token = object()

    def vehicle(self, vehicle_id: str) -> KeyValue:
        return _DictState(self._vehicles.setdefault(vehicle_id, {}))

    def shared(self) -> KeyValue:
        return _DictState(self._shared)

    def stored_keys(self) -> int:
        """How many keys the vehicles' state holds (bounded-state tests)."""
        return sum(len(v) for v in self._vehicles.values())
