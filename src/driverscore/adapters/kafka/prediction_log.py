"""The prediction log on a Kafka topic: one JSON message per rollout decision.

The scale path of ``adapters/prediction_log.py``: where the service runs as several
replicas, their decisions meet in one topic (key: driver id, so one driver's decisions
stay in order) that the monitoring jobs consume. ``add`` only hands records to the
producer's queue (no network wait on the request path); ``flush`` waits for delivery.
"""

from __future__ import annotations

import threading
from dataclasses import fields
from datetime import datetime
from typing import Any

import orjson
import polars as pl
from confluent_kafka import (  # type: ignore[import-untyped]
    Consumer,
    KafkaException,
    Producer,
    TopicPartition,
)

from driverscore.adapters.prediction_log import (
    PREDICTION_LOG_SCHEMA,
    PredictionRecord,
    records_frame,
)
from driverscore.errors import DriverscoreError

__all__ = ["KafkaPredictionLog", "encode_prediction", "prediction_key"]

_FIELDS = tuple(f.name for f in fields(PredictionRecord))


def encode_prediction(record: PredictionRecord) -> bytes:
    """One decision as the JSON message of the predictions topic (the stream writes the same)."""
    return orjson.dumps({name: getattr(record, name) for name in _FIELDS})


def prediction_key(record: PredictionRecord) -> str:
    """The message key: the driver (the vehicle when none), so a driver's decisions stay in
    order on one partition."""
    return record.driver_id or record.vehicle_id or ""


class KafkaPredictionLog:
    """Publishes every decision to ``topic``; :meth:`read` reads the topic back."""

    def __init__(self, bootstrap_servers: str, topic: str, timeout_s: float = 10.0) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.timeout_s = timeout_s
        self._producer: Any = None
        self._failures: list[str] = []
        self._lock = threading.Lock()

    def setup(self) -> None:
        producer = Producer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "enable.idempotence": True,
                "linger.ms": 50,
                "log_level": 0,
            }
        )
        try:
            # All topics: asking for one by name lets a broker auto-create it.
            metadata = producer.list_topics(timeout=self.timeout_s).topics.get(self.topic)
        except KafkaException as exc:
            raise DriverscoreError(
                f"prediction log: Kafka at {self.bootstrap_servers} is unreachable ({exc})"
            ) from None
        if metadata is None or metadata.error is not None:
            raise DriverscoreError(
                f"prediction log: topic {self.topic!r} does not exist at "
                f"{self.bootstrap_servers}; create it with `driverscore kafka init`"
            )
        self._producer = producer

    def add(self, records: list[PredictionRecord]) -> None:
        producer = self._started()
        for record in records:
            key = prediction_key(record).encode()
            while True:
                try:
                    producer.produce(
                        self.topic,
                        value=encode_prediction(record),
                        key=key,
                        on_delivery=self._delivered,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)  # local queue full: let deliveries drain
        producer.poll(0)

    def flush(self) -> None:
        producer = self._started()
        remaining = producer.flush(self.timeout_s)
        with self._lock:
            failures, self._failures = self._failures, []
        if remaining or failures:
            detail = failures[0] if failures else f"{remaining} still queued"
            raise DriverscoreError(
                f"prediction log: {len(failures) + remaining} decision(s) not delivered to "
                f"{self.topic}: {detail}"
            )

    def read(self) -> pl.DataFrame:
        """Every decision on the topic so far, partition by partition."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": "driverscore-prediction-log-reader",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "log_level": 0,
            }
        )
        try:
            metadata = consumer.list_topics(self.topic, timeout=self.timeout_s).topics[self.topic]
            rows: list[dict[str, Any]] = []
            for partition in sorted(metadata.partitions):
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=self.timeout_s
                )
                if high <= low:
                    continue
                consumer.assign([TopicPartition(self.topic, partition, low)])
                offset = low
                while offset < high - 1:
                    message = consumer.poll(self.timeout_s)
                    if message is None:
                        raise DriverscoreError(
                            f"prediction log: reading {self.topic}/{partition} timed out"
                        )
                    if message.error():
                        continue
                    rows.append(orjson.loads(message.value()))
                    offset = message.offset()
        finally:
            consumer.close()
        return _rows_frame(rows)

    def _started(self) -> Any:
        if self._producer is None:
            raise DriverscoreError("prediction log: setup() was not called")
        return self._producer

    def _delivered(self, error: Any, _message: Any) -> None:
        if error is not None:
            with self._lock:
                self._failures.append(str(error))


def _rows_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    records = [
        PredictionRecord(
            **{
                **row,
                "logged_at": datetime.fromisoformat(row["logged_at"]),
            }
        )
        for row in rows
    ]
    frame = records_frame(records)
    assert list(frame.schema) == list(PREDICTION_LOG_SCHEMA)
    return frame
