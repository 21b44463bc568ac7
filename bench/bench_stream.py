"""Stream processor throughput and latency: ``driverscore stream`` vs the Quix Streams ceiling.

Usage::

    .venv/bin/python bench/bench_stream.py                    # 300 vehicles, ~840k pings
    .venv/bin/python bench/bench_stream.py --vehicles 5 --timeout 120 --exactly-once

Broker: the one at ``DRIVERSCORE_KAFKA_BOOTSTRAP``, else a local single-node broker
(``LocalKafkaBroker``) started in a temporary folder and stopped at the end. Model: a
temporary driverscore home whose champion is trained on synthetic trips. Data: one day of
clean simulated 1 Hz pings (``--vehicles``, ``--seed``).

Cells: message mode (``single``: one ping per message; ``batch-50``: each vehicle's pings of
a 50 s event-time window in one message) × runner, one process each:

- ``ceiling``: ``bench/stream_ceiling.py``, a Quix Streams ``Application`` (the library
  ``driverscore stream`` is built on, same commit interval and guarantee) that consumes the
  pings as bytes and produces one small message per input message, no processing;
- ``driverscore``: ``python -m driverscore stream`` with ``DRIVERSCORE_HOME`` and
  ``DRIVERSCORE_KAFKA`` (fresh topics, consumer group and state folder per cell).

Processing guarantee: at-least-once; ``--exactly-once`` adds exactly-once cells for every
mode (single-ping messages included). Every cell gets its own output topics and consumer
group; outputs are read with a ``confluent_kafka.Consumer`` at ``isolation.level=read_committed``.

Throughput phase (pings/s, messages/s). All pings are produced into a fresh topic first
(``replay_pings``), followed by one clock message per partition (``send_clock``) at
``clock_after(last ping, gap, grace)`` so every trip closes; the mode's two runners read that
same topic, each with its own consumer group. Then the runner starts.

    start    = first moment the runner's consumer group is Stable with partitions assigned
               (``AdminClient.describe_consumer_groups``, polled every 50 ms): process
               start-up, model loading and the group join are excluded
    end      = arrival at the bench consumer of the last expected output message
    expected = ceiling: every input message (ping messages + clocks);
               driverscore: the trips batch scoring finds in the same pings
               (``prepare_trips`` with the champion card's configs, as tests/kafka do)
    pings/s  = pings in the topic / (end - start);  messages/s = input messages / (end - start)

If the expected outputs do not arrive within ``--timeout`` seconds, the cell is marked
partial and its rate is estimated from the group's committed offsets at the timeout:
committed input messages × (pings per message) / (timeout moment - start).

Latency phase (p50/p99 ms), only after a complete throughput phase. Fresh topics, the runner
started and its group Stable (+1 s) before the first ping is sent; a collector process
subscribed to the output topic before that. The first ``rate × --latency-s`` pings (in
timestamp order) are replayed live at ``rate`` pings/s (``replay_pings(rate=...)``), then
the clocks. ``rate`` is the same for both runners of a mode: ``--latency-rate``, or by default
half of driverscore's measured throughput in that mode, at most ``--max-latency-rate``;
the rate the producer achieved is reported (it is one Python process).

    latency = collector's wall clock at receipt (ms) - header ``driverscore.closed_ms``

For ``driverscore`` (run with ``KafkaConfig.closed_at_header``) that header is the Kafka
timestamp (CreateTime: the producer's wall clock at ``produce()``) of the input message at
which the trip closed, so the latency includes the time a closed trip waited to be scored
with others; versions without it are measured from ``driverscore.close_trigger_ms`` (the
message at which the trip was published, after that wait). For the ceiling the header
``driverscore.close_trigger_ms`` is the CreateTime of the message passed through.
Producer, broker, runner and collector share this machine's clock. Latency therefore
includes the producer's linger (20 ms), the broker, the runner's queueing and processing
and, under exactly-once, the wait for the transaction commit (the processor's commit
interval: ``KafkaConfig.commit_interval_s``, or 1 s in versions without that setting).
Score messages without the header count as ``missing``; with none at all the latency is
reported as n/a.

Targets (issue 14, printed as PASS/MISS lines): batch-50 ≥ 100,000 pings/s, single ≥
30,000 pings/s, p99 < 500 ms; single-ping messages ≥ 50 % (at-least-once) and ≥ 40 %
(exactly-once) of the same run's ceiling; single-ping at-least-once p99 ≤ the ceiling's p99
+ the scoring wait; state per open trip ≤ 2× its pings' message bytes. Each p99 line also
gives, for information, the p99 of the trips that closed after the replay's first second
(the runner idled since its start until the replay: its first transaction and the backlog
that leaves fall in that second).
Producer, broker, runner and consumers share the machine's cores (printed with the table).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from multiprocessing.synchronize import Event
from pathlib import Path
from queue import Empty
from typing import Any

import polars as pl
from confluent_kafka import (  # type: ignore[import-untyped]
    Consumer,
    ConsumerGroupState,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient  # type: ignore[import-untyped]

from driverscore.adapters.kafka.admin import create_topics
from driverscore.adapters.kafka.broker import LocalKafkaBroker, wait_until_ready
from driverscore.adapters.kafka.messages import decode_message
from driverscore.adapters.kafka.producer import (
    ReplayResult,
    clock_after,
    make_producer,
    ping_messages,
    replay_pings,
    replay_result,
    send_clock,
    send_messages,
)
from driverscore.adapters.registry import CHAMPION, open_registry
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.scoring import TripScorer
from driverscore.domain.sessions import TAIL_PINGS, MemoryScope, SessionRules, TripAssembler
from driverscore.settings import KafkaConfig, KafkaTopics, Settings
from driverscore.simulation import DirtConfig, SimulationConfig, simulate
from driverscore.training.synthetic import register_synthetic_model
from stream_ceiling import TRIGGER_HEADER

#: ``driverscore.services.stream.CLOSED_AT_HEADER`` (a name, so older versions run too).
CLOSED_HEADER = "driverscore.closed_ms"

MODES: dict[str, float] = {"single": 0.0, "batch-50": 50.0}  # mode -> batch_span_s (1 Hz)
RUNNERS = ("ceiling", "driverscore")
TARGET_PINGS_PER_S: dict[str, float] = {"single": 30_000.0, "batch-50": 100_000.0}
TARGET_P99_MS = 500.0
#: Single-ping messages against the same run's Quix Streams ceiling (issue 14).
TARGET_VS_CEILING: dict[tuple[str, str], float] = {
    ("single", "at-least-once"): 0.5,
    ("single", "exactly-once"): 0.4,
}
#: State a vehicle holds per open trip, against its pings' message bytes (issue 14).
TARGET_STATE_RATIO = 2.0
#: Latency cells also report the p99 of trips closed this long after the replay started.
SETTLE_S = 1.0
AT_LEAST_ONCE = "at-least-once"
EXACTLY_ONCE = "exactly-once"
CEILING_SCRIPT = Path(__file__).with_name("stream_ceiling.py")


class BenchError(RuntimeError):
    """A cell could not be measured (runner died, broker unreachable...)."""


# -- broker, model, data -------------------------------------------------------------------


@contextmanager
def kafka_broker() -> Iterator[tuple[str, str]]:
    """``(bootstrap, origin)``: the given broker, or a local one for the run."""
    given = os.environ.get("DRIVERSCORE_KAFKA_BOOTSTRAP")
    if given:
        wait_until_ready(given)
        yield given, "DRIVERSCORE_KAFKA_BOOTSTRAP"
        return
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as folder:
        broker = LocalKafkaBroker(Path(folder))
        bootstrap = broker.up()
        try:
            yield bootstrap, "LocalKafkaBroker (started for this run)"
        finally:
            broker.down()


def make_home(root: Path) -> TripScorer:
    """A driverscore home whose registry holds a champion trained on synthetic trips."""
    register_synthetic_model(
        open_registry(Settings(home=root)), trips=3000, seed=11, max_iter=40, code_version="bench"
    )
    return open_registry(Settings(home=root)).load_scorer(CHAMPION)


def batch_trip_count(pings: pl.DataFrame, scorer: TripScorer) -> int:
    """Trips batch scoring finds in ``pings``: the score messages the processor must publish."""
    card = scorer.card
    prepared = prepare_trips(
        pings, card.cleaning_config, card.trip_config, card.feature_config, datetime.now(UTC)
    )
    return int(prepared.features.height)


# -- topics, runners -----------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """What every cell shares."""

    bootstrap: str
    tag: str  # in every topic and group name of this run
    home: Path
    work: Path
    partitions: int
    gap_s: float
    timeout_s: float
    #: > 0: each driverscore runner runs under ``py-spy record`` for that many seconds.
    py_spy_s: float = 0.0
    py_spy_dir: Path = Path("bench/out")
    #: py-spy also samples waiting threads (wall time: commits, polls), stacks per thread.
    py_spy_idle: bool = False
    #: ``--set``: KafkaConfig fields given to every runner's settings.
    settings: tuple[tuple[str, Any], ...] = ()
    #: Latency phase: messages encoded before the paced replay starts (``--encode-live``:
    #: while sending, as the fifth round and earlier measured).
    encode_first: bool = True


def cell_config(bench: Bench, name: str, guarantee: str, pings_topic: str | None) -> KafkaConfig:
    """Fresh topics (the pings topic too unless given) and consumer group for one runner."""
    prefix = f"{bench.tag}-{name}"
    # Every topic of the contract, whichever this version of the settings lists.
    topics = {field: f"{prefix}-{field.replace('_', '-')}" for field in KafkaTopics.model_fields}
    if pings_topic:
        topics["pings"] = pings_topic
    return KafkaConfig(
        bootstrap_servers=bench.bootstrap,
        topics=KafkaTopics(**topics),
        partitions=bench.partitions,
        consumer_group=f"{prefix}-group",
        processing_guarantee=guarantee,
        state_dir=bench.work / f"{name}-state",
        # Outputs say when their trip closed: latency counts the wait for its batch.
        **({"closed_at_header": True} if "closed_at_header" in KafkaConfig.model_fields else {}),
        **dict(bench.settings),
    )


@dataclass
class Runner:
    kind: str
    process: subprocess.Popen[bytes]
    log: Path
    group: str
    output: str
    spawned: float  # time.monotonic()
    profiled: bool = False  # runs under py-spy

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise BenchError(f"{self.kind} exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            # py-spy writes its profile on Ctrl-C (and stops the processor), not on SIGTERM.
            self.process.send_signal(signal.SIGINT if self.profiled else signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_runner(bench: Bench, kind: str, name: str, config: KafkaConfig) -> Runner:
    """``driverscore stream`` or the ceiling app on ``config``'s topics, as a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVERSCORE_")}
    if kind == "driverscore":
        command = [sys.executable, "-m", "driverscore", "stream"]
        if bench.py_spy_s > 0:
            # Collapsed stacks of the processor (py-spy on PyPI), one file per cell.
            command = [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--format",
                "raw",
                "--nonblocking",
                *(["--idle", "--threads"] if bench.py_spy_idle else []),
                "--duration",
                str(round(bench.py_spy_s)),
                "-o",
                str(bench.py_spy_dir / f"{name}.pyspy.txt"),
                "--",
                *command,
            ]
        env.update(
            {"DRIVERSCORE_HOME": str(bench.home), "DRIVERSCORE_KAFKA": config.model_dump_json()}
        )
    else:
        command = [
            sys.executable,
            str(CEILING_SCRIPT),
            "--bootstrap",
            bench.bootstrap,
            "--input",
            config.topics.pings,
            "--output",
            config.topics.scores,
            "--group",
            config.consumer_group,
            "--guarantee",
            config.processing_guarantee,
            "--state-dir",
            str(bench.work / f"{name}-state"),
            "--commit-interval",
            str(commit_interval_s(config)),
        ]
    log = bench.work / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Runner(
        kind,
        process,
        log,
        config.consumer_group,
        config.topics.scores,
        time.monotonic(),
        profiled=kind == "driverscore" and bench.py_spy_s > 0,
    )


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process has used; None off Linux.

    On a machine shared with other work the runner's wall-clock rate follows the load of
    the moment; its CPU time per ping does much less.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commit_interval_s(config: KafkaConfig) -> float:
    """The processor's commit interval: the ceiling commits as often."""
    return float(getattr(config, "commit_interval_s", 1.0))  # 1 s before it was a setting


def group_assigned(admin: Any, group: str) -> bool:
    """The consumer group is Stable and a member holds partitions."""
    try:
        description = admin.describe_consumer_groups([group], request_timeout=5)[group].result()
    except KafkaException:
        return False
    return bool(
        description.state == ConsumerGroupState.STABLE
        and any(member.assignment.topic_partitions for member in description.members)
    )


def wait_group_assigned(bench: Bench, runner: Runner) -> float:
    """Monotonic time at which the runner's group was seen Stable with an assignment."""
    admin = AdminClient({"bootstrap.servers": bench.bootstrap, "log_level": 0})
    deadline = runner.spawned + bench.timeout_s
    while time.monotonic() < deadline:
        runner.check_alive()
        if group_assigned(admin, runner.group):
            return time.monotonic()
        time.sleep(0.05)
    raise BenchError(f"{runner.kind}: consumer group not assigned within {bench.timeout_s:.0f}s")


def committed_messages(bench: Bench, group: str, topic: str) -> int:
    """Input messages the group has committed on ``topic``."""
    consumer = Consumer({"bootstrap.servers": bench.bootstrap, "group.id": group, "log_level": 0})
    try:
        partitions = [TopicPartition(topic, p) for p in range(bench.partitions)]
        offsets = consumer.committed(partitions, timeout=10)
    finally:
        consumer.close()
    return sum(max(int(tp.offset), 0) for tp in offsets)


def output_consumer(bootstrap: str, topic: str) -> Any:
    """A read-committed consumer of ``topic`` from its start, assigned before it returns."""
    assigned: list[bool] = []
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "log_level": 0,
        }
    )
    consumer.subscribe([topic], on_assign=lambda _c, parts: assigned.append(bool(parts)))
    deadline = time.monotonic() + 60
    while not assigned and time.monotonic() < deadline:
        if consumer.poll(0.1) is not None:
            raise BenchError(f"{topic} is not empty before the runner started")
    if not assigned:
        raise BenchError(f"reader of {topic} got no partitions")
    return consumer


def delete_run_topics(bootstrap: str, tag: str) -> None:
    """Topics of this run (ours and the runners' changelogs) on a broker we did not start."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    names = [name for name in admin.list_topics(timeout=10).topics if tag in name]
    if not names:
        return
    for future in admin.delete_topics(names, operation_timeout=30).values():
        with suppress(KafkaException):
            future.result(timeout=60)


# -- throughput ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PingsTopic:
    """The pre-produced input of one mode's throughput cells."""

    name: str
    pings: int
    messages: int  # ping messages + clocks
    produce_s: float


def produce_all(bench: Bench, mode: str, pings: pl.DataFrame) -> PingsTopic:
    config = cell_config(bench, f"{mode}-input", AT_LEAST_ONCE, None)
    create_topics(config)
    producer = make_producer(bench.bootstrap)
    started = time.monotonic()
    result = replay_pings(producer, config.topics.pings, pings, batch_span_s=MODES[mode])
    send_closing_clocks(bench, producer, config.topics.pings, result)
    return PingsTopic(
        config.topics.pings,
        result.pings,
        result.messages + bench.partitions,
        time.monotonic() - started,
    )


def state_per_open_trip(pings: pl.DataFrame, mode: str, rules: SessionRules) -> dict[str, Any]:
    """Peak state bytes of a vehicle against the raw bytes of its open trip's pings.

    The mode's messages (``ping_messages``, as ``replay_pings`` sends them) go through the
    processor's assembler on an in-memory state of the same layout as the Quix store (MessagePack
    records and chunks; no broker). After each message, the message's vehicle's state bytes
    are compared with the bytes of the input messages its open sessions hold (a batch
    message's bytes shared equally by its pings). Reported: the vehicle state's peak with
    the raw bytes at that moment, and the highest ratio once a trip holds at least
    ``TAIL_PINGS`` pings (a trip's first pings carry the fixed cost of the record).
    """
    messages = ping_messages(pings, batch_span_s=MODES[mode])
    assembler, scope = TripAssembler(rules), MemoryScope()
    raw: dict[str, float] = {}
    count: dict[str, int] = {}
    size: dict[tuple[str, int], float] = {}
    peak = {"state_bytes": 0, "raw_bytes": 0.0, "pings": 0}
    worst = {"ratio": 0.0, "state_bytes": 0, "raw_bytes": 0.0, "pings": 0}
    for vehicle, value, _count in messages:
        decoded = decode_message(value, vehicle)
        out = assembler.add(scope, vehicle, decoded.pings)
        share = len(value) / len(decoded.pings)
        late = {int(p["ts"]) for p in out.late}
        for ping in decoded.pings:
            if int(ping["ts"]) not in late:
                size[(vehicle, int(ping["ts"]))] = share
                raw[vehicle] = raw.get(vehicle, 0.0) + share
                count[vehicle] = count.get(vehicle, 0) + 1
        for session in out.closed:
            for ping in session.pings:
                raw[session.vehicle_id] -= size.pop((session.vehicle_id, int(ping["ts"])), 0.0)
            count[session.vehicle_id] -= len(session.pings)
        held = count.get(vehicle, 0)
        if not held:
            continue
        state_bytes = scope.stored_bytes(vehicle)
        if state_bytes > peak["state_bytes"]:
            peak = {"state_bytes": state_bytes, "raw_bytes": raw[vehicle], "pings": held}
        ratio = state_bytes / raw[vehicle]
        if held >= TAIL_PINGS and ratio > worst["ratio"]:
            worst = {"ratio": ratio, "state_bytes": state_bytes, "raw_bytes": raw[vehicle]}
            worst["pings"] = held
    return {
        "mode": mode,
        "peak": peak,
        "peak_ratio": round(peak["state_bytes"] / peak["raw_bytes"], 3)
        if peak["raw_bytes"]
        else None,
        "worst": worst,
    }


def send_closing_clocks(bench: Bench, producer: Any, topic: str, result: ReplayResult) -> None:
    if result.last_ts is None:
        raise BenchError("no pings were sent")
    grace_s = KafkaConfig().grace_s  # the processor runs with the default grace
    send_clock(producer, topic, clock_after(result.last_ts, bench.gap_s, grace_s))


def measure_throughput(
    bench: Bench, kind: str, mode: str, guarantee: str, source: PingsTopic, expected: int
) -> dict[str, Any]:
    name = f"{mode}-{kind}-{guarantee}-tp"
    config = cell_config(bench, name, guarantee, source.name)
    create_topics(config)
    consumer = output_consumer(bench.bootstrap, config.topics.scores)
    admin = AdminClient({"bootstrap.servers": bench.bootstrap, "log_level": 0})
    runner = start_runner(bench, kind, name, config)
    start: float | None = None
    first_out: float | None = None
    last_out: float | None = None
    cpu_start = cpu_last = None
    received = 0
    next_check = 0.0
    deadline = runner.spawned + bench.timeout_s
    try:
        while received < expected and time.monotonic() < deadline:
            runner.check_alive()
            messages = consumer.consume(num_messages=10_000, timeout=0.05)
            now = time.monotonic()
            good = sum(1 for m in messages if m.error() is None)
            if good:
                received += good
                first_out = first_out if first_out is not None else now
                last_out = now
                cpu_last = process_cpu_s(runner.process.pid)
            if start is None and now >= next_check:
                if group_assigned(admin, runner.group):
                    start = time.monotonic()
                    cpu_start = process_cpu_s(runner.process.pid)
                next_check = time.monotonic() + 0.05
        complete = received >= expected
        if start is None:  # outputs came before the Stable state was seen
            start = first_out if first_out is not None else runner.spawned
        cell: dict[str, Any] = {
            "phase": "throughput",
            "mode": mode,
            "runner": kind,
            "guarantee": guarantee,
            "pings": source.pings,
            "messages": source.messages,
            "expected_outputs": expected,
            "outputs": received,
            "complete": complete,
            "startup_s": round(start - runner.spawned, 3),
            "first_output_after_start_s": (
                None if first_out is None else round(first_out - start, 3)
            ),
        }
        if complete and last_out is not None:
            elapsed = last_out - start
            cell.update(basis="outputs", elapsed_s=round(elapsed, 3))
            cell.update(
                pings_per_s=round(source.pings / elapsed),
                messages_per_s=round(source.messages / elapsed),
            )
            if cpu_start is not None and cpu_last is not None and cpu_last > cpu_start:
                cell.update(
                    cpu_s=round(cpu_last - cpu_start, 2),
                    pings_per_cpu_s=round(source.pings / (cpu_last - cpu_start)),
                )
        else:
            now = time.monotonic()
            consumed = committed_messages(bench, runner.group, source.name)
            elapsed = now - start
            pings_done = consumed * source.pings / source.messages
            cell.update(basis="committed offsets (partial)", elapsed_s=round(elapsed, 3))
            cell.update(
                committed_messages=consumed,
                pings_per_s=round(pings_done / elapsed) if elapsed > 0 else None,
                messages_per_s=round(consumed / elapsed) if elapsed > 0 else None,
            )
        return cell
    finally:
        runner.stop()
        consumer.close()


# -- latency -------------------------------------------------------------------------------


def trigger_ms(headers: list[tuple[str, bytes]] | None) -> int | None:
    """When the output's trip closed (ms): the ``driverscore.closed_ms`` header, else
    ``driverscore.close_trigger_ms`` (the ceiling's, and versions without the first), as
    an int (decimal text or 8-byte int)."""
    found: dict[str, int | None] = {}
    for key, value in headers or []:
        if key not in (CLOSED_HEADER, TRIGGER_HEADER) or value is None:
            continue
        try:
            found[key] = int(value.decode())
        except (UnicodeDecodeError, ValueError):
            found[key] = int.from_bytes(value, "big", signed=True) if len(value) == 8 else None
    return found.get(CLOSED_HEADER, found.get(TRIGGER_HEADER))


def collect_latencies(
    bootstrap: str,
    topic: str,
    ready: Event,
    stop: Event,
    expected: Any,  # multiprocessing Value('q'): 0 until the replay is done
    results: Any,  # multiprocessing Queue
) -> None:
    """Collector process: receive time - trigger header of every output message."""
    consumer = output_consumer(bootstrap, topic)
    ready.set()
    latencies: list[float] = []
    arrivals: list[float] = []
    closes: list[int] = []
    missing = 0
    try:
        while not stop.is_set():
            target = int(expected.value)
            if target and len(latencies) + missing >= target:
                break
            messages = consumer.consume(num_messages=1000, timeout=0.05)
            received_ms = time.time() * 1000.0
            for message in messages:
                if message.error() is not None:
                    continue
                sent_ms = trigger_ms(message.headers())
                if sent_ms is None:
                    missing += 1
                else:
                    latencies.append(received_ms - sent_ms)
                    arrivals.append(received_ms)
                    closes.append(sent_ms)
    finally:
        consumer.close()
        results.put(
            {
                "latencies_ms": latencies,
                "arrivals_ms": arrivals,
                "closed_ms": closes,
                "missing": missing,
            }
        )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def measure_latency(
    bench: Bench,
    kind: str,
    mode: str,
    guarantee: str,
    pings: pl.DataFrame,
    rate: float,
    latency_s: float,
    scorer: TripScorer,
) -> dict[str, Any]:
    name = f"{mode}-{kind}-{guarantee}-lat"
    config = cell_config(bench, name, guarantee, None)
    create_topics(config)
    count = max(1, min(pings.height, round(rate * latency_s)))
    subset = pings.with_row_index("_row").sort(["ts", "_row"]).drop("_row").head(count)
    trips = batch_trip_count(subset, scorer) if kind == "driverscore" else None

    ctx = mp.get_context("spawn")  # no fork of a process holding librdkafka threads
    ready, stop = ctx.Event(), ctx.Event()
    expected = ctx.Value("q", 0)
    results = ctx.Queue()
    collector = ctx.Process(
        target=collect_latencies,
        args=(bench.bootstrap, config.topics.scores, ready, stop, expected, results),
        daemon=True,
    )
    collector.start()
    runner: Runner | None = None
    try:
        if not ready.wait(90):
            raise BenchError("latency collector did not start")
        runner = start_runner(bench, kind, name, config)
        wait_group_assigned(bench, runner)
        time.sleep(1.0)  # partitions assigned, state recovered: the runner is idle
        producer = make_producer(bench.bootstrap)
        # Devices encode their own messages: building them during the paced replay would
        # take a core's share of this machine from the runner being measured.
        messages = (
            list(ping_messages(subset, batch_span_s=MODES[mode]))
            if bench.encode_first
            else ping_messages(subset, batch_span_s=MODES[mode])
        )
        started = time.monotonic()
        started_ms = time.time() * 1000.0
        sent = send_messages(producer, config.topics.pings, messages, rate=rate)
        result = replay_result(subset, *sent)
        # Trips still open at the end close at once, on the closing clocks (a mass close no
        # live fleet makes but after an outage): their latency is also reported apart.
        clocks_ms = time.time() * 1000.0
        send_closing_clocks(bench, producer, config.topics.pings, result)
        replay_s = time.monotonic() - started
        target = trips if trips is not None else result.messages + bench.partitions
        expected.value = max(target, 1)
        deadline = time.monotonic() + bench.timeout_s
        collected: dict[str, Any] | None = None
        while collected is None:
            runner.check_alive()
            if time.monotonic() > deadline:
                stop.set()
            try:
                collected = results.get(timeout=1.0)
            except Empty:
                continue
    finally:
        stop.set()
        if runner is not None:
            runner.stop()
        collector.join(timeout=30)
        if collector.is_alive():
            collector.terminate()
    latencies: list[float] = collected["latencies_ms"]
    missing: int = collected["missing"]
    cell: dict[str, Any] = {
        "phase": "latency",
        "mode": mode,
        "runner": kind,
        "guarantee": guarantee,
        "rate_target": round(rate),
        "rate_achieved": round(result.pings / replay_s),
        "encoded_first": bench.encode_first,
        "pings": result.pings,
        "messages": result.messages + bench.partitions,
        "expected_outputs": target,
        "outputs": len(latencies) + missing,
        "with_header": len(latencies),
        "missing_header": missing,
        "p50_ms": None,
        "p99_ms": None,
        "max_ms": None,
    }
    if latencies:
        cell.update(
            p50_ms=round(percentile(latencies, 50), 1),
            p99_ms=round(percentile(latencies, 99), 1),
            max_ms=round(max(latencies), 1),
        )
        # Where the slowest outputs fell: seconds after the first output, latency (ms).
        first = min(collected["arrivals_ms"])
        timed = zip(collected["arrivals_ms"], latencies, strict=True)
        slowest = sorted(timed, key=lambda pair: -pair[1])[:10]
        cell["slowest"] = [[round((at - first) / 1000, 2), round(ms, 1)] for at, ms in slowest]
        by_close = zip(collected["closed_ms"], latencies, strict=True)
        live = [ms for closed, ms in by_close if closed < clocks_ms]
        # Every output: the close header and its arrival (ms since the epoch), to line up
        # with a runner's own log.
        cell["outputs_ms"] = [
            [closed, round(at, 1)]
            for closed, at in zip(collected["closed_ms"], collected["arrivals_ms"], strict=True)
        ]
        cell["live_outputs"] = len(live)
        cell["end_outputs"] = len(latencies) - len(live)
        if live:
            cell["live_p50_ms"] = round(percentile(live, 50), 1)
            cell["live_p99_ms"] = round(percentile(live, 99), 1)
        # The runner's first second of traffic after idling since its start (first
        # transaction, the backlog it leaves) weighs ~15 % of a 10 s cell's trips: reported
        # apart, the verdicts stay on every trip.
        settled = [
            ms
            for closed, ms in zip(collected["closed_ms"], latencies, strict=True)
            if closed >= started_ms + SETTLE_S * 1000.0
        ]
        cell["settled_outputs"] = len(settled)
        if settled:
            cell["settled_p99_ms"] = round(percentile(settled, 99), 1)
    return cell


# -- report --------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def state_line(state: dict[str, Any]) -> str:
    peak, worst = state["peak"], state["worst"]
    return (
        f"state per open trip, {state['mode']}: peak {peak['state_bytes']:,} B holding "
        f"{peak['pings']:,} pings that came in {peak['raw_bytes']:,.0f} B of messages "
        f"({state['peak_ratio']}x); highest ratio from {TAIL_PINGS} pings on "
        f"{worst['ratio']:.2f}x ({worst['state_bytes']:,} B for {worst['pings']:,} pings)"
    )


def verdicts(rows: list[dict[str, Any]], states: list[dict[str, Any]] | None = None) -> list[str]:
    lines = []
    for state in states or []:
        ratio = state["worst"]["ratio"]
        lines.append(
            f"{'PASS' if ratio <= TARGET_STATE_RATIO else 'MISS'}  {state['mode']}: state per "
            f"open trip at most {ratio:.2f}x its pings' message bytes (target ≤ "
            f"{TARGET_STATE_RATIO:.0f}x)"
        )
    by_key = {(r["mode"], r["guarantee"], r["runner"]): r for r in rows}
    for row in rows:
        if row["runner"] != "driverscore":
            continue
        label = f"{row['mode']} {row['guarantee']}"
        target = TARGET_PINGS_PER_S[row["mode"]]
        rate = row.get("pings_per_s")
        if rate is None:
            lines.append(f"n/a   {label}: throughput not measured (target ≥ {target:,.0f} pings/s)")
        else:
            ok = rate >= target and row.get("complete", False)
            partial = "" if row.get("complete") else " (partial estimate)"
            lines.append(
                f"{'PASS' if ok else 'MISS'}  {label}: {rate:,.0f} pings/s{partial}"
                f" (target ≥ {target:,.0f})"
            )
        ratio_target = TARGET_VS_CEILING.get((row["mode"], row["guarantee"]))
        ratio = row.get("vs_ceiling")
        if ratio_target is not None and ratio is not None:
            cpu = row.get("vs_ceiling_cpu")
            lines.append(
                f"{'PASS' if ratio >= ratio_target else 'MISS'}  {label}: {ratio:.1%} of the"
                f" same run's ceiling (target ≥ {ratio_target:.0%})"
                + ("" if cpu is None else f"; per CPU second {cpu:.1%}")
            )
        p99 = row.get("p99_ms")
        if p99 is None:
            missing = row.get("missing_header")
            why = (
                f"no {TRIGGER_HEADER} header on {missing:,} output message(s)"
                if missing
                else "latency not measured"
            )
            lines.append(f"n/a   {label}: p99 {why} (target < {TARGET_P99_MS:.0f} ms)")
        else:
            ok = p99 < TARGET_P99_MS
            settled = row.get("settled_p99_ms")
            lines.append(
                f"{'PASS' if ok else 'MISS'}  {label}: p99 {p99:,.1f} ms"
                f" (target < {TARGET_P99_MS:.0f} ms)"
                + (
                    ""
                    if settled is None
                    else f"; trips closed after the replay's first {SETTLE_S:.0f} s:"
                    f" p99 {settled:,.1f} ms"
                )
            )
            ceiling = by_key.get((row["mode"], row["guarantee"], "ceiling"), {}).get("p99_ms")
            if (
                row["mode"] == "single"
                and row["guarantee"] == AT_LEAST_ONCE
                and ceiling is not None
            ):
                # Issue 14: single pings wait for their trip's batch, at most the scoring wait.
                bound = ceiling + KafkaConfig().score_batch_wait_s * 1000
                lines.append(
                    f"{'PASS' if p99 <= bound else 'MISS'}  {label}: p99 {p99:,.1f} ms"
                    f" (target ≤ the ceiling's {ceiling:,.1f} ms + the scoring wait ="
                    f" {bound:,.1f} ms)"
                )
    return lines


def merge_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode × guarantee × runner, with the ratio to that mode's ceiling."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for cell in cells:
        key = (cell["mode"], cell["guarantee"], cell["runner"])
        row = rows.setdefault(key, {"mode": key[0], "guarantee": key[1], "runner": key[2]})
        if cell["phase"] == "throughput":
            for field in (
                "pings_per_s",
                "messages_per_s",
                "complete",
                "basis",
                "elapsed_s",
                "cpu_s",
                "pings_per_cpu_s",
            ):
                row[field] = cell.get(field)
        else:
            for field in (
                "p50_ms",
                "p99_ms",
                "with_header",
                "missing_header",
                "rate_achieved",
                "live_p99_ms",
                "live_outputs",
                "settled_p99_ms",
                "settled_outputs",
            ):
                row[field] = cell.get(field)
    for (mode, guarantee, runner), row in rows.items():
        ceiling = rows.get((mode, guarantee, "ceiling"), {}).get("pings_per_s")
        own = row.get("pings_per_s")
        row["vs_ceiling"] = (
            round(own / ceiling, 3) if runner != "ceiling" and own and ceiling else None
        )
        ceiling_cpu = rows.get((mode, guarantee, "ceiling"), {}).get("pings_per_cpu_s")
        own_cpu = row.get("pings_per_cpu_s")
        row["vs_ceiling_cpu"] = (
            round(own_cpu / ceiling_cpu, 3)
            if runner != "ceiling" and own_cpu and ceiling_cpu
            else None
        )
    return list(rows.values())


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'mode':<9} {'guarantee':<14} {'runner':<12} {'pings/s':>10} {'msgs/s':>9} "
        f"{'elapsed':>8} {'vs ceil':>8} {'cpu s':>6} {'vs cpu':>7} {'lat rate':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'n':>7} {'live p99':>9} {'n live':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        flag = "" if row.get("complete", True) else "*"
        ratio = row.get("vs_ceiling")
        cpu_ratio = row.get("vs_ceiling_cpu")
        print(
            f"{row['mode']:<9} {row['guarantee']:<14} {row['runner']:<12} "
            f"{_num(row.get('pings_per_s')) + flag:>10} {_num(row.get('messages_per_s')):>9} "
            f"{_num(row.get('elapsed_s'), 1):>8} "
            f"{'' if ratio is None else f'{ratio:.1%}':>8} "
            f"{_num(row.get('cpu_s'), 1):>6} "
            f"{'' if cpu_ratio is None else f'{cpu_ratio:.1%}':>7} "
            f"{_num(row.get('rate_achieved')):>9} {_num(row.get('p50_ms'), 1):>8} "
            f"{_num(row.get('p99_ms'), 1):>8} {_num(row.get('with_header')):>7} "
            f"{_num(row.get('live_p99_ms'), 1):>9} {_num(row.get('live_outputs')):>7}"
        )
    print(
        "live p99: the outputs of trips that closed during the live replay, not on the "
        "closing clocks that end it"
    )
    if any(not row.get("complete", True) for row in rows):
        print("* partial: expected outputs not all received within --timeout; rate from offsets")


# -- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=300, help="simulated vehicles (1 day)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--partitions", type=int, default=2, help="partitions of every topic")
    parser.add_argument(
        "--modes", default="single,batch-50", help="comma list of " + ",".join(MODES)
    )
    parser.add_argument(
        "--runners", default=",".join(RUNNERS), help="comma list of ceiling,driverscore"
    )
    parser.add_argument(
        "--exactly-once", action="store_true", help="add exactly-once cells for every mode"
    )
    parser.add_argument("--only-exactly-once", action="store_true", help="exactly-once cells only")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--skip-throughput",
        action="store_true",
        help="latency cells only (needs --latency-rate)",
    )
    parser.add_argument(
        "--py-spy-s",
        type=float,
        default=0.0,
        help="profile each driverscore runner with py-spy for this many seconds (collapsed "
        "stacks beside --out)",
    )
    parser.add_argument(
        "--encode-live",
        action="store_true",
        help="latency phase: encode each message while replaying (default: all before)",
    )
    parser.add_argument(
        "--py-spy-idle",
        action="store_true",
        help="with --py-spy-s: sample waiting threads too (wall time), one stack root per thread",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="a KafkaConfig field for the runners, e.g. --set score_at_commit=false (repeatable)",
    )
    parser.add_argument("--latency-s", type=float, default=20.0, help="live replay length (s)")
    parser.add_argument(
        "--latency-rate", type=float, default=0.0, help="pings/s of the live replay (0: auto)"
    )
    parser.add_argument("--max-latency-rate", type=float, default=50_000.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase (s)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/bench_stream.json"))
    args = parser.parse_args()
    for name, allowed in (("modes", MODES), ("runners", RUNNERS)):
        chosen = [part.strip() for part in getattr(args, name).split(",") if part.strip()]
        unknown = [part for part in chosen if part not in allowed]
        if unknown or not chosen:
            parser.error(f"--{name}: unknown {unknown}; choose from {', '.join(allowed)}")
        setattr(args, name, chosen)
    settings = []
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in KafkaConfig.model_fields:
            parser.error(f"--set {item}: give FIELD=JSON with a KafkaConfig field")
        try:
            settings.append((name, json.loads(value)))
        except json.JSONDecodeError:
            parser.error(f"--set {item}: the value is not JSON (strings in quotes)")
    args.set = settings
    if args.skip_throughput and (args.skip_latency or args.latency_rate <= 0):
        parser.error("--skip-throughput measures latency only: give --latency-rate")
    return args


def latency_rate(args: argparse.Namespace, measured: dict[str, dict[str, Any]]) -> float | None:
    """Live replay rate of a mode's latency cells, the same for both runners.

    ``--latency-rate``, else half of driverscore's measured throughput (the ceiling's when
    driverscore was not run), at most ``--max-latency-rate``; ``None`` when nothing was
    measured completely.
    """
    if args.latency_rate > 0:
        return float(args.latency_rate)
    for kind in ("driverscore", "ceiling"):
        cell = measured.get(kind)
        if cell and cell.get("complete") and cell.get("pings_per_s"):
            return float(max(1.0, min(args.max_latency_rate, 0.5 * cell["pings_per_s"])))
    return None


def main() -> None:
    args = parse_args()
    tag = f"bench-{uuid.uuid4().hex[:6]}"
    print(f"simulating {args.vehicles} vehicles × 1 day (seed {args.seed})...", flush=True)
    pings = simulate(
        SimulationConfig(vehicles=args.vehicles, days=1, seed=args.seed, dirt=DirtConfig.clean())
    ).pings
    cells: list[dict[str, Any]] = []
    states: list[dict[str, Any]] = []
    errors: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-stream-") as folder,
        kafka_broker() as (
            bootstrap,
            origin,
        ),
    ):
        root = Path(folder)
        home, work = root / "home", root / "work"
        work.mkdir()
        print("registering a champion trained on synthetic trips...", flush=True)
        scorer = make_home(home)
        bench = Bench(
            bootstrap=bootstrap,
            tag=tag,
            home=home,
            work=work,
            partitions=args.partitions,
            gap_s=scorer.card.trip_config.gap_s,
            timeout_s=args.timeout,
            py_spy_s=args.py_spy_s,
            py_spy_dir=args.out.parent,
            py_spy_idle=args.py_spy_idle,
            settings=tuple(args.set),
            encode_first=not args.encode_live,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        trips = batch_trip_count(pings, scorer)
        print(
            f"{pings.height:,} pings, {pings['vehicle_id'].n_unique()} vehicles, {trips:,} trips;"
            f" broker {bootstrap} ({origin}), {args.partitions} partition(s), run {tag}",
            flush=True,
        )
        rules = SessionRules.of_trips(scorer.card.trip_config, KafkaConfig().grace_s)
        for mode in args.modes:
            states.append(state_per_open_trip(pings, mode, rules))
            print(f"[{mode}] state per open trip {json.dumps(states[-1])}", flush=True)
        try:
            for mode in args.modes:
                source = (
                    PingsTopic("", 1, 1, 0.0)
                    if args.skip_throughput
                    else produce_all(bench, mode, pings)
                )
                print(
                    f"[{mode}] produced {source.pings:,} pings in {source.messages:,} messages "
                    f"({source.pings / source.messages:.1f} pings/message) in "
                    f"{source.produce_s:.1f}s",
                    flush=True,
                )
                guarantees = [AT_LEAST_ONCE]
                if args.exactly_once:
                    guarantees.append(EXACTLY_ONCE)
                if args.only_exactly_once:
                    guarantees = [EXACTLY_ONCE]
                for guarantee in guarantees:
                    measured: dict[str, dict[str, Any]] = {}
                    for kind in args.runners:
                        label = f"[{mode} {guarantee} {kind}]"
                        expected = source.messages if kind == "ceiling" else trips
                        if args.skip_throughput:
                            measured[kind] = {"complete": True}
                            continue
                        try:
                            throughput = measure_throughput(
                                bench, kind, mode, guarantee, source, expected
                            )
                        except (BenchError, KafkaException) as exc:
                            errors.append(f"{label} throughput: {exc}")
                            print(f"{label} throughput FAILED: {exc}", flush=True)
                            continue
                        cells.append(throughput)
                        measured[kind] = throughput
                        print(f"{label} throughput {json.dumps(throughput)}", flush=True)
                    if args.skip_latency:
                        continue
                    rate = latency_rate(args, measured)
                    for kind in args.runners:
                        label = f"[{mode} {guarantee} {kind}]"
                        if rate is None or not measured.get(kind, {}).get("complete"):
                            print(f"{label} latency skipped: no complete throughput", flush=True)
                            continue
                        try:
                            latency = measure_latency(
                                bench, kind, mode, guarantee, pings, rate, args.latency_s, scorer
                            )
                        except (BenchError, KafkaException) as exc:
                            errors.append(f"{label} latency: {exc}")
                            print(f"{label} latency FAILED: {exc}", flush=True)
                            continue
                        cells.append(latency)
                        print(f"{label} latency {json.dumps(latency)}", flush=True)
        finally:
            if origin.startswith("DRIVERSCORE_KAFKA_BOOTSTRAP"):
                delete_run_topics(bootstrap, tag)

    rows = merge_rows(cells)
    print()
    print(
        f"driverscore stream vs Quix Streams ceiling: {pings.height:,} pings, "
        f"{args.partitions} partition(s), one process per runner, {os.cpu_count()} CPUs "
        f"shared with broker, producer and consumers"
    )
    print_table(rows)
    print()
    for state in states:
        print(state_line(state))
    print()
    for line in verdicts(rows, states):
        print(line)
    for error in errors:
        print(f"ERROR {error.splitlines()[0]}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "run": tag,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {
            "vehicles": args.vehicles,
            "seed": args.seed,
            "pings": pings.height,
            "trips": trips,
            "partitions": args.partitions,
            "modes": args.modes,
            "runners": args.runners,
            "latency_s": args.latency_s,
            "timeout_s": args.timeout,
            "broker": origin,
        },
        "environment": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "quixstreams": version("quixstreams"),
            "confluent_kafka": version("confluent-kafka"),
        },
        "targets": {
            "pings_per_s": TARGET_PINGS_PER_S,
            "p99_ms": TARGET_P99_MS,
        },
        "rows": rows,
        "cells": cells,
        "state_per_open_trip": states,
        "verdicts": verdicts(rows, states),
        "errors": errors,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
