"""Prometheus metrics of one stream processor."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["StreamMetrics"]


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
        self.quarantined_pings = Counter(
            "driverscore_stream_quarantined_pings",
            "Pings of closed sessions set aside by cleaning or trip cutting, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.trips = Counter(
            "driverscore_stream_trips",
            "Closed trips, by outcome (scored, set_aside, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.set_aside = Counter(
            "driverscore_stream_set_aside",
            "Trips (role answer) or shadow scores (role shadow) set aside by scoring, by "
            "reason; each is published on the dead-letter topic.",
            ["reason", "role"],
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
            "Messages published, by topic (features, scores, alerts, shadow, predictions, "
            "dead letters).",
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
