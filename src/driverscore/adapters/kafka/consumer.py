"""Reading topics in batches with offsets committed by the caller (``driverscore sink``).

Auto-commit is off: a position is committed only when the caller says so, after it has
stored what it read. Partitions taken away by a rebalance call ``on_revoke`` first, in the
polling thread, so the caller can store and commit what it holds of them before another
consumer gets them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException  # type: ignore[import-untyped]

from driverscore.errors import DriverscoreError

__all__ = ["ConsumedMessage", "TopicReader"]


@dataclass(frozen=True, slots=True)
class ConsumedMessage:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes | None

    @property
    def source(self) -> str:
        """Where the message is: ``topic/partition/offset``."""
        return f"{self.topic}/{self.partition}/{self.offset}"


class TopicReader:
    """A consumer in group ``group`` on ``topics``, from the earliest offset when the group
    has none; reads committed data only (the stream's exactly-once outputs)."""

    def __init__(
        self,
        bootstrap_servers: str,
        group: str,
        topics: list[str],
        on_revoke: Callable[[], None] = lambda: None,
        *,
        session_timeout_s: float = 45.0,
    ) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                # A consumer that died without leaving holds its partitions this long.
                "session.timeout.ms": int(session_timeout_s * 1000),
                "log_level": 0,
            }
        )
        self._on_revoke = on_revoke
        self._assigned = False

        def assigned(_consumer: Any, partitions: Any) -> None:
            self._assigned = bool(partitions)

        def revoked(_consumer: Any, _partitions: Any) -> None:
            self._on_revoke()
            self._assigned = False

        self._consumer.subscribe(topics, on_assign=assigned, on_revoke=revoked)

    @property
    def assigned(self) -> bool:
        """Whether the group gave this consumer partitions (a new member waits for a dead
        one's session to time out before it gets any)."""
        return self._assigned

    def poll(self, max_messages: int, timeout_s: float) -> list[ConsumedMessage]:
        """Up to ``max_messages`` messages, waiting at most ``timeout_s`` for the first."""
        out: list[ConsumedMessage] = []
        for message in self._consumer.consume(num_messages=max_messages, timeout=timeout_s):
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.fatal() or not error.retriable():
                    raise DriverscoreError(f"kafka consumer: {error.str()}")
                continue
            key = message.key()
            out.append(
                ConsumedMessage(
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    key.decode("utf-8", errors="replace") if key is not None else None,
                    message.value(),
                )
            )
        return out

    def commit(self) -> None:
        """Commit the positions after every message returned so far (synchronously)."""
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            # Nothing consumed since the last commit: nothing to do.
            if exc.args and exc.args[0].code() == KafkaError._NO_OFFSET:
                return
            raise

    def close(self) -> None:
        """Leave the group. ``on_revoke`` is not called: the caller wrote what it could, and
        what it could not stays uncommitted, for the next consumer."""
        self._on_revoke = lambda: None
        self._consumer.close()
