"""`driverscore sink`: the scores, alerts and routes topics into the score store.

The loop: read messages until ``batch_records`` are waiting or the first of them has
waited ``batch_wait_s``; decode them (a message that is not a record of its topic is kept
in the store's ``store_rejects`` with its reason and ``topic/partition/offset``); write
them to the store in one transaction; only then commit the consumer's offsets. So:

- a crash (even SIGKILL) before the commit leaves the batch unread for the group: the
  next run reads it again and the store's idempotent write takes it once;
- a replay (a new consumer group, offsets reset) writes records the store already has:
  they change nothing, and the counts stay the same;
- partitions taken away by a rebalance have their waiting messages written and committed
  first (``on_revoke``), so another sink never starts before them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import polars as pl

from driverscore.adapters.kafka.consumer import ConsumedMessage
from driverscore.adapters.score_store import ScoreBatch, ScoreWriter
from driverscore.adapters.score_store.records import ALERT_SCHEMA, decode_lines
from driverscore.domain.routes import ROUTE_SCHEMA
from driverscore.domain.trip_scoring import TRIP_RECORD_SCHEMA
from driverscore.settings import KafkaTopics

__all__ = ["MessageSource", "ScoreSinkRunner", "SinkStats"]

log = logging.getLogger(__name__)

SOURCE: Final = "sink"


class MessageSource(Protocol):
    """What the sink reads from (``adapters.kafka.consumer.TopicReader``, or a test double)."""

    def poll(self, max_messages: int, timeout_s: float) -> list[ConsumedMessage]: ...
    def commit(self) -> None: ...
    @property
    def assigned(self) -> bool: ...


@dataclass
class SinkStats:
    messages: int = 0
    batches: int = 0
    #: Records the store took as new or newer (a replayed record is not counted).
    records: int = 0
    alerts: int = 0
    routes: int = 0
    rejects: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)


class ScoreSinkRunner:
    """Reads ``topics``' scores, alerts and routes from ``source`` into ``store`` (module
    docstring: batches, commits after the write)."""

    def __init__(
        self,
        store: ScoreWriter,
        topics: KafkaTopics,
        *,
        batch_records: int = 5_000,
        batch_wait_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.schemas: dict[str, dict[str, pl.DataType]] = {
            topics.scores: TRIP_RECORD_SCHEMA,
            topics.alerts: ALERT_SCHEMA,
            topics.routes: ROUTE_SCHEMA,
        }
        self.kinds = {topics.scores: "scores", topics.alerts: "alerts", topics.routes: "routes"}
        self.batch_records = batch_records
        self.batch_wait_s = batch_wait_s
        self.clock = clock
        self.pending: list[ConsumedMessage] = []
        self.stats = SinkStats()
        self._source: MessageSource | None = None

    @property
    def topics(self) -> list[str]:
        return list(self.schemas)

    def flush(self) -> None:
        """Write the waiting messages, then commit their offsets (nothing waiting: no-op)."""
        if not self.pending or self._source is None:
            return
        pending = self.pending
        frames: dict[str, list[pl.DataFrame]] = {"scores": [], "alerts": [], "routes": []}
        rejects: list[pl.DataFrame] = []
        for topic, schema in self.schemas.items():
            mine = [(m.source, m.value) for m in pending if m.topic == topic]
            if not mine:
                continue
            decoded, rejected = decode_lines(mine, schema)
            frames[self.kinds[topic]].append(decoded)
            rejects.append(rejected)
            self.stats.by_topic[topic] = self.stats.by_topic.get(topic, 0) + len(mine)
        batch = ScoreBatch(
            SOURCE,
            **{kind: pl.concat(parts) for kind, parts in frames.items() if parts},
            **({"rejects": pl.concat(rejects)} if rejects else {}),
        )
        report = self.store.write(batch)
        # Written: from here on, a crash re-reads the batch and the write ignores it.
        self._source.commit()
        self.pending = []
        self.stats.batches += 1
        self.stats.records += report.scores
        self.stats.rejects += report.rejects
        self.stats.alerts += report.alerts
        self.stats.routes += report.routes
        log.info("stored %d messages (%d new records)", len(pending), report.scores)

    def run(
        self,
        source: MessageSource,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        stop_when_idle_s: float | None = None,
    ) -> SinkStats:
        """Until ``should_stop()`` (checked at least every ``batch_wait_s``), or until no
        message came for ``stop_when_idle_s`` while partitions were assigned (so a sink
        that waits for its group to hand it partitions does not count as idle); the
        waiting batch is written at the end."""
        self._source = source
        first_at: float | None = None
        last_message = self.clock()
        while not should_stop():
            room = self.batch_records - len(self.pending)
            wait = (
                self.batch_wait_s
                if first_at is None
                else max(0.0, first_at + self.batch_wait_s - self.clock())
            )
            messages = source.poll(room, min(wait, self.batch_wait_s))
            now = self.clock()
            if not source.assigned:
                last_message = now
            if messages:
                self.pending.extend(messages)
                self.stats.messages += len(messages)
                last_message = now
                first_at = first_at if first_at is not None else now
            if self.pending and (
                len(self.pending) >= self.batch_records
                or (first_at is not None and now - first_at >= self.batch_wait_s)
            ):
                self.flush()
                first_at = None
            if (
                stop_when_idle_s is not None
                and not self.pending
                and (now - last_message >= stop_when_idle_s)
            ):
                break
        self.flush()
        return self.stats
