"""The processor's partition state in Quix Streams: the one module that knows Quix internals.

Quix hands a stateful function the state of the message's key only. Trips of idle
vehicles close on other vehicles' messages, so :class:`QuixScope` reaches the
transaction behind that state (``state._transaction``: the same store, changelog and
commit) for other keys, with the key prefix Quix itself uses for a ``str`` message key
(its JSON encoding). ``tests/unit/test_quix_state.py`` holds this to a real Quix state:
when a Quix upgrade changes either, that test fails, not the stream.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Final

import orjson
from quixstreams import message_context

from driverscore.domain.sessions import KeyValue, PartitionScope

if TYPE_CHECKING:
    from driverscore.services.stream.processor import OutMessage, PingProcessor

__all__ = ["PARTITION_PREFIX", "QuixScope", "checkpoint_due", "quix_step", "vehicle_prefix"]

#: Prefix of the state shared by a partition's vehicles (watermark, pending trips). Quix
#: encodes ``str`` keys as JSON, which always starts with a quote: no vehicle has it.
PARTITION_PREFIX: Final = b"__partition__"

#: Vehicles whose encoded prefix is kept; a partition's active vehicles fit many times
#: over, and an evicted one costs one ``orjson.dumps`` when it is back.
PREFIX_CACHE_SIZE: Final = 65_536


@functools.lru_cache(maxsize=PREFIX_CACHE_SIZE)
def vehicle_prefix(vehicle_id: str) -> bytes:
    """The state prefix of a vehicle: how Quix encodes the ``str`` message key (JSON)."""
    return orjson.dumps(vehicle_id)


class QuixScope:
    """The partition state of the message being processed, as a ``PartitionScope``.

    One scope serves every message of its transaction (:func:`quix_step` keeps it): the
    state objects it hands out are made once per vehicle and transaction, not per message.
    """

    __slots__ = ("_at_commit", "_partition", "_shared", "_transaction", "_vehicles")

    def __init__(self, state: Any, partition: tuple[str, int]) -> None:
        self._transaction = state._transaction
        self._partition = partition
        self._shared: KeyValue | None = None
        self._vehicles: dict[str, KeyValue] = {}
        self._at_commit: list[Callable[[], None]] = []

    @property
    def partition(self) -> tuple[str, int]:
        return self._partition

    @property
    def live(self) -> bool:
        """Its transaction is the partition's in the current checkpoint (not yet prepared)."""
        transaction = self._transaction
        return not (transaction.prepared or transaction.completed or transaction.failed)

    @property
    def token(self) -> object:
        # One transaction per checkpoint; a rebalance always starts a new one.
        return self._transaction

    def vehicle(self, vehicle_id: str) -> KeyValue:
        state = self._vehicles.get(vehicle_id)
        if state is None:
            state = self._transaction.as_state(prefix=vehicle_prefix(vehicle_id))
            self._vehicles[vehicle_id] = state
        return state

    def shared(self) -> KeyValue:
        if self._shared is None:
            self._shared = self._transaction.as_state(prefix=PARTITION_PREFIX)
        return self._shared

    def on_commit(self, write: Callable[[], None]) -> bool:
        """``write`` runs first thing in the transaction's ``prepare``: Quix's checkpoint
        prepares every store transaction (producing its changelog records) before it
        flushes it, so what ``write`` writes is committed, and changelogged, with the rest.
        A transaction that is never prepared (aborted) commits nothing, ``write`` included.
        """
        if not self._at_commit:
            prepare = self._transaction.prepare
            writes = self._at_commit

            def prepare_after_writes(*args: Any, **kwargs: Any) -> Any:
                for pending in writes:
                    pending()
                writes.clear()
                return prepare(*args, **kwargs)

            # On this transaction object only: a new transaction starts without it.
            self._transaction.prepare = prepare_after_writes
        self._at_commit.append(write)
        return True


def checkpoint_due(app: Any) -> Callable[[float], bool]:
    """``due(lead_s)``: whether the application's checkpoint commits after the message in
    hand (its run loop commits right after each message once the checkpoint has expired),
    or, once per checkpoint, within ``lead_s`` of it."""
    ahead: list[object] = [None]  # the checkpoint already told it is near

    def due(lead_s: float) -> bool:
        checkpoint = app._processing_context.checkpoint
        if checkpoint.expired():
            return True
        if lead_s <= 0 or ahead[0] is checkpoint:
            return False
        age = time.monotonic() - checkpoint._created_at
        if age < checkpoint._commit_interval - lead_s:
            return False
        ahead[0] = checkpoint
        return True

    return due


def quix_step(
    processor: PingProcessor, commit_due: Callable[[float], bool] | None = None
) -> Callable[..., list[OutMessage]]:
    """The stateful function of the Quix dataframe: one message through ``processor``.

    ``commit_due`` (:func:`checkpoint_due`): when it says the checkpoint commits after this
    message, or within the processor's ``commit_lead_s``, and trips wait, the processor
    gets the scopes of every partition whose transaction is in that checkpoint, to score
    their waiting trips with it; and those scopes whenever it scores one partition's
    trips, to score the others' with them.
    """

    # The scope of each partition's current transaction (a new transaction, a new scope).
    scopes: dict[tuple[str, int], QuixScope] = {}

    def live() -> dict[Hashable, PartitionScope]:
        return {p: s for p, s in scopes.items() if s.live}

    def process(
        value: Any, key: Any, timestamp_ms: int, headers: Any, state: Any
    ) -> list[OutMessage]:
        ctx = message_context()
        partition = (ctx.topic, ctx.partition)
        scope = scopes.get(partition)
        if scope is None or scope.token is not state._transaction:
            scope = scopes[partition] = QuixScope(state, partition)
        source = f"{ctx.topic}/{ctx.partition}/{ctx.offset}"
        committing = None
        if commit_due is not None and processor.waiting and commit_due(processor.commit_lead_s):
            committing = live()
        return processor.process(
            value, key, timestamp_ms, list(headers or []), scope, source, committing, live
        )

    return process
