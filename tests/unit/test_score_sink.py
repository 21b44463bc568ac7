"""The sink's loop without Kafka: offsets are committed only after the store took the batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from driverscore.adapters.kafka.consumer import ConsumedMessage
from driverscore.adapters.score_store import ScoreBatch
from driverscore.adapters.score_store.duckdb_store import DuckDBScoreStore, WriteReport
from driverscore.services.score_sink import ScoreSinkRunner
from driverscore.settings import KafkaTopics
from driverscore.simulation.score_records import random_score_records

TOPICS = KafkaTopics()
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def messages(frame: pl.DataFrame, topic: str = TOPICS.scores) -> list[ConsumedMessage]:
    return [
        ConsumedMessage(topic, 0, offset, None, line.encode())
        for offset, line in enumerate(frame.write_ndjson().splitlines())
    ]


@dataclass
class ScriptedSource:
    """Hands out its messages ``per_poll`` at a time and records every call."""

    queue: list[ConsumedMessage]
    per_poll: int = 10
    calls: list[str] = field(default_factory=list)
    assigned: bool = True

    def poll(self, max_messages: int, timeout_s: float) -> list[ConsumedMessage]:
        taken = self.queue[: min(max_messages, self.per_poll)]
        del self.queue[: len(taken)]
        self.calls.append(f"poll {len(taken)}")
        return taken

    def commit(self) -> None:
        self.calls.append("commit")


@dataclass
class RecordingStore:
    inner: DuckDBScoreStore
    calls: list[str]
    fail: bool = False

    def write(self, batch: ScoreBatch) -> WriteReport:
        if self.fail:
            raise OSError("disk full")
        self.calls.append(f"write {len(batch)}")
        return self.inner.write(batch)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def test_each_batch_is_written_before_its_offsets_are_committed(tmp_path: Path) -> None:
    frame = random_score_records(45, start=T0)
    source = ScriptedSource(messages(frame))
    store = RecordingStore(DuckDBScoreStore(tmp_path / "s.duckdb"), source.calls)
    runner = ScoreSinkRunner(store, TOPICS, batch_records=20, batch_wait_s=10.0, clock=Clock())
    stats = runner.run(source, stop_when_idle_s=1.0)
    writes_and_commits = [c for c in source.calls if not c.startswith("poll")]
    assert writes_and_commits == ["write 20", "commit", "write 20", "commit", "write 5", "commit"]
    assert (stats.messages, stats.records, stats.batches) == (45, 45, 3)


def test_a_failed_write_commits_nothing(tmp_path: Path) -> None:
    source = ScriptedSource(messages(random_score_records(5, start=T0)))
    store = RecordingStore(DuckDBScoreStore(tmp_path / "s.duckdb"), source.calls, fail=True)
    runner = ScoreSinkRunner(store, TOPICS, batch_records=5, batch_wait_s=10.0, clock=Clock())
    with pytest.raises(OSError, match="disk full"):
        runner.run(source, stop_when_idle_s=1.0)
    assert "commit" not in source.calls
    assert len(runner.pending) == 5  # still held: the next flush (or consumer) retries them


def test_a_revoke_writes_and_commits_what_is_waiting(tmp_path: Path) -> None:
    source = ScriptedSource(messages(random_score_records(7, start=T0)))
    store = RecordingStore(DuckDBScoreStore(tmp_path / "s.duckdb"), source.calls)
    runner = ScoreSinkRunner(store, TOPICS, batch_records=100, batch_wait_s=60.0, clock=Clock())
    runner._source = source
    runner.pending = source.poll(100, 1.0)
    runner.flush()  # what TopicReader's on_revoke calls
    assert source.calls[-2:] == ["write 7", "commit"]
    assert runner.pending == []
    runner.flush()  # nothing waiting: no write, no commit
    assert source.calls[-2:] == ["write 7", "commit"]
