"""Control of a local single-node Kafka broker (``broker.sh``) and a readiness check.

The broker is fetched from Maven Central on first use (``mvn``, Java 17+) and runs as a
background JVM; its state folder holds config, data, log, pid and bootstrap address.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from confluent_kafka import KafkaException  # type: ignore[import-untyped]
from confluent_kafka.admin import AdminClient  # type: ignore[import-untyped]

from driverscore.errors import DriverscoreError

__all__ = ["BROKER_SCRIPT", "LocalKafkaBroker", "wait_until_ready"]

BROKER_SCRIPT: Final = Path(__file__).with_name("broker.sh")


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
