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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from prometheus_client import CollectorRegistry, Counter, Histogram

from driverscore.adapters.kafka.messages import CLOCK_KEY, decode_message, pings_frame
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.scoring import TripScorer
from driverscore.settings import KafkaConfig

__all__ = [
    "ScoredSession",
    "StreamMetrics",
    "TripOutput",
    "TripScoringStep",
    "alert_text",
    "build_stream_application",
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


def alert_text(score: float, alert_below_score: float) -> str:
    return f"score {score:.1f} below {alert_below_score:g}"


class TripScoringStep:
    """A closed session's pings → trip features and score records, with the batch code.

    The one trip-closing function of every stream runner: the Kafka processor
    (:func:`build_stream_application`) and the embedded file replay
    (``services/stream_embedded.py``) both hand each closed session to :meth:`close`.
    """

    def __init__(
        self,
        scorer: TripScorer,
        alert_below_score: float,
        metrics: StreamMetrics,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.scorer = scorer
        self.alert_below_score = alert_below_score
        self.metrics = metrics
        self.now = now

    def score_session(self, pings: list[dict[str, Any]]) -> ScoredSession | None:
        """Prepare and score one session's pings; None when no trip is long enough to score."""
        with self.metrics.scoring_seconds.time():
            now = self.now()
            scorer = self.scorer
            card = scorer.card
            prepared = prepare_trips(
                pings_frame(pings),
                card.cleaning_config,
                card.trip_config,
                card.feature_config,
                reference_time=now,
            )
            if prepared.features.height == 0:
                self.metrics.trips.labels("set_aside").inc()
                return None
            records = scorer.score_trips(prepared.features, scored_at=now)
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
        return ScoredSession(prepared.features, records, alerts)

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
    scorer: TripScorer,
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

    card = scorer.card
    gap_ms = round(card.trip_config.gap_s * 1000)
    step = TripScoringStep(scorer, config.alert_below_score, metrics)

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
