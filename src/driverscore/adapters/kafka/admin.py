"""Create the topics of the streaming contract (``driverscore kafka init``)."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException  # type: ignore[import-untyped]
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[import-untyped]

from driverscore.errors import DriverscoreError
from driverscore.settings import KafkaConfig

__all__ = ["TopicSetup", "create_topics", "topic_names"]

_MS_PER_HOUR = 3_600_000


@dataclass(frozen=True)
class TopicSetup:
    """What ``create_topics`` did: topics created now and topics that already existed."""

    created: list[str]
    existing: list[str]


def topic_names(config: KafkaConfig) -> list[str]:
    t = config.topics
    return [
        t.pings,
        t.dlq,
        t.trip_features,
        t.scores,
        t.alerts,
        t.shadow_scores,
        t.predictions,
        t.routes,
    ]


def create_topics(config: KafkaConfig, timeout_s: float = 30.0) -> TopicSetup:
    """Create every contract topic that does not exist yet; existing ones are left as they are."""
    admin = AdminClient({"bootstrap.servers": config.bootstrap_servers, "log_level": 0})
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise DriverscoreError(f"kafka at {config.bootstrap_servers}: {exc}") from None
    retention = str(int(config.retention_hours * _MS_PER_HOUR))
    wanted = [name for name in topic_names(config) if name not in existing]
    new = [
        NewTopic(
            name,
            num_partitions=config.partitions,
            replication_factor=config.replication_factor,
            config={"retention.ms": retention},
        )
        for name in wanted
    ]
    created: list[str] = []
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items() if new else []:
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise DriverscoreError(f"kafka: cannot create topic {name}: {exc}") from None
    return TopicSetup(
        created=sorted(created),
        existing=sorted(n for n in topic_names(config) if n in existing),
    )
