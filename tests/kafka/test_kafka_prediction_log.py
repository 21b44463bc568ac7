"""The service's prediction log on a real Kafka topic: what is added is read back, in order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from driverscore.adapters.kafka.admin import create_topics
from driverscore.adapters.kafka.prediction_log import KafkaPredictionLog
from driverscore.adapters.prediction_log import PREDICTION_LOG_SCHEMA, PredictionRecord
from driverscore.errors import DriverscoreError
from driverscore.settings import KafkaConfig

pytestmark = [pytest.mark.kafka]

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def _record(i: int, *, challenger: bool) -> PredictionRecord:
    return PredictionRecord(
        decision_id=f"d{i}",
        logged_at=T0 + timedelta(milliseconds=i),
        trip_id=f"v{i % 3}:{i}",
        driver_id=f"drv-{i % 3}",
        vehicle_id=f"v{i % 3}",
        rollout_mode="shadow" if challenger else "champion",
        answered_by="champion",
        model_name="driverscore-trip-risk",
        champion_version="1",
        champion_score=80.0 + i / 10,
        champion_probability=0.01 * (i % 7),
        challenger_version="2" if challenger else None,
        challenger_score=79.0 + i / 10 if challenger else None,
        challenger_probability=0.02 if challenger else None,
    )


def test_decisions_published_to_the_topic_are_read_back(kafka_config: KafkaConfig) -> None:
    create_topics(kafka_config)
    log = KafkaPredictionLog(kafka_config.bootstrap_servers, kafka_config.topics.predictions)
    log.setup()
    records = [_record(i, challenger=i % 2 == 0) for i in range(250)]
    log.add(records[:100])
    log.add(records[100:])
    log.flush()

    got = log.read()
    assert got.schema == PREDICTION_LOG_SCHEMA
    assert got.height == len(records)
    assert sorted(got["decision_id"].to_list()) == sorted(r.decision_id for r in records)
    by_id = {row["decision_id"]: row for row in got.iter_rows(named=True)}
    for record in records:
        row = by_id[record.decision_id]
        assert row["logged_at"] == record.logged_at
        assert row["challenger_score"] == record.challenger_score
        assert row["champion_probability"] == record.champion_probability
    # Keyed by driver: one driver's decisions keep their order within its partition.
    for driver in ("drv-0", "drv-1", "drv-2"):
        mine = got.filter(got["driver_id"] == driver)["logged_at"].to_list()
        assert mine == sorted(mine)


def test_a_missing_topic_is_a_clear_error_at_setup(kafka_config: KafkaConfig) -> None:
    missing = f"no-such-{kafka_config.topics.predictions}"
    log = KafkaPredictionLog(kafka_config.bootstrap_servers, missing)
    with pytest.raises(DriverscoreError, match=r"does not exist.*driverscore kafka init"):
        log.setup()
