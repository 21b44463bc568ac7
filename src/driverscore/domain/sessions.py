"""Trips of a ping stream: open sessions per vehicle in key-value state, closed by event time.

Pure logic shared by every stream runner: the Kafka processor keeps the state in Quix
Streams' RocksDB stores (changelogged, so it survives restarts and moves with its
partition), the embedded runner in dicts. The rules, in event time (the pings' ``ts``):

* Sessions are cut by the batch rule (``domain/trips.py``): in time order, a ping continues
  its vehicle's trip when it has the same ``trip_id`` (both absent counts as the same) and
  is at most one gap (``TripConfig.gap_s``) after the ping before it
  (:func:`~driverscore.domain.trips.continues_trip`). Out-of-order pings take the place in
  time that batch gives them: one may join a session before its start, bridge two
  sessions (merging them) or, with another trip id, cut one in two.
* The partition's **watermark** is the latest ``ts`` seen on it (pings and clock messages).
  A session closes once the watermark is past its last ping + gap + grace, or last ping +
  grace when the next ping, within a gap, is of another trip (it cannot grow any more).
  At ``max_trip_pings`` pings its first ``max_trip_pings`` pings in time close at once,
  as batch cuts them, so no trip's state grows without bound; the vehicle's earlier
  sessions close with it.
* A closed session is named as batch names it: a given id's part k >= 2 is ``id~k``; the
  vehicle's state remembers the parts closed of its last :data:`PART_MEMORY` given ids.
* A ping is **late** when it falls in the time a closed session covered (up to one gap
  after its last ping, or up to the next trip's first), or when it is more than gap +
  grace behind the watermark. Late pings are handed back to the caller (the dead-letter
  topic), never silently dropped. The pings that are not late are cut exactly as batch
  cuts them (``tests/unit/test_sessions.py`` checks it on random dirty streams).

Work per ping is constant: each message's pings are stored as one new chunk of the
session, and a closing session reads each chunk once. Sessions due to close are found
with in-memory timers per partition (a heap with one live entry per vehicle, re-armed
when it fires early), rebuilt from the persisted list of vehicles with open sessions
after a restart or a rebalance.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import msgspec

from driverscore.domain.config import TripConfig
from driverscore.domain.trips import continues_trip, forced_cuts, part_name

__all__ = [
    "PART_MEMORY",
    "TAIL_PINGS",
    "Assembled",
    "ClosedSession",
    "KeyValue",
    "MemoryScope",
    "PartitionScope",
    "SessionRules",
    "TripAssembler",
]

CloseReason = Literal["gap", "trip_id", "max_pings", "end"]

#: Not "meta", the JSON record of earlier versions: a state they wrote is ignored, not misread.
_META: Final = "m"
_WATERMARK: Final = "wm"
_OPEN: Final = "open"
_PENDING: Final = "pending"
_PARTS: Final = "parts"
#: How many given trip ids per vehicle the assembler remembers the closed parts of.
PART_MEMORY: Final = 64
_PERSIST_EVERY_US: Final = 1_000_000
#: Pings a session keeps in its metadata record before they are sealed into a chunk key of
#: their own: a single-ping message then rewrites one record (the metadata, once per
#: checkpoint in the changelog) instead of adding a key per message; bounded so rewriting
#: it stays cheap (~64 pings, a few kB).
TAIL_PINGS: Final = 64

_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder()


def _packed(pings: list[dict[str, Any]]) -> bytes:
    """Pings as concatenated MessagePack maps (an array's body, without its header)."""
    if len(pings) == 1:  # a single-ping message
        return _ENCODER.encode(pings[0])
    return b"".join([_ENCODER.encode(p) for p in pings])


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65_536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _unpacked(body: bytes, n: int) -> list[dict[str, Any]]:
    pings: list[dict[str, Any]] = _DECODER.decode(_array_header(n) + body) if n else []
    return pings


class KeyValue(Protocol):
    """Get/set/delete of JSON-able values and of bytes (a Quix ``State``, or a dict wrapper)."""

    def get(self, key: str, default: Any = None) -> Any: ...
    def set(self, key: str, value: Any) -> None: ...
    def get_bytes(self, key: str, default: bytes | None = None) -> bytes | None: ...
    def set_bytes(self, key: str, value: bytes) -> None: ...
    def delete(self, key: str) -> None: ...


def _load_meta(state: KeyValue) -> dict[str, Any] | None:
    """A vehicle's metadata record (MessagePack: its sessions' recent pings are bytes)."""
    data = state.get_bytes(_META)
    if data is None:
        return None
    meta: dict[str, Any] = _DECODER.decode(data)
    return meta


def _empty_meta() -> dict[str, Any]:
    return {"seq": 0, "closed_until": None, "open": []}


def _save_meta(state: KeyValue, meta: dict[str, Any]) -> None:
    state.set_bytes(_META, _ENCODER.encode(meta))


def _load_watermark(shared: KeyValue) -> int | None:
    data = shared.get_bytes(_WATERMARK)
    return None if data is None else int(data)


def _save_watermark(shared: KeyValue, watermark: int) -> None:
    # The bytes a JSON ``set`` of the int stores (the state layout is unchanged), written
    # as bytes: a Quix store's ``set`` serialises the value and takes a slower path to the
    # same write, and the watermark moves on a good share of single-ping messages.
    shared.set_bytes(_WATERMARK, b"%d" % watermark)


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
    def on_commit(self, write: Callable[[], None]) -> bool:
        """Have ``write`` run just before the state written under the current ``token``
        commits, its own writes committed with it; False when the scope has no such moment
        (every write is final at once) and ``write`` will not run."""
        ...


@dataclass(frozen=True)
class SessionRules:
    """How sessions are cut and closed, in microseconds of event time."""

    gap_us: int
    grace_us: int
    max_trip_pings: int = TripConfig.model_fields["max_trip_pings"].default

    @classmethod
    def of(
        cls,
        gap_s: float,
        grace_s: float,
        max_trip_pings: int = TripConfig.model_fields["max_trip_pings"].default,
    ) -> SessionRules:
        return cls(round(gap_s * 1e6), round(grace_s * 1e6), max_trip_pings)

    @classmethod
    def of_trips(cls, trips: TripConfig, grace_s: float) -> SessionRules:
        """The rules of a model's trip config: the same cuts as its batch features."""
        return cls.of(trips.gap_s, grace_s, trips.max_trip_pings)


@dataclass(frozen=True)
class ClosedSession:
    """One vehicle's pings of a closed session (one trip), in arrival order.

    ``trip_id`` is the trip's name by the batch rule (``domain/trips.py``): the given id,
    ``id~k`` for its part k >= 2 (the pings then carry that name too, so ``prepare_trips``
    keeps it), or ``vehicle:start ms`` without a given id (``prepare_trips`` names such a
    trip from its first ping that cleaning keeps, as batch does).
    """

    vehicle_id: str
    start_us: int
    last_us: int
    pings: list[dict[str, Any]]
    reason: CloseReason
    trip_id: str = ""
    #: Kafka timestamp (ms) of the message at which the session closed, when the caller
    #: gave one (``add``/``advance`` ``message_ms``); kept with a deferred session.
    closed_ms: int | None = None


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
    #: Whether the scope writes the watermark once, when its state commits
    #: (:meth:`TripAssembler._at_commit`), instead of as it moves; vehicle records too.
    at_commit: bool = False
    pending: int = 0
    #: Vehicles' metadata records as last changed under ``token``: a vehicle's next message
    #: skips reading and decoding it.
    metas: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: With ``at_commit``: the records changed under ``token`` and not yet written, with the
    #: state each is written to when that state commits (one write per vehicle and commit,
    #: not one per message).
    unwritten: dict[str, KeyValue] = field(default_factory=dict)


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
        #: ``message_ms`` of the message in hand: what a session closing now is stamped with.
        self._message_ms: int | None = None

    # -- entry points ------------------------------------------------------------------

    def add(
        self,
        scope: PartitionScope,
        vehicle_id: str,
        pings: list[dict[str, Any]],
        *,
        message_ms: int | None = None,
    ) -> Assembled:
        """One message's pings of ``vehicle_id``; ``message_ms``: the message's Kafka
        timestamp, which sessions closing at it carry (``ClosedSession.closed_ms``)."""
        self._message_ms = message_ms
        shared = scope.shared()
        index = self._index(scope, shared)
        watermark = index.watermark
        state = scope.vehicle(vehicle_id)
        meta = self._meta(index, state, vehicle_id)
        if watermark is not None and len(meta["open"]) == 1:
            going_on = self._continue(scope, shared, index, state, meta, vehicle_id, pings)
            if going_on is not None:
                return going_on
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
                self._moved(shared, index, watermark)
        self._save(index, state, vehicle_id, meta)
        self._track(shared, index, vehicle_id, meta, had_open)
        if watermark is not None:
            out.closed.extend(self._expire(scope, shared, index, watermark))
        return self._finish(index, out)

    def _continue(
        self,
        scope: PartitionScope,
        shared: KeyValue,
        index: _Index,
        state: KeyValue,
        meta: dict[str, Any],
        vehicle_id: str,
        pings: list[dict[str, Any]],
    ) -> Assembled | None:
        """What :meth:`add` does with the common message, without its general machinery:
        every ping continues the vehicle's one open session, which is neither due nor full,
        and none is late. None, with nothing changed, when that does not hold."""
        watermark = index.watermark
        assert watermark is not None
        rules = self.rules
        session = meta["open"][0]
        wait = rules.gap_us + rules.grace_us
        if session["last"] + wait < watermark:
            return None  # due to close
        too_old = watermark - wait
        closed_until = meta["closed_until"]
        if closed_until is not None and closed_until + 1 > too_old:
            too_old = closed_until + 1
        newest = watermark
        for ping in pings:
            ts = ping["ts"]
            if ts < too_old:
                return None
            if ts > newest:
                newest = ts
        if session["n"] + len(pings) >= rules.max_trip_pings or not self._extend(session, pings):
            return None
        self._store_chunk(state, meta, session, pings)
        if newest > watermark:
            watermark = index.watermark = newest
            self._moved(shared, index, watermark)
        self._save(index, state, vehicle_id, meta)
        deadline = int(session["last"]) + wait
        before = index.deadlines.get(vehicle_id)
        index.deadlines[vehicle_id] = deadline
        if before is None or deadline < before:
            heapq.heappush(index.timers, (deadline, vehicle_id))
        out = Assembled(pending=index.pending)
        if index.timers and index.timers[0][0] < watermark:
            out.closed = self._expire(scope, shared, index, watermark)
            out.pending = index.pending
        return out

    def advance(
        self, scope: PartitionScope, ts_us: int, *, message_ms: int | None = None
    ) -> Assembled:
        """A clock message: event time of the partition is at least ``ts_us``."""
        self._message_ms = message_ms
        shared = scope.shared()
        index = self._index(scope, shared)
        watermark = index.watermark
        if watermark is None or ts_us > watermark:
            watermark = index.watermark = index.persisted = ts_us
            _save_watermark(shared, watermark)
        return self._finish(index, Assembled(closed=self._expire(scope, shared, index, watermark)))

    def close_all(self, scope: PartitionScope) -> Assembled:
        """Close every open session of the partition (the end of a replayed file)."""
        shared = scope.shared()
        index = self._index(scope, shared)
        closed: list[ClosedSession] = []
        for vehicle_id in sorted(index.deadlines):
            state = scope.vehicle(vehicle_id)
            meta = self._meta(index, state, vehicle_id)
            sessions = list(meta["open"])
            meta["open"] = []
            for session in sessions:
                until = self._until(session, None, "end")
                closed.extend(
                    self._close(shared, index, state, meta, vehicle_id, session, "end", until)
                )
            self._save(index, state, vehicle_id, meta)
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
            closed.append(
                self._collect(
                    state, entry["vehicle"], entry["session"], entry["reason"], entry.get("at")
                )
            )
        return closed

    @staticmethod
    def _meta(index: _Index, state: KeyValue, vehicle_id: str) -> dict[str, Any]:
        """A vehicle's metadata record, changed in place and written back by the caller."""
        meta = index.metas.get(vehicle_id)
        if meta is None:
            meta = index.metas[vehicle_id] = _load_meta(state) or _empty_meta()
        return meta

    @staticmethod
    def _save(index: _Index, state: KeyValue, vehicle_id: str, meta: dict[str, Any]) -> None:
        """Write a vehicle's changed record now or, when the scope has a commit moment,
        when its state commits (:meth:`_at_commit`): a vehicle's many single-ping messages
        in one checkpoint then cost one encoding and write instead of one each. Nothing is
        held past the commit: a transaction that never commits loses these writes with all
        of its own, and its messages are consumed again."""
        if index.at_commit:
            index.unwritten[vehicle_id] = state
        else:
            _save_meta(state, meta)

    @staticmethod
    def _moved(shared: KeyValue, index: _Index, watermark: int) -> None:
        """Event time moved to ``watermark``: persist it, when the scope does not at commit.

        Without a commit moment it is persisted once per second of event time, not per
        message (one state write and changelog record less per ping): after a restart event
        time resumes at most a second behind, which only makes the late test that much
        lenient.
        """
        if index.at_commit:
            return
        if index.persisted is None or watermark - index.persisted >= _PERSIST_EVERY_US:
            _save_watermark(shared, watermark)
            index.persisted = watermark

    @staticmethod
    def _at_commit(index: _Index, shared: KeyValue, token: object) -> None:
        """At the commit of ``token``'s state: the vehicle records its messages changed and
        its last watermark, one write each per commit.

        What was committed is then exactly the state and event time of the messages
        committed with it, and neither costs a state write per message."""
        if index.token is not token:
            return
        metas = index.metas
        for vehicle_id, state in index.unwritten.items():
            _save_meta(state, metas[vehicle_id])
        index.unwritten = {}
        watermark = index.watermark
        if watermark is not None and watermark != index.persisted:
            _save_watermark(shared, watermark)
            index.persisted = watermark

    @staticmethod
    def _finish(index: _Index, out: Assembled) -> Assembled:
        out.pending = index.pending
        return out

    # -- sessions of one vehicle -------------------------------------------------------
    #
    # A vehicle's open sessions are disjoint runs of its pings in time order, kept sorted
    # by start: each is what batch cutting (``domain/trips.py``) makes of the pings seen so
    # far, and ``closed_until`` keeps every later ping out of the part of time that closed
    # sessions cover, so a closed session is a batch trip for good.

    def _assign(self, state: KeyValue, meta: dict[str, Any], pings: list[dict[str, Any]]) -> None:
        sessions: list[dict[str, Any]] = meta["open"]
        if len(sessions) == 1 and self._extend(sessions[0], pings):
            self._store_chunk(state, meta, sessions[0], pings)
            return
        # This message's pings with the session each joined, in arrival order: a later
        # ping may merge or split sessions, so chunks are grouped only at the end.
        assigned: list[list[Any]] = []
        for ping in pings:
            self._place(state, meta, sessions, assigned, ping)
        chunks: dict[int, list[dict[str, Any]]] = {}
        for session, ping in assigned:
            chunks.setdefault(id(session), []).append(ping)
        for session in sessions:
            chunk = chunks.get(id(session))
            if chunk:
                self._store_chunk(state, meta, session, chunk)

    def _place(
        self,
        state: KeyValue,
        meta: dict[str, Any],
        sessions: list[dict[str, Any]],
        assigned: list[list[Any]],
        ping: dict[str, Any],
    ) -> None:
        """Put one ping where the batch rule puts it among the vehicle's open sessions.

        A ping sorts after the pings of the same ``ts`` already there (batch sorts stably).
        """
        ts = int(ping["ts"])
        trip = ping.get("trip_id")
        gap = self.rules.gap_us
        inside = next((s for s in sessions if s["start"] <= ts < s["last"]), None)
        if inside is not None:
            if inside["trip"] == trip:
                self._take(inside, ts)
                assigned.append([inside, ping])
                return
            # Another trip id between two pings of a trip cuts it in two.
            self._split(state, meta, sessions, assigned, inside, ts)
        before = after = None
        for session in sessions:
            if session["last"] <= ts:
                before = session
            elif after is None:
                after = session
        joins_before = before is not None and continues_trip(
            before["trip"], int(before["last"]), trip, ts, gap
        )
        joins_after = after is not None and continues_trip(
            trip, ts, after["trip"], int(after["start"]), gap
        )
        if before is not None and joins_before:
            session = before
            if after is not None and joins_after:  # the ping bridges them: one trip after all
                self._merge(state, meta, before, after)
                sessions.remove(after)
                for entry in assigned:
                    if entry[0] is after:
                        entry[0] = before
        elif after is not None and joins_after:
            session = after
        else:
            session = _new_session(ts, ts, 0, trip)
            sessions.append(session)
            sessions.sort(key=lambda s: s["start"])
        self._take(session, ts)
        assigned.append([session, ping])

    @staticmethod
    def _take(session: dict[str, Any], ts: int) -> None:
        session["start"] = min(session["start"], ts)
        session["last"] = max(session["last"], ts)
        session["n"] += 1

    def _split(
        self,
        state: KeyValue,
        meta: dict[str, Any],
        sessions: list[dict[str, Any]],
        assigned: list[list[Any]],
        session: dict[str, Any],
        ts: int,
    ) -> None:
        """Cut ``session`` into its pings up to ``ts`` and those after (rare: trip ids that
        interleave in time)."""
        stored = self._read_chunks(state, session)
        parts: list[dict[str, Any]] = []
        for later in (False, True):
            pings = [p for p in stored if (int(p["ts"]) > ts) is later]
            mine = [e for e in assigned if e[0] is session and (int(e[1]["ts"]) > ts) is later]
            stamps = [int(p["ts"]) for p in pings] + [int(e[1]["ts"]) for e in mine]
            part = _new_session(min(stamps), max(stamps), len(stamps), session["trip"])
            if pings:
                self._store_chunk(state, meta, part, pings)
            for entry in mine:
                entry[0] = part
            parts.append(part)
        sessions.remove(session)
        sessions.extend(parts)
        sessions.sort(key=lambda s: s["start"])

    def _extend(self, session: dict[str, Any], pings: list[dict[str, Any]]) -> bool:
        """The common case, fast: every ping continues the one open session."""
        gap = self.rules.gap_us
        trip = session["trip"]
        start = session["start"]
        last = session["last"]
        for ping in pings:
            ts = ping["ts"]
            if ping.get("trip_id") != trip:
                return False
            if ts > last:
                if not continues_trip(trip, last, trip, ts, gap):
                    return False
                last = ts
            elif ts < start:
                if not continues_trip(trip, ts, trip, start, gap):
                    return False
                start = ts
        session["start"] = start
        session["last"] = last
        session["n"] += len(pings)
        return True

    @staticmethod
    def _store_chunk(
        state: KeyValue, meta: dict[str, Any], session: dict[str, Any], chunk: list[dict[str, Any]]
    ) -> None:
        """Append pings to the session's tail (in its metadata); a full tail becomes a chunk."""
        session["tail"] = session.get("tail", b"") + _packed(chunk)
        session["tn"] = session.get("tn", 0) + len(chunk)
        if session["tn"] >= TAIL_PINGS:
            TripAssembler._seal(state, meta, session)

    @staticmethod
    def _seal(state: KeyValue, meta: dict[str, Any], session: dict[str, Any]) -> None:
        """Move the session's tail into a chunk key of its own (a MessagePack array)."""
        count = session.get("tn", 0)
        if not count:
            return
        chunk_id = meta["seq"]
        meta["seq"] = chunk_id + 1
        state.set_bytes(f"c{chunk_id}", _array_header(count) + session["tail"])
        session["chunks"].append(chunk_id)
        session["tail"] = b""
        session["tn"] = 0

    @staticmethod
    def _read_chunks(state: KeyValue, session: dict[str, Any]) -> list[dict[str, Any]]:
        """The session's stored pings in arrival order; their chunks are deleted."""
        pings: list[dict[str, Any]] = []
        for chunk_id in session["chunks"]:
            data = state.get_bytes(f"c{chunk_id}")
            if data is not None:
                pings.extend(_DECODER.decode(data))
            state.delete(f"c{chunk_id}")
        session["chunks"] = []
        pings.extend(_unpacked(session.get("tail", b""), session.get("tn", 0)))
        session["tail"] = b""
        session["tn"] = 0
        return pings

    @staticmethod
    def _merge(
        state: KeyValue, meta: dict[str, Any], into: dict[str, Any], other: dict[str, Any]
    ) -> None:
        # Tails are the latest pings of each: sealed, every ping is in a chunk numbered in
        # arrival order.
        TripAssembler._seal(state, meta, into)
        TripAssembler._seal(state, meta, other)
        into["start"] = min(into["start"], other["start"])
        into["last"] = max(into["last"], other["last"])
        into["n"] += other["n"]
        into["chunks"] = sorted(into["chunks"] + other["chunks"])

    def _ended(self, session: dict[str, Any], following: dict[str, Any] | None) -> bool:
        """Whether the next ping after the session, within a gap, is of another trip: then
        no later ping can extend it, and it closes one grace after its last ping."""
        return following is not None and following["start"] - session["last"] <= self.rules.gap_us

    def _deadlines(self, sessions: list[dict[str, Any]]) -> list[int]:
        """When each open session (sorted by start) closes; they grow with the start."""
        gap, grace = self.rules.gap_us, self.rules.grace_us
        deadlines: list[int] = []
        for i, session in enumerate(sessions):
            following = sessions[i + 1] if i + 1 < len(sessions) else None
            wait = 0 if self._ended(session, following) else gap
            deadlines.append(int(session["last"]) + wait + grace)
        return deadlines

    def _until(
        self, session: dict[str, Any], following: dict[str, Any] | None, reason: CloseReason
    ) -> int:
        """The latest ``ts`` that would have changed the session: later pings are late."""
        last = int(session["last"])
        if reason == "max_pings":  # the rest of the millisecond too (forced_cuts)
            return last - last % 1000 + 999
        if reason == "trip_id" and following is not None:
            return max(last, int(following["start"]) - 1)
        return last + self.rules.gap_us

    def _close_due(
        self,
        shared: KeyValue,
        index: _Index,
        state: KeyValue,
        meta: dict[str, Any],
        vehicle_id: str,
        watermark: int,
    ) -> list[ClosedSession]:
        sessions: list[dict[str, Any]] = meta["open"]
        deadlines = self._deadlines(sessions)
        if all(d >= watermark for d in deadlines):
            return []
        meta["open"] = [s for s, d in zip(sessions, deadlines, strict=True) if d >= watermark]
        closed: list[ClosedSession] = []
        for i, session in enumerate(sessions):  # in start order: parts are named in it
            if deadlines[i] >= watermark:
                continue
            following = sessions[i + 1] if i + 1 < len(sessions) else None
            reason: CloseReason = "trip_id" if self._ended(session, following) else "gap"
            until = self._until(session, following, reason)
            closed.extend(
                self._close(shared, index, state, meta, vehicle_id, session, reason, until)
            )
        return closed

    def _close_full(
        self,
        shared: KeyValue,
        index: _Index,
        state: KeyValue,
        meta: dict[str, Any],
        vehicle_id: str,
    ) -> list[ClosedSession]:
        limit = self.rules.max_trip_pings
        closed: list[ClosedSession] = []
        while True:
            sessions: list[dict[str, Any]] = meta["open"]
            at = next((i for i, s in enumerate(sessions) if s["n"] >= limit), None)
            if at is None:
                return closed
            part, rest = self._first_pings(state, meta, sessions[at], limit)
            # Pings up to the part's last are late from now on: the sessions before it can
            # no longer change and close first, so parts keep their start order.
            until = self._until(part, None, "max_pings")
            meta["open"] = sessions[at + 1 :]
            if rest is not None:
                meta["open"].insert(0, rest)
            for i, session in enumerate(sessions[:at]):
                following = sessions[i + 1]
                reason: CloseReason = "trip_id" if self._ended(session, following) else "gap"
                closed.extend(
                    self._close(shared, index, state, meta, vehicle_id, session, reason, until)
                )
            closed.extend(
                self._close(shared, index, state, meta, vehicle_id, part, "max_pings", until)
            )

    def _first_pings(
        self, state: KeyValue, meta: dict[str, Any], session: dict[str, Any], limit: int
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """A full session's first part as batch cuts it (:func:`forced_cuts`) and the rest,
        if any (the next part, still open), each keeping arrival order."""
        if session["n"] == limit:
            return session, None
        pings = self._read_chunks(state, session)
        order = sorted(range(len(pings)), key=lambda i: int(pings[i]["ts"]))  # stable
        cuts = forced_cuts([int(pings[i]["ts"]) // 1000 for i in order], limit)
        first = set(order[: cuts[0]] if cuts else order)
        halves: list[dict[str, Any]] = []
        for side in (True, False):
            chunk = [p for i, p in enumerate(pings) if (i in first) is side]
            if not chunk:
                break
            stamps = [int(p["ts"]) for p in chunk]
            half = _new_session(min(stamps), max(stamps), len(chunk), session["trip"])
            self._store_chunk(state, meta, half, chunk)
            halves.append(half)
        return halves[0], halves[1] if len(halves) > 1 else None

    def _close(
        self,
        shared: KeyValue,
        index: _Index,
        state: KeyValue,
        meta: dict[str, Any],
        vehicle_id: str,
        session: dict[str, Any],
        reason: CloseReason,
        until: int,
    ) -> list[ClosedSession]:
        previous = meta["closed_until"]
        meta["closed_until"] = until if previous is None else max(previous, until)
        if session["trip"] is not None:
            session["name"] = self._part_name(state, session["trip"])
        if self.defer:
            # The pending list is JSON in the partition's state: the tail goes to a chunk.
            self._seal(state, meta, session)
            session.pop("tail", None)
            session.pop("tn", None)
            pending: list[dict[str, Any]] = shared.get(_PENDING) or []
            entry: dict[str, Any] = {"vehicle": vehicle_id, "session": session, "reason": reason}
            if self._message_ms is not None:
                entry["at"] = self._message_ms
            pending.append(entry)
            shared.set(_PENDING, pending)
            index.pending = len(pending)
            return []
        return [self._collect(state, vehicle_id, session, reason, self._message_ms)]

    @staticmethod
    def _part_name(state: KeyValue, trip: Any) -> str:
        """The name of the next part of a given trip id of this vehicle (k-th: ``id~k``).

        The vehicle's state remembers how many parts of its last ``PART_MEMORY`` given ids
        have closed; an id that comes back after more than that many others starts at
        part 1 again.
        """
        parts: list[list[Any]] = state.get(_PARTS) or []
        part = 1
        for i, (known, count) in enumerate(parts):
            if known == trip:
                part = int(count) + 1
                del parts[i]
                break
        parts.append([trip, part])
        del parts[:-PART_MEMORY]
        state.set(_PARTS, parts)
        return part_name(str(trip), part)

    @staticmethod
    def _collect(
        state: KeyValue,
        vehicle_id: str,
        session: dict[str, Any],
        reason: CloseReason,
        closed_ms: int | None = None,
    ) -> ClosedSession:
        pings = TripAssembler._read_chunks(state, session)
        start = int(session["start"])
        trip = session["trip"]
        name = session.get("name") or (str(trip) if trip is not None else None)
        if name is None:
            name = f"{vehicle_id}:{start // 1000}"
        elif name != trip:
            # Part k >= 2: the pings carry the part's name, so ``prepare_trips`` keeps it.
            pings = [{**p, "trip_id": name} for p in pings]
        return ClosedSession(
            vehicle_id, start, int(session["last"]), pings, reason, name, closed_ms
        )

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
                meta = _load_meta(scope.vehicle(vehicle_id))
                if meta and meta["open"]:
                    deadlines[vehicle_id] = min(self._deadlines(meta["open"]))
            timers = [(d, v) for v, d in deadlines.items()]
            heapq.heapify(timers)
            index = _Index(int(persisted["version"]), deadlines, timers)
            self._indexes[scope.partition] = index
        index.watermark = index.persisted = _load_watermark(shared)
        index.pending = len(shared.get(_PENDING) or [])
        index.token = token = scope.token
        index.metas = {}
        index.unwritten = {}
        index.at_commit = scope.on_commit(lambda: self._at_commit(index, shared, token))
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
            deadline = min(self._deadlines(sessions))
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
            meta = self._meta(index, state, vehicle_id)
            closed.extend(self._close_due(shared, index, state, meta, vehicle_id, watermark))
            self._save(index, state, vehicle_id, meta)
            index.deadlines.pop(vehicle_id, None)
            self._track(shared, index, vehicle_id, meta, had_open=True)
        return closed


def _new_session(start: int, last: int, n: int, trip: Any) -> dict[str, Any]:
    """An open session: its span, ping count, trip id, sealed chunk ids and recent pings."""
    return {"start": start, "last": last, "n": n, "trip": trip, "chunks": [], "tail": b"", "tn": 0}


class _DictState:
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self._data[key] = value

    def get_bytes(self, key: str, default: bytes | None = None) -> bytes | None:
        value: bytes | None = self._data.get(key, default)
        return value

    def set_bytes(self, key: str, value: bytes) -> None:
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

    def on_commit(self, write: Callable[[], None]) -> bool:
        return False  # dicts: every write is final at once

    def hand_over(self) -> None:
        """What a Kafka rebalance does: another processor may write this state from now on."""
        self._token = object()

    def vehicle(self, vehicle_id: str) -> KeyValue:
        return _DictState(self._vehicles.setdefault(vehicle_id, {}))

    def shared(self) -> KeyValue:
        return _DictState(self._shared)

    def open_sessions(self, vehicle_id: str) -> list[dict[str, Any]]:
        """A vehicle's open sessions as its metadata record holds them (tests)."""
        meta = _load_meta(self.vehicle(vehicle_id)) or _empty_meta()
        sessions: list[dict[str, Any]] = meta["open"]
        return sessions

    def stored_pings(self, vehicle_id: str) -> int:
        """How many pings a vehicle's state holds, in chunks and in its sessions' tails."""
        count = sum(int(session["tn"]) for session in self.open_sessions(vehicle_id))
        for key, value in self._vehicles.get(vehicle_id, {}).items():
            if key.startswith("c"):
                count += len(_DECODER.decode(value))
        return count

    def stored_bytes(self, vehicle_id: str) -> int:
        """Bytes a vehicle's state holds: its values as a Quix store keeps them (bytes as
        they are, other values as JSON), keys not counted."""
        return sum(
            len(value)
            if isinstance(value, bytes)
            else len(json.dumps(value, separators=(",", ":")))
            for value in self._vehicles.get(vehicle_id, {}).values()
        )

    def stored_keys(self) -> int:
        """How many keys the vehicles' state holds (bounded-state tests)."""
        return sum(len(v) for v in self._vehicles.values())
