"""The stream processor on a real broker: parity with batch scoring, and the dead-letter topic.

`driverscore stream` runs as a subprocess (the real entry point, settings from the
environment, the model from the registry); pings are replayed with the producer adapter.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import polars as pl
import pytest
from confluent_kafka import Consumer, Message, Producer

from driverscore.adapters.kafka.admin import create_topics, topic_names
from driverscore.adapters.kafka.messages import encode_ping
from driverscore.adapters.kafka.producer import clock_after, make_producer, replay_pings, send_clock
from driverscore.domain.features import FEATURE_COLUMNS
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.scoring import TripScorer
from driverscore.services.stream import DLQ_REASON_HEADER, StreamMetrics, TripScoringStep
from driverscore.services.stream_embedded import MemoryScoreSink, run_embedded_stream
from driverscore.settings import KafkaConfig

if TYPE_CHECKING:
    from conftest import StreamProcess, StreamStarter

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _consume(
    config: KafkaConfig, topic: str, count: int, stream: StreamProcess, timeout_s: float = 300
) -> list[Message]:
    consumer = Consumer(
        {
            "bootstrap.servers": config.bootstrap_servers,
            "group.id": f"check-{topic}",
            "auto.offset.reset": "earliest",
            # Only what the stream committed: exactly-once output, no aborted attempts.
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    found: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            if stream.process.poll() is not None:
                pytest.fail(f"stream exited: {stream.log.read_text()[-3000:]}")
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                found.append(message)
        # A moment more: anything beyond the expected count would be a duplicate.
        end = time.monotonic() + 2
        while time.monotonic() < end:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                found.append(message)
    finally:
        consumer.close()
    assert len(found) >= count, (
        f"{topic}: {len(found)} of {count}; {stream.log.read_text()[-3000:]}"
    )
    return found


def _frame(messages: list[Message]) -> pl.DataFrame:
    rows = [json.loads(m.value()) for m in messages]
    return pl.DataFrame(rows, infer_schema_length=None).sort("trip_id")


def _records(lines: list[bytes] | list[str]) -> list[dict[str, object]]:
    """JSON records by trip id, without the wall-clock scoring time."""
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row.pop("scored_at", None)
    return sorted(rows, key=lambda row: str(row["trip_id"]))


def test_stream_scores_every_trip_exactly_as_batch_does(
    start_stream: StreamStarter,
    kafka_config: KafkaConfig,
    scorer: TripScorer,
    day_of_pings: pl.DataFrame,
) -> None:
    card = scorer.card
    now = datetime.now(UTC)
    batch = prepare_trips(
        day_of_pings, card.cleaning_config, card.trip_config, card.feature_config, now
    )
    expected = scorer.score_trips(batch.features, scored_at=now).sort("trip_id")
    assert expected.height >= 8
    stream_process = start_stream(kafka_config)

    producer = make_producer(kafka_config.bootstrap_servers)
    topic = kafka_config.topics.pings
    result = replay_pings(producer, topic, day_of_pings, batch_span_s=20)
    assert result.pings == day_of_pings.height
    assert result.last_ts is not None
    send_clock(
        producer,
        topic,
        clock_after(result.last_ts, card.trip_config.gap_s, kafka_config.grace_s),
    )

    score_messages = _consume(
        kafka_config, kafka_config.topics.scores, expected.height, stream_process
    )
    feature_messages = _consume(
        kafka_config, kafka_config.topics.trip_features, expected.height, stream_process
    )
    scores, features = _frame(score_messages), _frame(feature_messages)
    assert scores["trip_id"].to_list() == expected["trip_id"].to_list()
    assert features["trip_id"].to_list() == expected["trip_id"].to_list()
    numeric = [c for c in FEATURE_COLUMNS if expected.schema[c].is_numeric()]
    for column in numeric:
        assert features[column].to_list() == pytest.approx(
            expected[column].to_list(), rel=1e-12, abs=1e-12, nan_ok=True
        ), column
    assert scores["score"].to_list() == pytest.approx(expected["score"].to_list(), abs=1e-9)
    assert scores["risk_band"].to_list() == expected["risk_band"].to_list()
    assert scores["reasons"].to_list() == expected["reasons"].to_list()
    assert set(scores["model_version"]) == {scorer.model_version}

    # Alerts: the trips whose risk reaches the champion card's decision threshold (on this
    # clean day maybe none: both sides of the threshold are checked without a broker, in
    # test_stream_embedded.py and tests/unit/test_stream_processor.py).
    risky = expected.filter(pl.col("risk_probability") >= card.decision_threshold)
    alert_messages = _consume(
        kafka_config, kafka_config.topics.alerts, risky.height, stream_process
    )
    assert len(alert_messages) == risky.height
    if alert_messages:
        alerts = _frame(alert_messages)
        assert alerts["trip_id"].to_list() == risky["trip_id"].to_list()
        assert all(text.startswith("risk ") for text in alerts["alert"])
    # Every trip's decision on the predictions topic, keyed by driver.
    decision_messages = _consume(
        kafka_config, kafka_config.topics.predictions, expected.height, stream_process
    )
    decisions = _frame(decision_messages)
    assert decisions["trip_id"].to_list() == expected["trip_id"].to_list()
    assert decisions["champion_score"].to_list() == pytest.approx(expected["score"].to_list())
    for message in decision_messages:
        decision = json.loads(message.value())
        assert message.key() == (decision["driver_id"] or decision["vehicle_id"]).encode()

    # Every scored trip's route, keyed by vehicle, for the score store.
    route_messages = _consume(
        kafka_config, kafka_config.topics.routes, expected.height, stream_process
    )
    routes = _frame(route_messages)
    assert routes["trip_id"].to_list() == expected["trip_id"].to_list()
    assert all(m.key() == json.loads(m.value())["vehicle_id"].encode() for m in route_messages)

    # The embedded runner (no Kafka) publishes the very same records, field for field.
    sink = MemoryScoreSink()
    step = TripScoringStep(scorer, StreamMetrics())
    run_embedded_stream(day_of_pings, step, sink, grace_s=kafka_config.grace_s)
    for embedded, published in (
        (sink.scores, score_messages),
        (sink.features, feature_messages),
        (sink.alerts, alert_messages),
        (pl.concat([s.routes for s in sink.sessions]), route_messages),
    ):
        assert len(published) == embedded.height
        assert _records(embedded.write_ndjson().splitlines()) == _records(
            [m.value() for m in published]
        )


def test_poison_messages_reach_the_dead_letter_topic_while_good_traffic_flows(
    start_stream: StreamStarter,
    kafka_config: KafkaConfig,
    scorer: TripScorer,
    day_of_pings: pl.DataFrame,
) -> None:
    stream_process = start_stream(kafka_config)
    vehicle = day_of_pings["vehicle_id"][0]
    pings = day_of_pings.filter(pl.col("vehicle_id") == vehicle)
    producer: Producer = make_producer(kafka_config.bootstrap_servers)
    topic = kafka_config.topics.pings
    good = next(pings.iter_rows(named=True))
    poison = {
        b"{not json": "not_json",
        b"[1, 2]": "not_an_object",
        json.dumps({"schema_version": "9.0", "ts": 1, "vehicle_id": vehicle}).encode(): (
            "unsupported_schema_version"
        ),
        json.dumps({"schema_version": "1.0", "vehicle_id": vehicle, "lat": 1.0}).encode(): (
            "invalid_ping"
        ),
        encode_ping({**good, "vehicle_id": "someone-else"}): "key_mismatch",
    }
    for value in poison:
        producer.produce(topic, value=value, key=str(vehicle).encode())
    result = replay_pings(producer, topic, pings, batch_span_s=0)
    assert result.last_ts is not None
    send_clock(
        producer,
        topic,
        clock_after(result.last_ts, scorer.card.trip_config.gap_s, kafka_config.grace_s),
    )

    dead = _consume(kafka_config, kafka_config.topics.dlq, len(poison), stream_process)
    assert len(dead) == len(poison)
    for message in dead:
        headers = dict(message.headers() or [])
        reason = headers[DLQ_REASON_HEADER].decode()
        assert reason.split(":", 1)[0] == poison[message.value()]
        assert message.key() == str(vehicle).encode()

    card = scorer.card
    batch = prepare_trips(
        pings, card.cleaning_config, card.trip_config, card.feature_config, datetime.now(UTC)
    )
    scores = _frame(
        _consume(kafka_config, kafka_config.topics.scores, batch.features.height, stream_process)
    )
    assert scores["trip_id"].to_list() == batch.features["trip_id"].to_list()


def test_topics_are_created_once(kafka_config: KafkaConfig) -> None:
    first = create_topics(kafka_config)
    assert first.created == sorted(topic_names(kafka_config)) and first.existing == []
    again = create_topics(kafka_config)
    assert again.created == [] and again.existing == sorted(topic_names(kafka_config))


def test_a_killed_processor_resumes_open_trips_without_loss_or_duplicates(
    start_stream: StreamStarter,
    kafka_config: KafkaConfig,
    scorer: TripScorer,
    day_of_pings: pl.DataFrame,
) -> None:
    card = scorer.card
    batch = prepare_trips(
        day_of_pings, card.cleaning_config, card.trip_config, card.feature_config, datetime.now(UTC)
    )
    middle = day_of_pings["ts"].sort()[day_of_pings.height // 2]
    first_half = day_of_pings.filter(pl.col("ts") < middle)
    producer = make_producer(kafka_config.bootstrap_servers)
    topic = kafka_config.topics.pings

    first = start_stream(kafka_config, state="state-first")
    replay_pings(producer, topic, first_half, batch_span_s=20)
    time.sleep(8)  # trips are open mid-way; some offsets and state are committed
    first.process.kill()  # no clean shutdown
    first.process.wait()

    # A new process on an empty state folder: open trips come back from the changelog.
    second = start_stream(kafka_config, state="state-second")
    result = replay_pings(
        producer, topic, day_of_pings.filter(pl.col("ts") >= middle), batch_span_s=20
    )
    assert result.last_ts is not None
    send_clock(
        producer,
        topic,
        clock_after(result.last_ts, card.trip_config.gap_s, kafka_config.grace_s),
    )
    scores = _frame(
        _consume(kafka_config, kafka_config.topics.scores, batch.features.height, second)
    )
    assert scores["trip_id"].to_list() == batch.features["trip_id"].to_list()
    assert scores["ping_count"].to_list() == batch.features["ping_count"].to_list()
