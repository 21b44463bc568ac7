"""Kafka topics, models and stream processes for the tests that need the suite's broker
(``kafka_bootstrap``, tests/conftest.py). Every test uses topics and consumer groups of its
own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from driverscore.adapters.kafka.admin import create_topics
from driverscore.adapters.registry import CHAMPION, ModelRegistry, open_registry
from driverscore.domain.scoring import TripScorer
from driverscore.settings import KafkaConfig, KafkaTopics, Settings
from driverscore.simulation import DirtConfig, SimulationConfig, simulate
from driverscore.training.synthetic import register_synthetic_model


@pytest.fixture
def kafka_config(kafka_bootstrap: str) -> KafkaConfig:
    """Topics, consumer group and broker address no other test shares."""
    run = uuid.uuid4().hex[:8]
    return KafkaConfig(
        bootstrap_servers=kafka_bootstrap,
        topics=KafkaTopics(
            pings=f"pings-{run}",
            dlq=f"pings-dlq-{run}",
            trip_features=f"features-{run}",
            scores=f"scores-{run}",
            alerts=f"alerts-{run}",
            shadow_scores=f"shadow-{run}",
            routes=f"routes-{run}",
            predictions=f"predictions-{run}",
        ),
        partitions=2,
        consumer_group=f"stream-{run}",
        grace_s=30.0,
        processing_guarantee="exactly-once",
    )


CLEAN = DirtConfig.clean()


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A driverscore home whose registry holds a champion trained on synthetic trips."""
    root = tmp_path_factory.mktemp("stream-home")
    settings = Settings(home=root)
    registered, _ = register_synthetic_model(
        open_registry(settings), trips=3000, seed=11, max_iter=40, code_version="test"
    )
    assert registered.alias == CHAMPION
    return root


@pytest.fixture(scope="session")
def scorer(home: Path) -> TripScorer:
    return open_registry(Settings(home=home)).load_scorer(CHAMPION)


@pytest.fixture(scope="session")
def day_of_pings() -> pl.DataFrame:
    config = SimulationConfig(vehicles=4, days=1, seed=5, dirt=CLEAN)
    return simulate(config).pings


def stream_env(home: Path, config: KafkaConfig) -> dict[str, str]:
    """The environment of a `driverscore stream` subprocess: its home and Kafka config only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVERSCORE_")}
    env.update({"DRIVERSCORE_HOME": str(home), "DRIVERSCORE_KAFKA": config.model_dump_json()})
    return env


@dataclass
class StreamProcess:
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


StreamStarter = Callable[..., StreamProcess]


@pytest.fixture
def start_stream(home: Path, tmp_path: Path) -> Iterator[StreamStarter]:
    """Starts `driverscore stream` on a config's topics (created first); stops it after.

    ``start(config, state="state", *, home=None, args=())``: each process gets its own
    state folder under the test's tmp_path; ``home`` overrides the session's registry home,
    ``args`` are extra command-line options (e.g. ``--metrics-port``).
    """
    started: list[subprocess.Popen[bytes]] = []

    def start(
        config: KafkaConfig,
        state: str = "state",
        *,
        home: Path = home,
        args: Sequence[str] = (),
    ) -> StreamProcess:
        create_topics(config)
        config = config.model_copy(update={"state_dir": tmp_path / state})
        log = tmp_path / f"stream-{len(started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "driverscore", "stream", *args],
                env=stream_env(home, config),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        return StreamProcess(process, log)

    yield start
    for process in started:
        if process.poll() is not None:
            continue
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def two_version_home(home: Path, tmp_path: Path) -> tuple[Path, ModelRegistry]:
    """A copy of the session home whose registry also holds version 2 (the same model files).

    Version 1 stays champion; tests move aliases on the returned registry.
    """
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    registry = open_registry(Settings(home=copy))
    first = registry.client.get_model_version(registry.model_name, "1")
    registry.client.create_model_version(
        registry.model_name, source=first.source, run_id=first.run_id
    )
    return copy, registry


@dataclass(frozen=True)
class DruidEndpoints:
    broker: str
    overlord: str


@pytest.fixture(scope="session")
def druid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DruidEndpoints]:
    """A real Druid for the session: ``DRIVERSCORE_DRUID_URL`` (broker) and
    ``DRIVERSCORE_DRUID_OVERLORD`` when set, else a local single-machine Druid
    (``adapters/druid/druid.sh``, jars from Maven Central once), stopped at the end."""
    given = os.environ.get("DRIVERSCORE_DRUID_URL")
    if given:
        yield DruidEndpoints(given, os.environ.get("DRIVERSCORE_DRUID_OVERLORD", given))
        return
    from driverscore.adapters.druid.local import LocalDruid

    state = tmp_path_factory.mktemp("druid")
    local = LocalDruid(state)
    broker = local.up()
    try:
        overlord = (state / "coordinator").read_text(encoding="utf-8").strip()
        yield DruidEndpoints(broker, overlord)
    finally:
        local.down()
