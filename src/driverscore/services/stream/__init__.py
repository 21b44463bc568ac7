"""`driverscore stream`: per-trip features and scores from the pings topic (Quix Streams).

Modules, by concern:

- ``processor``: the Kafka-free processor (decode, assemble trips, score, outputs) and
  :class:`TripScoringStep`, the trip-closing step every runner shares;
- ``models``: where the models come from (fixed, polled from the registry) and how closed
  trips are scored (in process by the domain, or through the service: ``remote``);
- ``application``: the Quix Streams application, its flush ticker and consumer lag;
- ``quix_state``: the processor's state in Quix (the one module touching Quix internals);
- ``metrics``: the processor's Prometheus metrics.
"""

from driverscore.services.stream.application import (
    FlushTicker,
    StreamApplication,
    build_stream_application,
    record_consumer_lag,
)
from driverscore.services.stream.metrics import StreamMetrics
from driverscore.services.stream.models import (
    FixedModels,
    ModelSource,
    PolledModels,
    Scoring,
    stream_models,
    stream_scoring,
)
from driverscore.services.stream.processor import (
    CLOSE_TRIGGER_HEADER,
    CLOSED_AT_HEADER,
    DLQ_REASON_HEADER,
    DLQ_SOURCE_HEADER,
    OutMessage,
    PingProcessor,
    ScoredSession,
    TripScoringStep,
)

__all__ = [
    "CLOSED_AT_HEADER",
    "CLOSE_TRIGGER_HEADER",
    "DLQ_REASON_HEADER",
    "DLQ_SOURCE_HEADER",
    "FixedModels",
    "FlushTicker",
    "ModelSource",
    "OutMessage",
    "PingProcessor",
    "PolledModels",
    "ScoredSession",
    "Scoring",
    "StreamApplication",
    "StreamMetrics",
    "TripScoringStep",
    "build_stream_application",
    "record_consumer_lag",
    "stream_models",
    "stream_scoring",
]
