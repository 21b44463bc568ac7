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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import polars as pl
from prometheus_client import CollectorRegistry, Counter, Histogram

from driverscore.adapters.kafka.messages import CLOCK_KEY, decode_message, pings_frame
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.rollout import RolloutPolicy, decide
from driverscore.domain.scoring import ModelCard, TripScorer
from driverscore.errors import NoModelError
from driverscore.services.api.holder import ModelHolder
from driverscore.settings import KafkaConfig, Settings

__all__ = [
    "FixedModels",
    "ModelSource",
    "PolledModels",
    "ScoredSession",
    "StreamMetrics",
    "StreamModels",
    "TripOutput",
    "TripScoringStep",
    "alert_text",
    "build_stream_application",
    "stream_models",
    "trip_outputs",
]

log = logging.getLogger(__name__)

DLQ_REASON_HEADER = "driverscore.dlq.reason"
DLQ_SOURCE_HEADER = "driverscore.dlq.source"


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
            "Time to prepare and score one closed session.",
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

    @property
    def scorer(self) -> TripScorer:
        """The current champion."""
        return self.models.current().champion

    def score_session(self, pings: list[dict[str, Any]]) -> ScoredSession | None:
        """Prepare and score one session's pings; None when no trip is long enough to score."""
        with self.metrics.scoring_seconds.time():
            now = self.now()
            models = self.models.current()
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

        A trip that cannot be scored must not stop the stream.
        """
        try:
            return self.score_session(pings)
        except Exception:
            self.metrics.trips.labels("failed").inc()
            log.exception("trip of %s starting at %s could not be scored", vehicle, start)
            return None

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


def _decode_step(metrics: StreamMetrics) -> Callable[[Any, Any, int, Any], dict[str, Any]]:
    def decode(value: Any, key: Any, _timestamp: int, _headers: Any) -> dict[str, Any]:
        text_key = key.decode(errors="replace") if isinstance(key, bytes) else key
        decoded = decode_message(value, text_key)
        if decoded.error:
            metrics.messages.labels(decoded.reason_code or "invalid").inc()
        else:
            metrics.messages.labels("clock" if decoded.clock_us else "accepted").inc()
        events: list[dict[str, Any]] = decoded.pings
        if decoded.clock_us is not None:
            events = [{"ts": decoded.clock_us, "clock": True}]
        return {"events": events, "error": decoded.error, "raw": value}

    return decode


def _dlq_headers(value: Any, _key: Any, _ts: int, headers: Any) -> list[tuple[str, bytes]]:
    from quixstreams import message_context

    ctx = message_context()
    source = f"{ctx.topic}/{ctx.partition}/{ctx.offset}"
    return [
        *(headers or []),
        (DLQ_REASON_HEADER, str(value["error"]).encode()),
        (DLQ_SOURCE_HEADER, source.encode()),
    ]


def _scored_session(step: TripScoringStep) -> Callable[[Any, Any, int, Any], list[TripOutput]]:
    def score(window: Any, key: Any, _ts: int, _headers: Any) -> list[TripOutput]:
        if key == CLOCK_KEY:
            return []
        pings = [p for p in window["value"] if not p.get("clock")]
        if not pings:
            return []
        scored = step.close(str(key), window["start"], pings)
        return trip_outputs(scored) if scored is not None else []

    return score


def build_stream_application(
    config: KafkaConfig,
    models: TripScorer | ModelSource,
    state_dir: Path,
    metrics: StreamMetrics,
    *,
    auto_offset_reset: str = "earliest",
    loglevel: str = "WARNING",
) -> Any:
    """The Quix Streams application of the stream processor, ready for ``app.run()``."""
    from quixstreams import Application

    def on_late(
        value: Any,
        key: Any,
        timestamp_ms: int,
        late_by_ms: int,
        start: int,
        end: int,
        store_name: str,
        topic: str,
        partition: int,
        offset: int,
    ) -> bool:
        metrics.late_pings.inc()
        return True  # Quix logs it with the key and how late it was

    app = Application(
        broker_address=config.bootstrap_servers,
        consumer_group=config.consumer_group,
        auto_offset_reset=auto_offset_reset,  # type: ignore[arg-type]
        state_dir=str(state_dir),
        processing_guarantee=config.processing_guarantee,
        loglevel=loglevel,  # type: ignore[arg-type]
        commit_interval=1.0,
    )
    topics = config.topics
    pings = app.topic(topics.pings, key_deserializer="str", value_deserializer="bytes")

    def out(name: str) -> Any:
        return app.topic(name, key_serializer="str", value_serializer="bytes")

    step = TripScoringStep(models, config.alert_below_score, metrics, policy=config.rollout)
    # Sessions are cut with the gap of the champion at start; a later champion scores with
    # its own configs, but the windowing keeps this gap until the processor restarts.
    gap_ms = round(step.scorer.card.trip_config.gap_s * 1000)

    sdf = app.dataframe(pings)
    decoded = sdf.apply(_decode_step(metrics), metadata=True)

    rejected = decoded.filter(lambda m: m["error"] is not None)
    rejected = rejected.set_headers(_dlq_headers)
    rejected.apply(lambda m: m["raw"]).to_topic(out(topics.dlq))

    events = decoded.filter(lambda m: m["error"] is None).apply(lambda m: m["events"], expand=True)
    events = events.set_timestamp(lambda ping, _k, _ts, _h: int(ping["ts"]) // 1000)
    sessions = (
        events.session_window(
            inactivity_gap_ms=gap_ms, grace_ms=round(config.grace_s * 1000), on_late=on_late
        )
        .collect()
        .final(closing_strategy="partition")
    )
    trips = sessions.apply(_scored_session(step), expand=True, metadata=True)
    trips.apply(lambda t: t.features).to_topic(out(topics.trip_features))
    trips.apply(lambda t: t.score).to_topic(out(topics.scores))
    trips.filter(lambda t: t.alert is not None).apply(lambda t: t.alert).to_topic(
        out(topics.alerts)
    )
    return app


def stream_models(settings: Settings) -> ModelSource:
    """The stream's models: champion and challenger polled by alias, or one fixed alias."""
    from driverscore.adapters.registry import CHAMPION
    from driverscore.pipelines.training_run import open_registry

    config = settings.kafka
    if config.model_alias != CHAMPION:
        return FixedModels(open_registry(settings).load_scorer(config.model_alias))
    return PolledModels(ModelHolder(lambda: open_registry(settings)), config.poll_interval_s)
