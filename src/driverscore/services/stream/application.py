"""The Quix Streams application around the processor: topics, flush ticker, consumer lag,
profile parts."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from driverscore.adapters.kafka.messages import CLOCK_KEY, encode_clock
from driverscore.domain.sessions import SessionRules, TripAssembler
from driverscore.services.profile_writer import PeriodicFlush
from driverscore.services.stream.metrics import StreamMetrics
from driverscore.services.stream.processor import OutMessage, PingProcessor, TripScoringStep
from driverscore.settings import KafkaConfig

__all__ = ["FlushTicker", "StreamApplication", "build_stream_application", "record_consumer_lag"]


class FlushTicker:
    """Sends a flush tick to partitions whose closed trips wait while no message comes.

    Trips are scored in batches once enough are waiting or the first has waited
    ``batch_wait_s``, and both are checked when a message arrives. When a partition goes
    quiet, this thread writes a clock message dated 1970 to it: it moves no event time
    and changes no trip, but its arrival makes the processor score what is waiting.
    """

    def __init__(
        self, processor: PingProcessor, bootstrap_servers: str, interval_s: float = 0.05
    ) -> None:
        self.processor = processor
        self.bootstrap_servers = bootstrap_servers
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flush-ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from confluent_kafka import Producer  # type: ignore[import-untyped]

        producer = Producer({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        tick = encode_clock(datetime(1970, 1, 1, tzinfo=UTC))
        sent: dict[Hashable, float] = {}
        while not self._stop.wait(self.interval_s):
            now = self.processor.clock()
            for partition in self.processor.overdue():
                if now - sent.get(partition, -math.inf) < max(self.processor.live_wait_s, 0.5):
                    continue  # one tick per partition until it had time to arrive
                topic, number = cast(tuple[str, int], partition)
                producer.produce(topic, value=tick, key=CLOCK_KEY.encode(), partition=number)
                sent[partition] = now
            producer.poll(0)
        producer.flush(5)


def record_consumer_lag(metrics: StreamMetrics, stats_json: str) -> None:
    """librdkafka's statistics → the consumer lag gauge, per topic partition.

    Lag is the partition's end (last stable offset under read_committed, else the high
    watermark) minus the next offset handed to the processor: librdkafka's own
    ``consumer_lag`` counts from the committed offset, which a consumer whose offsets are
    committed through producer transactions (exactly-once) never learns.
    """
    stats = json.loads(stats_json)
    for topic, info in (stats.get("topics") or {}).items():
        for partition, numbers in (info.get("partitions") or {}).items():
            if partition == "-1" or numbers.get("fetch_state") != "active":
                continue
            end = numbers.get("ls_offset", -1)
            if end is None or end < 0:
                end = numbers.get("hi_offset", -1)
            position = numbers.get("app_offset", -1)
            if position is None or position < 0:
                position = numbers.get("lo_offset", -1)  # nothing consumed yet
            if end is not None and end >= 0 and position is not None and position >= 0:
                metrics.consumer_lag.labels(topic, partition).set(max(end - position, 0))


def build_stream_application(
    config: KafkaConfig,
    step: TripScoringStep,
    state_dir: Path,
    metrics: StreamMetrics,
    *,
    auto_offset_reset: str = "earliest",
    loglevel: str = "WARNING",
    profile_flush_s: float = 300.0,
) -> StreamApplication:
    """The stream processor: the Quix Streams application and its flush ticker; ``.run()``.

    ``step`` scores the closed trips (its models, rollout policy and scoring path); its
    profile writer, when it has one, writes its parts every ``profile_flush_s`` and when
    the application stops.
    """
    from quixstreams import Application
    from quixstreams.models.serializers import SerializationContext, Serializer

    from driverscore.services.stream.quix_state import checkpoint_due, quix_step

    class _OutValue(Serializer):
        def __call__(self, value: OutMessage, ctx: SerializationContext) -> bytes:
            return value.value

    app = Application(
        broker_address=config.bootstrap_servers,
        consumer_group=config.consumer_group,
        auto_offset_reset=auto_offset_reset,  # type: ignore[arg-type]
        state_dir=str(state_dir),
        processing_guarantee=config.processing_guarantee,
        loglevel=loglevel,  # type: ignore[arg-type]
        commit_interval=config.commit_interval_s,
        # The run loop commits an expired checkpoint only once a poll returns: with Quix's
        # 1 s poll a partition gone quiet would hold its last outputs (readable at the
        # commit, under exactly-once) up to a second past the commit interval.
        consumer_poll_timeout=min(1.0, config.commit_interval_s / 4),
        consumer_extra_config={
            "session.timeout.ms": round(config.session_timeout_s * 1000),
            "statistics.interval.ms": 5000,
            "stats_cb": lambda stats: record_consumer_lag(metrics, stats),
        },
    )
    topics = config.topics
    pings = app.topic(topics.pings, key_deserializer="str", value_deserializer="bytes")
    outputs = {
        name: app.topic(name, key_serializer="str", value_serializer=_OutValue())
        for name in (
            topics.dlq,
            topics.trip_features,
            topics.scores,
            topics.alerts,
            topics.shadow_scores,
            topics.predictions,
            topics.routes,
        )
    }
    # Trips are cut with the trip rules (gap, max_trip_pings) of the champion at start; a
    # later champion scores with its own configs, but the cutting keeps these rules until
    # the processor restarts.
    rules = SessionRules.of_trips(step.scorer.card.trip_config, config.grace_s)
    processor = PingProcessor(
        step,
        TripAssembler(rules, defer=True),
        topics,
        metrics,
        batch_trips=config.score_batch_trips,
        batch_wait_s=config.score_batch_wait_s,
        catch_up_wait_s=config.score_catch_up_wait_s,
        # Exactly-once outputs are read at their transaction's commit: trips wait for it.
        commit_wait_s=(
            config.commit_interval_s
            if config.processing_guarantee == "exactly-once" and config.score_at_commit
            else None
        ),
        closed_at_header=config.closed_at_header,
    )
    ticker = FlushTicker(processor, config.bootstrap_servers)

    sdf = app.dataframe(pings)
    due = checkpoint_due(app) if processor.commit_wait_s is not None else None
    sdf = sdf.apply(quix_step(processor, due), stateful=True, metadata=True, expand=True)
    sdf = sdf.set_headers(lambda message, _key, _ts, _headers: message.headers)
    sdf.to_topic(
        lambda message, _key, _ts, _headers: outputs[message.topic],
        key=lambda message: message.key,
    )
    profiles = (
        PeriodicFlush(step.profile_writer, profile_flush_s)
        if step.profile_writer is not None
        else None
    )
    return StreamApplication(app, ticker, profiles)


@dataclass(frozen=True)
class StreamApplication:
    """The Quix application and its flush ticker; :meth:`run` runs both until stopped."""

    app: Any
    ticker: FlushTicker
    profiles: PeriodicFlush | None = None

    def run(self) -> None:
        self.ticker.start()
        if self.profiles is not None:
            self.profiles.start()
        try:
            self.app.run()
        finally:
            self.ticker.stop()
            if self.profiles is not None:
                self.profiles.stop()
