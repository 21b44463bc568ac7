"""The stream's state module against a real Quix Streams state (RocksDB, no broker).

``services/stream/quix_state.py`` reaches past the state Quix hands the processor to the
transaction behind it, with the key prefix Quix uses for a message key. These tests hold
it to what Quix does, so that a Quix upgrade that changes either fails here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from quixstreams.checkpointing.checkpoint import BaseCheckpoint
from quixstreams.state.rocksdb import RocksDBStorePartition

from driverscore.domain.sessions import SessionRules, TripAssembler
from driverscore.services.stream.quix_state import (
    PARTITION_PREFIX,
    PREFIX_CACHE_SIZE,
    QuixScope,
    checkpoint_due,
    vehicle_prefix,
)

PARTITION = ("pings", 0)
GAP_S = 300.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RocksDBStorePartition]:
    partition = RocksDBStorePartition(str(tmp_path / "state"))
    try:
        yield partition
    finally:
        partition.close()


def message_state(transaction: Any, key: str) -> Any:
    """The state Quix hands a stateful function for a message with ``key`` (a ``str``
    key, as the processor's pings topic deserialises it)."""
    return transaction.as_state(prefix=key)


def commit(transaction: Any) -> None:
    transaction.prepare()
    transaction.flush()


def test_a_vehicles_state_is_the_state_quix_gives_that_vehicles_messages(
    store: RocksDBStorePartition,
) -> None:
    transaction = store.begin()
    scope = QuixScope(message_state(transaction, "v1"), PARTITION)
    scope.vehicle("v1").set("meta", {"open": [1, 2]})
    scope.vehicle("v2").set("meta", {"open": [3]})
    assert message_state(transaction, "v1").get("meta") == {"open": [1, 2]}
    # Another vehicle's state, reached from v1's message: what v2's messages will see.
    assert message_state(transaction, "v2").get("meta") == {"open": [3]}
    assert vehicle_prefix("v1") == transaction.as_state(prefix="v1")._prefix


def test_the_shared_state_is_apart_from_every_vehicle_even_one_named_like_it(
    store: RocksDBStorePartition,
) -> None:
    transaction = store.begin()
    scope = QuixScope(message_state(transaction, "v1"), PARTITION)
    scope.shared().set("wm", 123)
    name = PARTITION_PREFIX.decode()
    assert scope.vehicle(name).get("wm") is None
    assert message_state(transaction, name).get("wm") is None
    scope.vehicle(name).set("wm", 456)
    assert scope.shared().get("wm") == 123


def test_the_token_is_one_per_transaction(store: RocksDBStorePartition) -> None:
    first = store.begin()
    a, b = (QuixScope(message_state(first, key), PARTITION) for key in ("v1", "v2"))
    assert a.token is b.token
    assert a.partition == PARTITION
    commit(first)
    later = QuixScope(message_state(store.begin(), "v1"), PARTITION)
    assert later.token is not a.token


def ping(vehicle: str, second: int) -> dict[str, Any]:
    return {
        "ts": (1_772_179_200 + second) * 1_000_000,
        "vehicle_id": vehicle,
        "lat": 1.0,
        "lon": 2.0,
    }


def test_open_trips_written_through_the_scope_survive_a_commit_and_close_later(
    store: RocksDBStorePartition,
) -> None:
    rules = SessionRules.of(GAP_S, 30.0)
    transaction = store.begin()
    scope = QuixScope(message_state(transaction, "v1"), PARTITION)
    assembler = TripAssembler(rules)
    pings = [ping("v1", s) for s in range(0, 120, 10)]
    assembler.add(scope, "v1", pings[:6])
    assembler.add(scope, "v1", pings[6:])
    commit(transaction)

    # A new processor (fresh assembler) on the committed state: another vehicle's message
    # far later in event time closes v1's trip with every ping.
    again = QuixScope(message_state(store.begin(), "v2"), PARTITION)
    closed = TripAssembler(rules).add(again, "v2", [ping("v2", 10_000)]).closed
    assert [(s.vehicle_id, s.pings) for s in closed] == [("v1", pings)]


def test_the_prefix_cache_is_bounded() -> None:
    info = vehicle_prefix.cache_info()
    assert info.maxsize == PREFIX_CACHE_SIZE
    for i in range(PREFIX_CACHE_SIZE + 10):
        vehicle_prefix(f"vehicle-{i}")
    assert vehicle_prefix.cache_info().currsize <= PREFIX_CACHE_SIZE


def test_the_committed_watermark_is_the_event_time_of_the_last_committed_ping(
    store: RocksDBStorePartition,
) -> None:
    grace_s = 30.0
    rules = SessionRules.of(GAP_S, grace_s)
    first = ping("v1", 0)
    last = {**ping("v1", 0), "ts": first["ts"] + 400_000}  # 0.4 s later
    transaction = store.begin()
    scope = QuixScope(message_state(transaction, "v1"), PARTITION)
    assembler = TripAssembler(rules)
    assembler.add(scope, "v1", [first])
    assembler.add(scope, "v1", [last])
    commit(transaction)

    # A fresh processor on the committed state judges lateness against the last ping,
    # not a watermark persisted up to a second behind it.
    horizon = last["ts"] - rules.gap_us - rules.grace_us
    again = QuixScope(message_state(store.begin(), "v2"), PARTITION)
    late = TripAssembler(rules).add(again, "v2", [{**ping("v2", 0), "ts": horizon - 1}]).late
    assert [p["ts"] for p in late] == [horizon - 1]


def test_a_transaction_that_never_commits_leaves_the_committed_watermark(
    store: RocksDBStorePartition,
) -> None:
    rules = SessionRules.of(GAP_S, 30.0)
    transaction = store.begin()
    assembler = TripAssembler(rules)
    assembler.add(QuixScope(message_state(transaction, "v1"), PARTITION), "v1", [ping("v1", 0)])
    commit(transaction)
    abandoned = store.begin()  # e.g. a checkpoint aborted by backpressure: never prepared
    assembler.add(QuixScope(message_state(abandoned, "v1"), PARTITION), "v1", [ping("v1", 200)])

    # The same processor's next transaction starts from what was committed.
    scope = QuixScope(message_state(store.begin(), "v2"), PARTITION)
    out = assembler.add(scope, "v2", [ping("v2", 100 - int(GAP_S) - 30)])
    assert out.late == []  # within gap + grace of the committed 0 s, though not of 200 s


def test_a_scope_is_live_until_its_transaction_commits(store: RocksDBStorePartition) -> None:
    transaction = store.begin()
    scope = QuixScope(message_state(transaction, "v1"), PARTITION)
    scope.vehicle("v1").set("k", 1)
    assert scope.live
    commit(transaction)
    assert not scope.live  # a later checkpoint's scope must not be written through
    assert QuixScope(message_state(store.begin(), "v1"), PARTITION).live


class _Checkpoint(BaseCheckpoint):
    """Quix's checkpoint clock (``expired``, its creation time and interval), no Kafka."""

    def commit(self) -> None:  # pragma: no cover - never committed here
        raise AssertionError("not committed in these tests")

    def close(self) -> None:  # pragma: no cover
        raise AssertionError("not closed in these tests")


def test_a_checkpoint_is_due_once_within_the_lead_then_again_once_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    app = SimpleNamespace(_processing_context=SimpleNamespace(checkpoint=_Checkpoint(0.2)))
    due = checkpoint_due(app)
    now[0] = 100.1
    assert not due(0.05)  # 0.1 s before it expires: not within the lead
    assert not due(0.0)
    now[0] = 100.16
    assert due(0.05)  # within the lead: its trips are scored now
    assert not due(0.05)  # once per checkpoint
    now[0] = 100.2
    assert due(0.05)  # expired: commits after this message
    assert due(0.0)
    # The next checkpoint gets its own lead.
    app._processing_context.checkpoint = _Checkpoint(0.2)
    assert not due(0.05)
    now[0] = 100.36
    assert due(0.05)
    assert not due(0.05)
