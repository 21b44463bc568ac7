"""Prometheus metrics of one stream processor."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["MessageOutcomes", "StreamMetrics"]

_MESSAGES = "driverscore_stream_messages"
_MESSAGES_HELP = "Ping messages read, by outcome (accepted, clock, or the reject reason)."


class MessageOutcomes(Collector):
    """``driverscore_stream_messages_total`` by outcome, counted in plain integers.

    Every message counts once, and a labelled ``Counter`` takes a lock per increment, which
    cost about as much as a tenth of the rest of a single-ping message's processing. Only
    the processing thread counts; a scrape reads a copy.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counts: dict[str, int] = {"accepted": 0, "clock": 0}
        registry.register(self)

    def count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(_MESSAGES, _MESSAGES_HELP, labels=["outcome"])

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(_MESSAGES, _MESSAGES_HELP, labels=["outcome"])
        for outcome, count in list(self.counts.items()):
            family.add_metric([outcome], count)
        yield family


class StreamMetrics:
    """Prometheus metrics of one stream processor, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.messages = MessageOutcomes(self.registry)
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
