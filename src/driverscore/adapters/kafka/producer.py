"""Replay a ping file into the pings topic in timestamp order (``driverscore kafka produce``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import polars as pl
from confluent_kafka import KafkaException, Producer  # type: ignore[import-untyped]

from driverscore.adapters.kafka.messages import CLOCK_KEY, encode_batch, encode_clock, encode_ping
from driverscore.adapters.ping_files import load_canonical_pings
from driverscore.errors import DriverscoreError

__all__ = [
    "ReplayResult",
    "load_canonical_pings",
    "make_producer",
    "ping_messages",
    "replay_pings",
    "replay_result",
    "send_clock",
    "send_messages",
    "topic_partitions",
]


@dataclass(frozen=True)
class ReplayResult:
    """How much was sent."""

    pings: int
    messages: int
    rejected_rows: int
    first_ts: datetime | None
    last_ts: datetime | None


def make_producer(bootstrap_servers: str) -> Any:
    """A confluent-kafka producer that partitions keys like the Java client (murmur2)."""
    return Producer(
        {
            "bootstrap.servers": bootstrap_servers,
            "partitioner": "murmur2_random",
            "enable.idempotence": True,
            "linger.ms": 20,
            "log_level": 0,
        }
    )


def replay_pings(
    producer: Any,
    topic: str,
    pings: pl.DataFrame,
    *,
    batch_span_s: float = 0.0,
    rate: float = 0.0,
    rejected_rows: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Send canonical pings in timestamp order, keyed by vehicle id.

    ``batch_span_s == 0`` sends one message per ping; otherwise each vehicle's pings within
    one window of ``batch_span_s`` seconds of event time go in one batch message.
    ``rate`` limits pings per second (0: as fast as the broker takes them).
    """
    sent_pings, sent_messages = send_messages(
        producer,
        topic,
        ping_messages(pings, batch_span_s=batch_span_s),
        rate=rate,
        progress=progress,
    )
    return replay_result(pings, sent_pings, sent_messages, rejected_rows)


def ping_messages(
    pings: pl.DataFrame, *, batch_span_s: float = 0.0
) -> Iterator[tuple[str, bytes, int]]:
    """The messages ``replay_pings`` sends, in its order: (key, value, pings in it).

    Encoding costs more than sending (about 10-17 µs a ping): a paced replay that shares
    a machine with what it measures builds them first (``list(ping_messages(...))``).
    """
    ordered = _in_time_order(pings)
    if batch_span_s > 0:
        span_us = int(batch_span_s * 1e6)
        window = pl.col("ts").dt.epoch("us") // span_us
        groups = ordered.with_columns(window.alias("_window")).group_by(
            ["_window", "vehicle_id"], maintain_order=True
        )
        for (_, vehicle), part in groups:
            yield (
                str(vehicle),
                encode_batch(str(vehicle), part.drop("_window").iter_rows(named=True)),
                part.height,
            )
    else:
        for row in ordered.iter_rows(named=True):
            yield str(row["vehicle_id"]), encode_ping(row), 1


def send_messages(
    producer: Any,
    topic: str,
    messages: Iterable[tuple[str, bytes, int]],
    *,
    rate: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Send (key, value, pings) messages in order, at most ``rate`` pings/s (0: no limit),
    and wait for their delivery; returns (pings, messages) sent."""
    sent_pings = 0
    sent_messages = 0
    failures: list[str] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    started = time.monotonic()
    for key, value, count in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key.encode(), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)  # local queue full: let deliveries drain
        sent_pings += count
        sent_messages += 1
        producer.poll(0)
        if rate > 0:
            ahead = sent_pings / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        if progress and sent_messages % 10_000 == 0:
            progress(sent_pings)
    _flush(producer)
    if failures:
        raise DriverscoreError(f"kafka: {len(failures)} message(s) not delivered: {failures[0]}")
    return sent_pings, sent_messages


def replay_result(
    pings: pl.DataFrame, sent_pings: int, sent_messages: int, rejected_rows: int = 0
) -> ReplayResult:
    """What a replay of ``pings`` sent, with their first and last timestamps."""
    first = pings["ts"].min() if pings.height else None
    last = pings["ts"].max() if pings.height else None
    return ReplayResult(
        pings=sent_pings,
        messages=sent_messages,
        rejected_rows=rejected_rows,
        first_ts=first if isinstance(first, datetime) else None,
        last_ts=last if isinstance(last, datetime) else None,
    )


def _in_time_order(pings: pl.DataFrame) -> pl.DataFrame:
    # Stable: pings of one timestamp keep the file's order.
    return pings.with_row_index("_row").sort(["ts", "_row"]).drop("_row")


def send_clock(producer: Any, topic: str, ts: datetime) -> None:
    """A clock message at ``ts`` on every partition: trips idle since before it can close."""
    for partition in range(topic_partitions(producer, topic)):
        producer.produce(topic, value=encode_clock(ts), key=CLOCK_KEY.encode(), partition=partition)
    _flush(producer)


def topic_partitions(client: Any, topic: str, timeout_s: float = 10.0) -> int:
    """How many partitions ``topic`` has, from the broker's metadata."""
    try:
        # All topics: asking for one by name lets a broker auto-create it.
        metadata = client.list_topics(timeout=timeout_s).topics.get(topic)
    except KafkaException as exc:
        raise DriverscoreError(f"kafka: cannot read metadata of topic {topic!r}: {exc}") from None
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise DriverscoreError(
            f"kafka: topic {topic!r} does not exist; create it with `driverscore kafka init`"
        )
    return len(metadata.partitions)


def clock_after(last_ts: datetime, gap_s: float, grace_s: float) -> datetime:
    """Earliest event time at which a trip whose last ping is ``last_ts`` has closed."""
    return last_ts + timedelta(seconds=2 * gap_s + grace_s + 1)


def _flush(producer: Any, timeout_s: float = 60.0) -> None:
    try:
        remaining = producer.flush(timeout_s)
    except KafkaException as exc:
        raise DriverscoreError(f"kafka: {exc}") from None
    if remaining:
        raise DriverscoreError(f"kafka: {remaining} message(s) not delivered in {timeout_s:.0f}s")
