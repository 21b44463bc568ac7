"""Operating the stream processor on a real broker: scale-out and failover, a champion moved
while it runs, late pings, shadow scoring and its metrics.

Every test runs `driverscore stream` as subprocesses (the real entry point, settings from
the environment, models from the MLflow registry) and compares what reaches the output
topics (read_committed) with batch scoring of the same pings.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from prometheus_client.parser import text_string_to_metric_families

from driverscore.adapters.kafka.messages import CLOCK_KEY, decode_message, encode_batch, encode_ping
from driverscore.adapters.kafka.producer import clock_after, make_producer, replay_pings, send_clock
from driverscore.adapters.registry import CHALLENGER, CHAMPION, ModelRegistry
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import TripScorer
from driverscore.services.stream import DLQ_REASON_HEADER, DLQ_SOURCE_HEADER
from driverscore.settings import KafkaConfig
from driverscore.simulation import DirtConfig, SimulationConfig, simulate

if TYPE_CHECKING:
    from conftest import StreamProcess, StreamStarter

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


# -- helpers --------------------------------------------------------------------------------


def _batch_scores(scorer: TripScorer, pings: pl.DataFrame) -> pl.DataFrame:
    """The reference: batch preparation and scoring of the same pings."""
    card = scorer.card
    now = datetime.now(UTC)
    prepared = prepare_trips(
        pings, card.cleaning_config, card.trip_config, card.feature_config, now
    )
    return scorer.score_trips(prepared.features, scored_at=now).sort("trip_id")


def _frame(messages: Sequence[Message]) -> pl.DataFrame:
    rows = [json.loads(m.value()) for m in messages]
    return pl.DataFrame(rows, infer_schema_length=None).sort("trip_id")


def _assert_each_trip_once_as_batch(got: pl.DataFrame, expected: pl.DataFrame) -> None:
    ids = got["trip_id"].to_list()
    duplicates = sorted({t for t in ids if ids.count(t) > 1})
    assert not duplicates, f"scored more than once: {duplicates}"
    missing = sorted(set(expected["trip_id"]) - set(ids))
    extra = sorted(set(ids) - set(expected["trip_id"]))
    assert not missing and not extra, f"missing {missing}, not in batch {extra}"
    got = got.sort("trip_id")
    assert got["ping_count"].to_list() == expected["ping_count"].to_list()
    assert got["score"].to_list() == pytest.approx(expected["score"].to_list(), abs=1e-9)
    assert got["risk_band"].to_list() == expected["risk_band"].to_list()


class TopicReader:
    """One read_committed consumer on an output topic for the whole test, read in phases."""

    def __init__(self, config: KafkaConfig, topic: str) -> None:
        self.topic = topic
        self.consumer = Consumer(
            {
                "bootstrap.servers": config.bootstrap_servers,
                "group.id": f"check-{topic}",
                "auto.offset.reset": "earliest",
                # Only what the stream committed: exactly-once output, no aborted attempts.
                "isolation.level": "read_committed",
                "log_level": 0,
            }
        )
        self.consumer.subscribe([topic])

    def read(
        self,
        count: int,
        alive: Sequence[StreamProcess],
        timeout_s: float = 90.0,
        settle_s: float = 2.0,
    ) -> list[Message]:
        """At least ``count`` new messages, then whatever else comes within ``settle_s``."""
        found: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            for stream in alive:
                if stream.process.poll() is not None:
                    pytest.fail(f"stream exited: {stream.tail()}")
            found.extend(self._poll(0.5))
        logs = "\n---\n".join(s.tail(1500) for s in alive)
        assert len(found) >= count, f"{self.topic}: {len(found)} of {count} in time; {logs}"
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            # Anything beyond the expected count would be a duplicate or a stray record.
            found.extend(self._poll(0.2))
        return found

    def _poll(self, timeout_s: float) -> list[Message]:
        message = self.consumer.poll(timeout_s)
        if message is None or message.error() is not None:
            return []
        return [message]

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def reader() -> Iterator[Callable[[KafkaConfig, str], TopicReader]]:
    readers: list[TopicReader] = []

    def open_reader(config: KafkaConfig, topic: str) -> TopicReader:
        readers.append(TopicReader(config, topic))
        return readers[-1]

    yield open_reader
    for one in readers:
        one.close()


def _wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.5) -> Any:
    """Polls ``check`` until it returns something truthy; fails with its last value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every_s)
    pytest.fail(f"{what}: not reached in {timeout_s:.0f}s (last: {last!r})")


def _admin(config: KafkaConfig) -> AdminClient:
    return AdminClient({"bootstrap.servers": config.bootstrap_servers, "log_level": 0})


def _group_assignment(admin: AdminClient, config: KafkaConfig) -> list[list[int]]:
    """Pings-topic partitions held by each member of the stream's consumer group (sorted)."""
    group = config.consumer_group
    description = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    return sorted(
        sorted(
            tp.partition
            for tp in member.assignment.topic_partitions
            if tp.topic == config.topics.pings
        )
        for member in description.members
    )


def _input_offsets(admin: AdminClient, config: KafkaConfig) -> tuple[list[int], list[int]]:
    """(end offsets, committed offsets of the stream's group) of every pings partition."""
    topic = config.topics.pings
    partitions = [TopicPartition(topic, p) for p in range(config.partitions)]
    ends = admin.list_offsets({tp: OffsetSpec.latest() for tp in partitions}, request_timeout=10)
    end = [ends[tp].result().offset for tp in partitions]
    request = [ConsumerGroupTopicPartitions(config.consumer_group, partitions)]
    answer = admin.list_consumer_group_offsets(request, request_timeout=10)
    committed = {
        tp.partition: tp.offset for tp in answer[config.consumer_group].result().topic_partitions
    }
    return end, [committed.get(p, -1) for p in range(config.partitions)]


def _vehicle_partitions(config: KafkaConfig, ends: Sequence[int]) -> dict[str, int]:
    """The partition of each vehicle, read back from the pings topic up to ``ends``."""
    consumer = Consumer(
        {
            "bootstrap.servers": config.bootstrap_servers,
            "group.id": f"where-{config.topics.pings}",
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    topic = config.topics.pings
    consumer.assign([TopicPartition(topic, p, 0) for p in range(config.partitions)])
    found: dict[str, int] = {}
    read = [0] * config.partitions
    deadline = time.monotonic() + 30
    try:
        while any(r < e for r, e in zip(read, ends, strict=True)) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            partition, offset = message.partition(), message.offset()
            read[partition] = max(read[partition], offset + 1)
            # Flush ticks of the processors are clock messages, and may come after ``ends``.
            if offset < ends[partition] and message.key() != CLOCK_KEY.encode():
                found[message.key().decode()] = partition
    finally:
        consumer.close()
    assert all(r >= e for r, e in zip(read, ends, strict=True)), f"read {read} of {ends}"
    return found


def _murmur2_partition(key: str, partitions: int) -> int:
    """The partition of a key under the Java client's partitioner (``murmur2_random``)."""
    data = key.encode()
    m, h = 0x5BD1E995, (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    whole = len(data) // 4 * 4
    for i in range(0, whole, 4):
        k = (int.from_bytes(data[i : i + 4], "little") * m) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = data[whole:]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h = ((h ^ tail[0]) * m) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _split_at_middle(pings: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, datetime]:
    middle: datetime = pings["ts"].sort()[pings.height // 2]
    return pings.filter(pl.col("ts") < middle), pings.filter(pl.col("ts") >= middle), middle


# -- 1. scale-out and failover ---------------------------------------------------------------


def _split_with_trips_open_on_both_sides(
    pings: pl.DataFrame,
    trips: pl.DataFrame,
    partition_of: dict[str, int],
    open_for: timedelta,
) -> datetime:
    """A moment when trips are open on partitions 0-1 and on 2-3 (two members under range
    assignment), after every partition has seen pings: cut there, both members hold open
    trips, so whichever is killed, the survivor must take over open trips of its own.
    """
    firsts = pings.group_by(
        pl.col("vehicle_id").replace_strict(partition_of, return_dtype=pl.Int64)
    ).agg(pl.col("ts").min())
    assert firsts.height == 4, "a partition without vehicles"
    every_partition_busy = firsts["ts"].max()
    best: tuple[tuple[int, int], datetime] | None = None
    for at in trips["end_ts"].to_list():
        if at <= every_partition_busy:
            continue
        # Started before the cut and not due to close by then (last ping + gap + grace).
        spanning = trips.filter((pl.col("start_ts") < at) & (pl.col("end_ts") + open_for >= at))
        sides = [partition_of[v] // 2 for v in spanning["vehicle_id"]]
        rank = (min(sides.count(0), sides.count(1)), len(sides))
        if best is None or rank > best[0]:
            best = (rank, at)
    assert best is not None and best[0][0] >= 1, "no moment with trips open on both sides"
    return best[1]


@pytest.fixture(scope="module")
def fleet_day() -> pl.DataFrame:
    """Ten vehicles: enough keys for every one of four partitions to carry traffic."""
    config = SimulationConfig(vehicles=10, days=1, seed=7, dirt=DirtConfig.clean())
    return simulate(config).pings


def test_two_processors_split_the_partitions_and_the_survivor_finishes_the_dead_ones_trips(
    start_stream: StreamStarter,
    kafka_config: KafkaConfig,
    scorer: TripScorer,
    fleet_day: pl.DataFrame,
    reader: Callable[[KafkaConfig, str], TopicReader],
) -> None:
    expected = _batch_scores(scorer, fleet_day)
    # A short session timeout: the group notices the killed member after 6 s, not 45 s.
    config = kafka_config.model_copy(update={"partitions": 4, "session_timeout_s": 6.0})
    first = start_stream(config, state="state-a")
    second = start_stream(config, state="state-b")
    admin = _admin(config)
    scores = reader(config, config.topics.scores)
    producer = make_producer(config.bootstrap_servers)
    topic = config.topics.pings
    partition_of = {v: _murmur2_partition(v, 4) for v in fleet_day["vehicle_id"].unique()}
    split = _split_with_trips_open_on_both_sides(
        fleet_day,
        expected,
        partition_of,
        open_for=timedelta(seconds=scorer.card.trip_config.gap_s + config.grace_s),
    )
    first_half = fleet_day.filter(pl.col("ts") < split)
    second_half = fleet_day.filter(pl.col("ts") >= split)

    def two_by_two() -> list[list[int]] | None:
        held = _group_assignment(admin, config)
        return held if [len(p) for p in held] == [2, 2] else None

    _wait_for("two members with two partitions each", two_by_two, timeout_s=60)
    replay_pings(producer, topic, first_half, batch_span_s=10)
    ends, _ = _input_offsets(admin, config)
    assert all(end > 0 for end in ends), f"a partition without vehicles: {ends}"
    # The producer partitions as computed above: trips are open on both members' partitions.
    assert _vehicle_partitions(config, ends) == {
        v: partition_of[v] for v in first_half["vehicle_id"].unique().to_list()
    }

    def all_committed() -> bool:
        end, committed = _input_offsets(admin, config)
        if end != committed:
            return False
        time.sleep(1.0)  # and it stays so: no flush tick on its way
        return _input_offsets(admin, config) == (end, committed)

    # Both members work: every partition's input is consumed and committed. The kill comes
    # between transactions: none is left open to hold read_committed readers back.
    _wait_for("first half committed on all four partitions", all_committed, timeout_s=60)
    assert two_by_two(), "the group rebalanced while the first half was processed"

    # The first member dies without a goodbye: its open trips live in changelog topics only.
    first.process.kill()
    first.process.wait()
    result = replay_pings(producer, topic, second_half, batch_span_s=10)
    assert result.last_ts is not None
    _wait_for(
        "the survivor holds all four partitions",
        lambda: _group_assignment(admin, config) == [[0, 1, 2, 3]],
        timeout_s=60,
    )
    send_clock(
        producer,
        topic,
        clock_after(result.last_ts, scorer.card.trip_config.gap_s, config.grace_s),
    )
    published = scores.read(expected.height, [second], timeout_s=90, settle_s=3.0)
    _assert_each_trip_once_as_batch(_frame(published), expected)


# -- 2. a champion moved while the processor runs ------------------------------------------


def test_a_champion_moved_on_the_registry_scores_the_trips_closed_after_the_next_poll(
    start_stream: StreamStarter,
    kafka_config: KafkaConfig,
    scorer: TripScorer,
    day_of_pings: pl.DataFrame,
    two_version_home: tuple[Path, ModelRegistry],
    reader: Callable[[KafkaConfig, str], TopicReader],
) -> None:
    home, registry = two_version_home
    expected = _batch_scores(scorer, day_of_pings)
    config = kafka_config.model_copy(update={"poll_interval_s": 1.0})
    stream = start_stream(config, home=home)
    scores = reader(config, config.topics.scores)
    producer = make_producer(config.bootstrap_servers)
    topic = config.topics.pings
    first_half, second_half, middle = _split_at_middle(day_of_pings)
    gap_s = scorer.card.trip_config.gap_s

    replay_pings(producer, topic, first_half, batch_span_s=10)
    # Event time of every partition reaches the middle: the trips over by then close.
    send_clock(producer, topic, middle)
    closed_by_middle = expected.filter(
        pl.col("end_ts") + timedelta(seconds=gap_s + config.grace_s) < middle
    )
    assert 0 < closed_by_middle.height < expected.height
    before = _frame(scores.read(closed_by_middle.height, [stream]))
    assert before["trip_id"].to_list() == closed_by_middle["trip_id"].to_list()
    assert set(before["model_version"]) == {"1"}

    registry.set_alias(CHAMPION, "2")
    time.sleep(2.5)  # > poll_interval_s: the next closing trip finds the alias moved
    result = replay_pings(producer, topic, second_half, batch_span_s=10)
    assert result.last_ts is not None
    send_clock(producer, topic, clock_after(result.last_ts, gap_s, config.grace_s))
    after = _frame(scores.read(expected.height - before.height, [stream], settle_s=3.0))
    assert set(after["model_version"]) == {"2"}
    assert set(after["model_role"]) == {"champion"}
    # Version 2 holds version 1's model files: the same scores, each trip once.
    _assert_each_trip_once_as_batch(pl.concat([before, after], how="diagonal_relaxed"), expected)


# -- 3. late pings -----------------------------------------------------------------------------


def test_a_ping_behind_a_closed_trip_goes_to_the_dead_letter_topic_and_traffic_flows_on(
    start_stream: StreamStarter,
    kafka_config: KafkaConfig,
    scorer: TripScorer,
    day_of_pings: pl.DataFrame,
    reader: Callable[[KafkaConfig, str], TopicReader],
) -> None:
    gap_s = scorer.card.trip_config.gap_s
    expected_all = _batch_scores(scorer, day_of_pings)
    # The vehicle with most trips; its first trip closes, the others are the traffic after.
    vehicle = str(expected_all["vehicle_id"].mode().sort()[0])
    pings = day_of_pings.filter(pl.col("vehicle_id") == vehicle).sort("ts")
    expected = expected_all.filter(pl.col("vehicle_id") == vehicle).sort("start_ts")
    assert expected.height >= 3
    first_trip = expected.row(0, named=True)
    closing = clock_after(first_trip["end_ts"], gap_s, kafka_config.grace_s)
    trip_pings = pings.filter(pl.col("ts") <= first_trip["end_ts"])
    later = pings.filter(pl.col("ts") > first_trip["end_ts"])
    assert later["ts"].min() > closing  # type: ignore[operator]

    stream = start_stream(kafka_config)
    scores = reader(kafka_config, kafka_config.topics.scores)
    dlq = reader(kafka_config, kafka_config.topics.dlq)
    producer = make_producer(kafka_config.bootstrap_servers)
    topic = kafka_config.topics.pings
    replay_pings(producer, topic, trip_pings, batch_span_s=10)
    send_clock(producer, topic, closing)
    closed = _frame(scores.read(1, [stream]))
    assert closed["trip_id"].to_list() == [first_trip["trip_id"]]

    # A single ping from inside the closed trip, then a batch mixing another such ping with
    # the first ping of the next trip: the late ones are set aside, the fresh one counts.
    inside = trip_pings.row(trip_pings.height // 2, named=True)
    late_alone = encode_ping({**inside, "ts": inside["ts"] + timedelta(milliseconds=500)})
    producer.produce(topic, value=late_alone, key=vehicle.encode())
    also_inside = trip_pings.row(trip_pings.height // 3, named=True)
    mixed = encode_batch(vehicle, [also_inside, later.row(0, named=True)])
    producer.produce(topic, value=mixed, key=vehicle.encode())
    producer.flush(30)
    result = replay_pings(producer, topic, later.slice(1), batch_span_s=10)
    assert result.last_ts is not None
    send_clock(producer, topic, clock_after(result.last_ts, gap_s, kafka_config.grace_s))

    dead = dlq.read(2, [stream])
    assert len(dead) == 2
    for message in dead:
        headers = dict(message.headers() or [])
        assert headers[DLQ_REASON_HEADER].decode().startswith("late_ping"), headers
        assert headers[DLQ_SOURCE_HEADER].decode().startswith(f"{topic}/")
        assert message.key() == vehicle.encode()
    # Wholly late: the original bytes. Partly late: a batch of just the late ping.
    assert dead[0].value() == late_alone
    decoded = decode_message(dead[1].value(), vehicle)
    assert decoded.error is None
    assert [p["ts"] for p in decoded.pings] == [round(also_inside["ts"].timestamp() * 1_000_000)]

    rest = _frame(scores.read(expected.height - 1, [stream], settle_s=3.0))
    # The late pings changed no trip: the rest scores as batch does, the first trip once.
    _assert_each_trip_once_as_batch(pl.concat([closed, rest], how="diagonal_relaxed"), expected)


# -- 4. shadow scoring ---------------------------------------------------------------------------


def test_shadow_mode_publishes_the_challengers_score_of_every_trip_on_the_shadow_topic(
    start_stream: StreamStarter,
    kafka_config: KafkaConfig,
    scorer: TripScorer,
    day_of_pings: pl.DataFrame,
    two_version_home: tuple[Path, ModelRegistry],
    reader: Callable[[KafkaConfig, str], TopicReader],
) -> None:
    home, registry = two_version_home
    registry.set_alias(CHALLENGER, "2")
    expected = _batch_scores(scorer, day_of_pings)
    config = kafka_config.model_copy(update={"rollout": RolloutPolicy(mode="shadow")})
    stream = start_stream(config, home=home)
    scores = reader(config, config.topics.scores)
    shadow = reader(config, config.topics.shadow_scores)
    producer = make_producer(config.bootstrap_servers)
    topic = config.topics.pings
    result = replay_pings(producer, topic, day_of_pings, batch_span_s=10)
    assert result.last_ts is not None
    send_clock(
        producer, topic, clock_after(result.last_ts, scorer.card.trip_config.gap_s, config.grace_s)
    )

    answered = _frame(scores.read(expected.height, [stream]))
    _assert_each_trip_once_as_batch(answered, expected)
    assert set(answered["model_role"]) == {"champion"}
    assert set(answered["model_version"]) == {"1"}
    logged = _frame(shadow.read(expected.height, [stream]))
    _assert_each_trip_once_as_batch(logged, expected)  # version 2 is version 1's files
    assert set(logged["model_role"]) == {"shadow"}
    assert set(logged["model_version"]) == {"2"}


# -- 5. metrics ------------------------------------------------------------------------------------


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_metrics_count_messages_outputs_models_latency_and_lag(
    guarantee: str,
    start_stream: StreamStarter,
    kafka_config: KafkaConfig,
    scorer: TripScorer,
    day_of_pings: pl.DataFrame,
    reader: Callable[[KafkaConfig, str], TopicReader],
) -> None:
    expected = _batch_scores(scorer, day_of_pings)
    port = _free_port()
    # Under exactly-once offsets are committed through the producer's transactions, which
    # librdkafka's own consumer_lag never sees: the gauge must not depend on it.
    kafka_config = kafka_config.model_copy(update={"processing_guarantee": guarantee})
    stream = start_stream(kafka_config, args=["--metrics-port", str(port)])
    scores = reader(kafka_config, kafka_config.topics.scores)
    producer = make_producer(kafka_config.bootstrap_servers)
    topic = kafka_config.topics.pings
    result = replay_pings(producer, topic, day_of_pings, batch_span_s=10)
    assert result.last_ts is not None
    send_clock(
        producer,
        topic,
        clock_after(result.last_ts, scorer.card.trip_config.gap_s, kafka_config.grace_s),
    )
    _assert_each_trip_once_as_batch(_frame(scores.read(expected.height, [stream])), expected)

    samples = _samples(port)
    t = kafka_config.topics
    assert samples[("driverscore_stream_messages_total", (("outcome", "accepted"),))] == (
        result.messages
    )
    # One closing clock per partition, plus any flush ticks.
    assert samples[("driverscore_stream_messages_total", (("outcome", "clock"),))] >= 2
    for output in (t.scores, t.trip_features):
        key = ("driverscore_stream_published_total", (("topic", output),))
        assert samples[key] == expected.height, output
    assert 'driverscore_stream_model{role="champion",version="1"} 1.0' in _metrics_text(port)
    closes = samples[("driverscore_stream_close_to_publish_seconds_count", ())]
    assert closes >= 1
    assert samples[("driverscore_stream_close_to_publish_seconds_sum", ())] > 0

    def lag() -> dict[str, float] | None:
        found = {
            dict(labels)["partition"]: value
            for (name, labels), value in _samples(port).items()
            if name == "driverscore_stream_consumer_lag" and dict(labels)["topic"] == topic
        }
        # Statistics come every 5 s: wait for both partitions, caught up.
        return found if set(found) == {"0", "1"} and not any(found.values()) else None

    _wait_for("consumer lag of both partitions at 0", lag, timeout_s=30, every_s=1.0)
