"""`driverscore stream`: per-trip features and scores from the pings topic (Quix Streams).

Wiring only. Messages are decoded by the ping contract (``adapters/kafka/messages.py``);
rejected ones go to the dead-letter topic with their original bytes and the reason in
headers. Pings are grouped per vehicle (the message key) into session windows whose
inactivity gap is the model card's ``TripConfig.gap_s`` - the rule batch uses to cut
trips - with a grace period for late pings. Sessions live in Quix's RocksDB state with
changelog topics, so open trips survive a restart. When a session closes its pings go
through the same ``prepare_trips`` and ``TripScorer`` as batch scoring, and the feature
rows, score records and alerts are published.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import orjson
import polars as pl
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from driverscore.adapters.kafka.messages import (
    CLOCK_KEY,
    DecodedMessage,
    decode_message,
    encode_batch,
    encode_clock,
    pings_frame,
)
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.rollout import RolloutPolicy, decide
from driverscore.domain.scoring import ModelCard, TripScorer
from driverscore.domain.sessions import (
    ClosedSession,
    KeyValue,
    PartitionScope,
    SessionRules,
    TripAssembler,
)
from driverscore.errors import NoModelError, ScoringServiceError
from driverscore.services.api.holder import ModelHolder
from driverscore.settings import KafkaConfig, KafkaTopics, Settings

__all__ = [
    "CLOSE_TRIGGER_HEADER",
    "FixedModels",
    "FlushTicker",
    "ModelSource",
    "OutMessage",
    "PingProcessor",
    "PolledModels",
    "ScoredSession",
    "StreamApplication",
    "StreamMetrics",
    "StreamModels",
    "TripOutput",
    "TripScoringStep",
    "alert_text",
    "build_stream_application",
    "record_consumer_lag",
    "stream_models",
    "trip_outputs",
]

log = logging.getLogger(__name__)

DLQ_REASON_HEADER = "driverscore.dlq.reason"
DLQ_SOURCE_HEADER = "driverscore.dlq.source"
#: On every trip output: Kafka timestamp (ms) of the input message whose arrival closed it.
CLOSE_TRIGGER_HEADER = "driverscore.close_trigger_ms"
_PARTITION_PREFIX = b"__partition__"


class StreamMetrics:
    """Prometheus metrics of one stream processor, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.messages = Counter(
            "driverscore_stream_messages",
            "Ping messages read, by outcome (accepted, clock, or the reject reason).",
            ["outcome"],
            registry=self.registry,
        )
        self.late_pings = Counter(
            "driverscore_stream_late_pings",
            "Pings later than the grace period allows; not part of any trip.",
            registry=self.registry,
        )
        self.trips = Counter(
            "driverscore_stream_trips",
            "Closed trips, by outcome (scored, set_aside, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.alerts = Counter(
            "driverscore_stream_alerts", "Alerts published.", registry=self.registry
        )
        self.scoring_seconds = Histogram(
            "driverscore_stream_trip_seconds",
            "Time to prepare and score the sessions one message closed.",
            registry=self.registry,
        )
        self.published = Counter(
            "driverscore_stream_published",
            "Messages published, by topic (features, scores, alerts, shadow, dead letters).",
            ["topic"],
            registry=self.registry,
        )
        self.consumer_lag = Gauge(
            "driverscore_stream_consumer_lag",
            "Messages behind the end of each input partition (librdkafka statistics).",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.close_to_publish = Histogram(
            "driverscore_stream_close_to_publish_seconds",
            "From reading the message that closes trips to handing their outputs to the producer.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.model = Gauge(
            "driverscore_stream_model",
            "1 for each model version the stream scores with, by role.",
            ["role", "version"],
            registry=self.registry,
        )


@dataclass(frozen=True)
class TripOutput:
    """What one scored trip publishes: its feature row, score record and maybe an alert."""

    trip_id: str
    features: bytes
    score: bytes
    alert: bytes | None


@dataclass(frozen=True)
class ScoredSession:
    """The trips of one closed session: feature rows, score records, and the alerting ones.

    ``alerts`` are the score records below the alert threshold plus an ``alert`` text.
    """

    features: pl.DataFrame
    records: pl.DataFrame
    alerts: pl.DataFrame
    #: Shadow mode: the challenger's records for the same trips (role ``shadow``).
    shadow: pl.DataFrame


def alert_text(score: float, alert_below_score: float) -> str:
    return f"score {score:.1f} below {alert_below_score:g}"


@dataclass(frozen=True)
class StreamModels:
    """The models a closed session is scored with (the challenger only when one is set)."""

    champion: TripScorer
    challenger: TripScorer | None = None
    #: The challenger under role ``shadow``: scores alongside the champion in shadow mode.
    shadow: TripScorer | None = None


class ModelSource(Protocol):
    def current(self) -> StreamModels: ...


@dataclass(frozen=True)
class FixedModels:
    """One model for the whole run (e.g. a named alias other than champion)."""

    scorer: TripScorer

    def current(self) -> StreamModels:
        return StreamModels(self.scorer)


class PolledModels:
    """Champion and challenger by registry alias, re-checked every ``poll_interval_s``.

    The REST service's :class:`~driverscore.services.api.holder.ModelHolder` does the
    loading: a moved alias swaps in the new version for every session closed after the
    poll; a registry that fails keeps the models already loaded (the holder logs it).
    """

    def __init__(
        self,
        holder: ModelHolder,
        poll_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.holder = holder
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        holder.refresh()
        if holder.models is None:
            raise NoModelError(f"no champion model to stream with: {holder.last_error}")
        self._next_poll = clock() + poll_interval_s

    def current(self) -> StreamModels:
        if self.clock() >= self._next_poll:
            self.holder.refresh()
            self._next_poll = self.clock() + self.poll_interval_s
        loaded = self.holder.models
        assert loaded is not None  # set at construction, never unset by a refresh
        return StreamModels(loaded.champion, loaded.challenger, loaded.shadow)


def _configs(card: ModelCard) -> tuple[str, str, str]:
    return (
        card.cleaning_config.model_dump_json(),
        card.trip_config.model_dump_json(),
        card.feature_config.model_dump_json(),
    )


class TripScoringStep:
    """A closed session's pings → trip features and score records, with the batch code.

    The one trip-closing function of every stream runner: the Kafka processor
    (:func:`build_stream_application`) and the embedded file replay
    (``services/stream_embedded.py``) both hand each closed session to :meth:`close`.
    Each trip is answered by the champion or the challenger as ``domain.rollout.decide``
    says for its driver (role and version in the record); in shadow mode the challenger's
    records come along with role ``shadow``.
    """

    def __init__(
        self,
        models: TripScorer | ModelSource,
        alert_below_score: float,
        metrics: StreamMetrics,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        policy: RolloutPolicy | None = None,
    ) -> None:
        self.models: ModelSource = FixedModels(models) if isinstance(models, TripScorer) else models
        self.alert_below_score = alert_below_score
        self.metrics = metrics
        self.now = now
        self.policy = policy or RolloutPolicy()
        self._shown: set[tuple[str, str]] = set()

    @property
    def scorer(self) -> TripScorer:
        """The current champion."""
        return self.models.current().champion

    def score_session(self, pings: list[dict[str, Any]]) -> ScoredSession | None:
        """Prepare and score one session's pings; None when no trip is long enough to score."""
        with self.metrics.scoring_seconds.time():
            now = self.now()
            models = self.models.current()
            self._show_models(models)
            frame = pings_frame(pings)
            prepared: dict[tuple[str, str, str], pl.DataFrame] = {}

            def features_for(card: ModelCard) -> pl.DataFrame:
                # What training learned travels with the model: each model's own configs.
                key = _configs(card)
                if key not in prepared:
                    prepared[key] = prepare_trips(
                        frame,
                        card.cleaning_config,
                        card.trip_config,
                        card.feature_config,
                        reference_time=now,
                    ).features
                return prepared[key]

            features = features_for(models.champion.card)
            if features.height == 0:
                self.metrics.trips.labels("set_aside").inc()
                return None
            if models.challenger is None:
                records = models.champion.score_trips(features, scored_at=now)
            else:
                records = self._split(models.champion, models.challenger, features_for, now)
            shadow = (
                models.shadow.score_trips(features_for(models.shadow.card), scored_at=now)
                if models.shadow is not None and self.policy.mode == "shadow"
                else records.clear()
            )
        low = records.filter(pl.col("score") < self.alert_below_score)
        alerts = low.with_columns(
            pl.Series(
                "alert",
                [alert_text(float(s), self.alert_below_score) for s in low["score"]],
                dtype=pl.String,
            )
        )
        self.metrics.trips.labels("scored").inc(records.height)
        self.metrics.alerts.inc(alerts.height)
        if not features["trip_id"].equals(records["trip_id"]):
            # A split reorders trips, and a challenger with other configs may cut other ones:
            # publish the feature rows of exactly the trips scored, in the records' order.
            pool = pl.concat(list(prepared.values()), how="diagonal_relaxed")
            features = (
                pool.unique("trip_id", keep="first", maintain_order=True)
                .filter(pl.col("trip_id").is_in(records["trip_id"].implode()))
                .sort("start_ts", "trip_id")
            )
        return ScoredSession(features, records, alerts, shadow)

    def _show_models(self, models: StreamModels) -> None:
        shown = {
            (role, scorer.model_version)
            for role, scorer in (
                ("champion", models.champion),
                ("challenger", models.challenger),
                ("shadow", models.shadow),
            )
            if scorer is not None
        }
        if shown != self._shown:
            for role, version in self._shown - shown:
                self.metrics.model.remove(role, version)
            for role, version in shown:
                self.metrics.model.labels(role, version).set(1)
            self._shown = shown

    def _split(
        self,
        champion: TripScorer,
        challenger: TripScorer,
        features_for: Callable[[ModelCard], pl.DataFrame],
        now: datetime,
    ) -> pl.DataFrame:
        """Each trip scored by the model ``decide`` picks for its driver."""
        parts: list[pl.DataFrame] = []
        for side, scorer in (("champion", champion), ("challenger", challenger)):
            rows = features_for(scorer.card)
            answered = [
                decide(self.policy, str(driver or vehicle), True).answered_by == side
                for driver, vehicle in rows.select("driver_id", "vehicle_id").iter_rows()
            ]
            mine = rows.filter(pl.Series(answered, dtype=pl.Boolean))
            if mine.height:
                parts.append(scorer.score_trips(mine, scored_at=now))
        return pl.concat(parts, how="vertical").sort("start_ts", "trip_id")

    def close(
        self, vehicle: str, start: object, pings: list[dict[str, Any]]
    ) -> ScoredSession | None:
        """:meth:`score_session`, but a session that fails is counted and logged, not raised.

        A trip that cannot be scored must not stop the stream; a scoring service that cannot
        score (``ScoringServiceError``) must, uncommitted, so no trip is lost.
        """
        try:
            return self.score_session(pings)
        except ScoringServiceError:
            raise
        except Exception:
            self.metrics.trips.labels("failed").inc()
            log.exception("trip of %s starting at %s could not be scored", vehicle, start)
            return None

    def close_sessions(self, sessions: list[ClosedSession]) -> list[ScoredSession]:
        """Score closed sessions together, one vehicle's session per group at most.

        Many sessions close at once when event time jumps (a clock message, a partition
        catching up); one ``prepare_trips`` over all of them costs a fraction of one per
        session and gives every trip the same row (a trip's features do not depend on
        other trips). A group that fails is retried one session at a time, so one bad trip
        does not take its neighbours down.
        """
        groups: list[list[ClosedSession]] = []
        for session in sessions:
            home = next(
                (g for g in groups if all(s.vehicle_id != session.vehicle_id for s in g)), None
            )
            if home is None:
                groups.append([session])
            else:
                home.append(session)
        scored: list[ScoredSession] = []
        for group in groups:
            pings = [p for s in group for p in s.pings]
            if len(group) == 1:
                result = self.close(group[0].vehicle_id, group[0].start_us, pings)
            else:
                try:
                    result = self.score_session(pings)
                except ScoringServiceError:
                    raise
                except Exception:
                    scored.extend(self.close_sessions_alone(group))
                    continue
            if result is not None:
                scored.append(result)
        return scored

    def close_sessions_alone(self, sessions: list[ClosedSession]) -> list[ScoredSession]:
        results = (self.close(s.vehicle_id, s.start_us, s.pings) for s in sessions)
        return [r for r in results if r is not None]

    def __call__(self, pings: list[dict[str, Any]]) -> list[TripOutput]:
        scored = self.score_session(pings)
        return trip_outputs(scored) if scored is not None else []


def trip_outputs(scored: ScoredSession) -> list[TripOutput]:
    """One closed session's trips as the JSON messages of the output topics."""
    feature_lines = scored.features.write_ndjson().splitlines()
    score_lines = scored.records.write_ndjson().splitlines()
    alert_lines = dict(
        zip(
            scored.alerts["trip_id"].to_list(),
            scored.alerts.write_ndjson().splitlines(),
            strict=True,
        )
    )
    return [
        TripOutput(
            str(trip_id),
            feature_line.encode(),
            score_line.encode(),
            alert_lines[trip_id].encode() if trip_id in alert_lines else None,
        )
        for trip_id, feature_line, score_line in zip(
            scored.records["trip_id"].to_list(), feature_lines, score_lines, strict=True
        )
    ]


@dataclass(frozen=True)
class OutMessage:
    """One message the processor publishes: the topic name, key, value bytes and headers."""

    topic: str
    key: str
    value: bytes
    headers: list[tuple[str, bytes]]


def _late_message(vehicle: str, late: list[dict[str, Any]]) -> bytes:
    rows = [{**p, "ts": datetime.fromtimestamp(int(p["ts"]) / 1e6, UTC)} for p in late]
    return encode_batch(vehicle, rows)


class PingProcessor:
    """One ping message in, its output messages out: decode, assemble trips, score.

    Kafka-free: the Quix Streams application calls :meth:`process` for every message with
    the message's partition state; tests call it with a ``MemoryScope``. Everything after
    decoding leaves through one list, so a trip's feature row, score record and alert are
    produced together (and, under exactly-once, committed in the same transaction).
    """

    def __init__(
        self,
        step: TripScoringStep,
        assembler: TripAssembler,
        topics: KafkaTopics,
        metrics: StreamMetrics,
        clock: Callable[[], float] = time.perf_counter,
        *,
        batch_trips: int = 1,
        batch_wait_s: float = 0.0,
    ) -> None:
        self.step = step
        self.assembler = assembler
        self.topics = topics
        self.metrics = metrics
        self.clock = clock
        self.batch_trips = batch_trips
        self.batch_wait_s = batch_wait_s
        #: Partitions with closed trips waiting to be scored, since when (``clock``).
        self.waiting: dict[Hashable, float] = {}
        # Label lookups cost more than the increments; every message does one or two.
        self._accepted = metrics.messages.labels("accepted")
        self._clocks = metrics.messages.labels("clock")
        self._published: dict[str, Any] = {}

    def process(
        self,
        value: bytes | None,
        key: str | None,
        timestamp_ms: int,
        headers: list[tuple[str, bytes]],
        scope: PartitionScope,
        source: str,
    ) -> list[OutMessage]:
        started = self.clock()
        decoded = decode_message(value, key)
        if decoded.error is None and decoded.clock_us is None and not key:
            decoded = DecodedMessage(error="key_mismatch: the message has no key (the vehicle id)")
        if decoded.error is not None:
            self.metrics.messages.labels(decoded.reason_code or "invalid").inc()
            reject = [
                (DLQ_REASON_HEADER, decoded.error.encode()),
                (DLQ_SOURCE_HEADER, source.encode()),
            ]
            return [self._out(self.topics.dlq, key or "", value or b"", [*headers, *reject])]
        if decoded.clock_us is not None:
            self._clocks.inc()
            assembled = self.assembler.advance(scope, decoded.clock_us)
        else:
            self._accepted.inc()
            assert key is not None
            assembled = self.assembler.add(scope, key, decoded.pings)
        out: list[OutMessage] = []
        if assembled.late:
            self.metrics.late_pings.inc(len(assembled.late))
            everything = len(assembled.late) == len(decoded.pings)
            reason = (
                f"late_ping: {len(assembled.late)} ping(s) behind a closed trip or more than "
                "gap + grace behind the partition's event time"
            )
            out.append(
                self._out(
                    self.topics.dlq,
                    key or "",
                    (value or b"") if everything else _late_message(str(key), assembled.late),
                    [
                        *headers,
                        (DLQ_REASON_HEADER, reason.encode()),
                        (DLQ_SOURCE_HEADER, source.encode()),
                    ],
                )
            )
        closed = assembled.closed
        if assembled.pending:
            since = self.waiting.setdefault(scope.partition, started)
            if (
                assembled.pending >= self.batch_trips
                or decoded.clock_us is not None
                or started - since >= self.batch_wait_s
            ):
                closed = closed + self.assembler.flush(scope)
                del self.waiting[scope.partition]
        if closed:
            trigger = [(CLOSE_TRIGGER_HEADER, str(timestamp_ms).encode())]
            for scored in self.step.close_sessions(closed):
                out.extend(self._trip_messages(scored, trigger))
            self.metrics.close_to_publish.observe(self.clock() - started)
        return out

    def overdue(self) -> list[Hashable]:
        """Partitions whose waiting trips are past ``batch_wait_s`` (for :class:`FlushTicker`)."""
        now = self.clock()
        waiting = dict(self.waiting)  # written by the processing thread
        return [p for p, since in waiting.items() if now - since >= self.batch_wait_s]

    def _trip_messages(
        self, scored: ScoredSession, headers: list[tuple[str, bytes]]
    ) -> list[OutMessage]:
        topics = self.topics
        out: list[OutMessage] = []
        vehicles = scored.records["vehicle_id"].to_list()
        for vehicle, trip in zip(vehicles, trip_outputs(scored), strict=True):
            out.append(self._out(topics.trip_features, vehicle, trip.features, headers))
            out.append(self._out(topics.scores, vehicle, trip.score, headers))
            if trip.alert is not None:
                out.append(self._out(topics.alerts, vehicle, trip.alert, headers))
        if scored.shadow.height:
            lines = scored.shadow.write_ndjson().splitlines()
            for vehicle, line in zip(scored.shadow["vehicle_id"].to_list(), lines, strict=True):
                out.append(self._out(topics.shadow_scores, vehicle, line.encode(), headers))
        return out

    def _out(
        self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]
    ) -> OutMessage:
        counter = self._published.get(topic)
        if counter is None:
            counter = self._published[topic] = self.metrics.published.labels(topic)
        counter.inc()
        return OutMessage(topic, key, value, headers)


class _QuixScope:
    """The partition state of the message being processed, as a ``PartitionScope``."""

    #: Vehicle id -> its state prefix, encoded as Quix encodes a string key (JSON).
    _prefixes: ClassVar[dict[str, bytes]] = {}

    def __init__(self, state: Any, partition: tuple[str, int]) -> None:
        # Quix hands a stateful function the state of the message's key only; trips of
        # idle vehicles close on other vehicles' messages, so the transaction behind it
        # (the same RocksDB store and changelog, same commit) is reached for their keys.
        self._transaction = state._transaction
        self._partition = partition

    @property
    def partition(self) -> tuple[str, int]:
        return self._partition

    @property
    def token(self) -> object:
        # One transaction per checkpoint; a rebalance always starts a new one.
        return self._transaction

    def vehicle(self, vehicle_id: str) -> KeyValue:
        prefix = self._prefixes.get(vehicle_id)
        if prefix is None:
            prefix = self._prefixes[vehicle_id] = orjson.dumps(vehicle_id)
        state: KeyValue = self._transaction.as_state(prefix=prefix)
        return state

    def shared(self) -> KeyValue:
        state: KeyValue = self._transaction.as_state(prefix=_PARTITION_PREFIX)
        return state


def _quix_step(processor: PingProcessor) -> Callable[..., list[OutMessage]]:
    def process(
        value: Any, key: Any, timestamp_ms: int, headers: Any, state: Any
    ) -> list[OutMessage]:
        from quixstreams import message_context

        ctx = message_context()
        scope = _QuixScope(state, (ctx.topic, ctx.partition))
        source = f"{ctx.topic}/{ctx.partition}/{ctx.offset}"
        return processor.process(value, key, timestamp_ms, list(headers or []), scope, source)

    return process


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
                if now - sent.get(partition, -math.inf) < max(self.processor.batch_wait_s, 0.5):
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
    models: TripScorer | ModelSource,
    state_dir: Path,
    metrics: StreamMetrics,
    *,
    auto_offset_reset: str = "earliest",
    loglevel: str = "WARNING",
) -> StreamApplication:
    """The stream processor: the Quix Streams application and its flush ticker; ``.run()``."""
    from quixstreams import Application
    from quixstreams.models.serializers import SerializationContext, Serializer

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
        )
    }
    step = TripScoringStep(models, config.alert_below_score, metrics, policy=config.rollout)
    # Trips are cut with the gap of the champion at start; a later champion scores with
    # its own configs, but the cutting keeps this gap until the processor restarts.
    rules = SessionRules.of(
        step.scorer.card.trip_config.gap_s, config.grace_s, config.max_trip_pings
    )
    processor = PingProcessor(
        step,
        TripAssembler(rules, defer=True),
        topics,
        metrics,
        batch_trips=config.score_batch_trips,
        batch_wait_s=config.score_batch_wait_s,
    )
    ticker = FlushTicker(processor, config.bootstrap_servers)

    sdf = app.dataframe(pings)
    sdf = sdf.apply(_quix_step(processor), stateful=True, metadata=True, expand=True)
    sdf = sdf.set_headers(lambda message, _key, _ts, _headers: message.headers)
    sdf.to_topic(
        lambda message, _key, _ts, _headers: outputs[message.topic],
        key=lambda message: message.key,
    )
    return StreamApplication(app, ticker)


@dataclass(frozen=True)
class StreamApplication:
    """The Quix application and its flush ticker; :meth:`run` runs both until stopped."""

    app: Any
    ticker: FlushTicker

    def run(self) -> None:
        self.ticker.start()
        try:
            self.app.run()
        finally:
            self.ticker.stop()


def stream_models(settings: Settings) -> ModelSource:
    """The stream's models: champion and challenger polled by alias, or one fixed alias;
    with ``kafka.scoring_url``, the champion's configs scored through the service."""
    from driverscore.adapters.registry import CHAMPION
    from driverscore.pipelines.training_run import open_registry

    config = settings.kafka
    if config.scoring_url is not None:
        from driverscore.services.stream_remote import remote_models

        return remote_models(settings)
    if config.model_alias != CHAMPION:
        return FixedModels(open_registry(settings).load_scorer(config.model_alias))
    return PolledModels(ModelHolder(lambda: open_registry(settings)), config.poll_interval_s)
