"""Control of a local single-node Kafka broker (``broker.sh``), where commands find a broker,
and readiness checks.

The broker is fetched from Maven Central on first use (``mvn``, Java 17+) and runs as a
background JVM; its state folder (``<home>/kafka`` for ``driverscore kafka up``) holds
config, data, log, pid, ports and the bootstrap address, which outlive ``down``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from confluent_kafka import KafkaException  # type: ignore[import-untyped]
from confluent_kafka.admin import AdminClient  # type: ignore[import-untyped]

from driverscore.errors import DriverscoreError
from driverscore.settings import Settings

__all__ = [
    "BOOTSTRAP_SETTING",
    "BROKER_SCRIPT",
    "REACHABLE_TIMEOUT_S",
    "BrokerAddress",
    "BrokerError",
    "LocalKafkaBroker",
    "broker_state_dir",
    "require_broker",
    "resolve_bootstrap",
    "wait_until_ready",
]

BROKER_SCRIPT: Final = Path(__file__).with_name("broker.sh")
BOOTSTRAP_SETTING: Final = "DRIVERSCORE_KAFKA__BOOTSTRAP_SERVERS"
#: How long a command waits for the broker to answer before it says so: a live broker
#: answers a metadata request in milliseconds, and with interpreter start-up on a busy
#: machine the command still reports within 5 s.
REACHABLE_TIMEOUT_S: Final = 2.5


class BrokerError(DriverscoreError):
    """The local broker could not be started, stopped or reached."""


@dataclass(frozen=True)
class LocalKafkaBroker:
    """A broker whose state lives in ``state_dir``; ``up`` returns its bootstrap address."""

    state_dir: Path
    timeout_s: float = 120.0

    def _run(self, command: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "DRIVERSCORE_KAFKA_DIR": str(self.state_dir),
            "DRIVERSCORE_KAFKA_TIMEOUT": str(int(self.timeout_s)),
            # The readiness check needs confluent-kafka: this interpreter has it.
            "PYTHON": sys.executable,
        }
        return subprocess.run(
            ["bash", str(BROKER_SCRIPT), command],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            # Includes a first-run jar download (about 10 s on a fast link).
            timeout=self.timeout_s + 300,
        )

    def up(self) -> str:
        """Start the broker (or find it running) and return ``host:port``."""
        done = self._run("up")
        if done.returncode != 0:
            raise BrokerError(f"kafka did not start: {done.stderr.strip()[-2000:]}")
        return done.stdout.strip().splitlines()[-1]

    def down(self) -> None:
        """Stop the broker; no error when it is not running."""
        done = self._run("down")
        if done.returncode != 0:
            raise BrokerError(f"kafka did not stop: {done.stderr.strip()[-2000:]}")

    def reset(self) -> None:
        """Stop the broker and delete its data, cluster id and ports (every topic and offset)."""
        done = self._run("reset")
        if done.returncode != 0:
            raise BrokerError(f"kafka was not reset: {done.stderr.strip()[-2000:]}")

    def status(self) -> str | None:
        """Bootstrap address when running, else ``None``."""
        done = self._run("status")
        return done.stdout.strip() if done.returncode == 0 else None


def wait_until_ready(bootstrap_servers: str, timeout_s: float = 60.0) -> None:
    """Block until the cluster answers a metadata request with at least one broker."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if admin.list_topics(timeout=2).brokers:
                return
        except KafkaException:
            pass
        if time.monotonic() > deadline:
            raise BrokerError(f"kafka at {bootstrap_servers} not reachable after {timeout_s:.0f}s")
        time.sleep(0.5)


def broker_state_dir(home: Path) -> Path:
    """Where ``driverscore kafka up`` keeps the broker of a home."""
    return (home / "kafka").resolve()


@dataclass(frozen=True)
class BrokerAddress:
    """The bootstrap address a command uses and where it came from."""

    bootstrap_servers: str
    origin: Literal["setting", "recorded", "default"]
    state_dir: Path

    def unreachable_message(self, timeout_s: float) -> str:
        """One line: which address, where it came from, what to do."""
        head = f"kafka at {self.bootstrap_servers}"
        waited = f"did not answer within {timeout_s:g} s"
        if self.origin == "setting":
            return (
                f"{head} (from {BOOTSTRAP_SETTING}) {waited}: start that broker, or correct "
                f"or unset {BOOTSTRAP_SETTING}"
            )
        if self.origin == "recorded":
            return (
                f"{head} (recorded by `driverscore kafka up` in {self.state_dir}) {waited}: "
                "start it with `driverscore kafka up` (same home), or set "
                f"{BOOTSTRAP_SETTING} to another broker"
            )
        return (
            f"{head} (the default: no broker started by `driverscore kafka up` in "
            f"{self.state_dir}) {waited}: run `driverscore kafka up`, or set "
            f"{BOOTSTRAP_SETTING} to your cluster"
        )


def resolve_bootstrap(settings: Settings) -> BrokerAddress:
    """The broker every command of a home uses.

    In order: ``kafka.bootstrap_servers`` when set explicitly (``DRIVERSCORE_KAFKA__``
    ``BOOTSTRAP_SERVERS``, the ``DRIVERSCORE_KAFKA`` JSON, or in code); else the address
    ``driverscore kafka up`` recorded in ``<home>/kafka``; else the setting's default.
    """
    kafka = settings.kafka
    state_dir = broker_state_dir(settings.home)
    if "bootstrap_servers" in kafka.model_fields_set:
        return BrokerAddress(kafka.bootstrap_servers, "setting", state_dir)
    try:
        recorded = (state_dir / "bootstrap").read_text(encoding="utf-8").strip()
    except OSError:
        recorded = ""
    if recorded:
        return BrokerAddress(recorded, "recorded", state_dir)
    return BrokerAddress(kafka.bootstrap_servers, "default", state_dir)


def require_broker(settings: Settings, timeout_s: float = REACHABLE_TIMEOUT_S) -> Settings:
    """``settings`` with the resolved broker address, once that broker has answered.

    Raises :class:`BrokerError` with one line (address, its origin, what to do) when it
    does not answer within ``timeout_s``: the Kafka clients would otherwise retry for
    minutes without a word.
    """
    address = resolve_bootstrap(settings)
    admin = AdminClient({"bootstrap.servers": address.bootstrap_servers, "log_level": 0})
    try:
        answered = bool(admin.list_topics(timeout=timeout_s).brokers)
    except KafkaException:
        answered = False
    if not answered:
        raise BrokerError(address.unreachable_message(timeout_s))
    kafka = settings.kafka.model_copy(update={"bootstrap_servers": address.bootstrap_servers})
    return settings.model_copy(update={"kafka": kafka})
