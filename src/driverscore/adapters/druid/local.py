"""The local Druid of a home (``druid.sh``), its supervisors, and where commands find Druid.

``driverscore druid up`` starts a single-machine Druid under ``<home>/druid`` from jars
fetched from Maven Central once (cached in ``~/.cache/driverscore/druid-<version>``);
``apply`` submits the Kafka supervisor specs (``specs.py``) to its overlord; ``status``
shows each supervisor's state, lag and tasks, and each datasource's segments.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from driverscore.errors import DriverscoreError
from driverscore.settings import Settings

__all__ = [
    "DRUID_SCRIPT",
    "DatasourceHealth",
    "DruidControlError",
    "LocalDruid",
    "SupervisorHealth",
    "apply_supervisors",
    "coordinator_url",
    "datasource_health",
    "druid_state_dir",
    "druid_url",
    "reset_supervisor",
    "supervisor_health",
    "wait_until_counted",
]

DRUID_SCRIPT: Final = Path(__file__).with_name("druid.sh")
#: The broker's port when no local Druid recorded one (Druid's own default).
DEFAULT_URL: Final = "http://127.0.0.1:8082"
DEFAULT_COORDINATOR: Final = "http://127.0.0.1:8081"


class DruidControlError(DriverscoreError):
    """The local Druid could not be started or stopped, or refused a supervisor."""


def druid_state_dir(home: Path) -> Path:
    """Where ``driverscore druid up`` keeps the local Druid of a home."""
    return (home / "druid").resolve()


def _recorded(settings: Settings, name: str) -> str:
    try:
        return (druid_state_dir(settings.home) / name).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def druid_url(settings: Settings) -> str:
    """The SQL endpoint (broker): ``store.druid.url``, else the one the local Druid recorded,
    else Druid's default."""
    return settings.store.druid.url or _recorded(settings, "url") or DEFAULT_URL


def coordinator_url(settings: Settings) -> str:
    """The overlord (the local Druid's coordinator runs as overlord)."""
    return (
        settings.store.druid.overlord_url
        or _recorded(settings, "coordinator")
        or DEFAULT_COORDINATOR
    )


@dataclass(frozen=True)
class LocalDruid:
    """A Druid whose state lives in ``state_dir``; ``up`` returns the broker's URL."""

    state_dir: Path
    heap: str = "512m"
    timeout_s: float = 300.0

    def _run(self, command: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "DRIVERSCORE_DRUID_DIR": str(self.state_dir),
            "DRIVERSCORE_DRUID_HEAP": self.heap,
            "DRIVERSCORE_DRUID_TIMEOUT": str(int(self.timeout_s)),
            "PYTHON": sys.executable,
        }
        return subprocess.run(
            ["bash", str(DRUID_SCRIPT), command],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            # Includes a first-run jar download (about 90 s on a fast link).
            timeout=self.timeout_s + 600,
        )

    def up(self) -> str:
        done = self._run("up")
        if done.returncode != 0:
            raise DruidControlError(f"druid did not start: {done.stderr.strip()[-2000:]}")
        return done.stdout.strip().splitlines()[-1]

    def down(self) -> None:
        done = self._run("down")
        if done.returncode != 0:
            raise DruidControlError(f"druid did not stop: {done.stderr.strip()[-2000:]}")

    def reset(self) -> None:
        done = self._run("reset")
        if done.returncode != 0:
            raise DruidControlError(f"druid was not reset: {done.stderr.strip()[-2000:]}")

    def status(self) -> str | None:
        done = self._run("status")
        return done.stdout.strip() if done.returncode == 0 else None


def _call(method: str, url: str, **kwargs: Any) -> Any:
    try:
        answer = httpx.request(method, url, timeout=30.0, **kwargs)
    except httpx.HTTPError as exc:
        raise DruidControlError(
            f"druid overlord at {url.split('/druid')[0]} did not answer ({exc}): start it "
            "with `driverscore druid up`, or set DRIVERSCORE_STORE__DRUID__OVERLORD_URL"
        ) from None
    if answer.status_code >= 400:
        raise DruidControlError(
            f"druid refused {method} {url} ({answer.status_code}): {answer.text[:500]}"
        )
    return answer.json() if answer.content else None


def apply_supervisors(overlord: str, specs: list[dict[str, Any]]) -> list[str]:
    """Submit (or update) each supervisor; returns their ids (the datasource names)."""
    ids: list[str] = []
    for spec in specs:
        answer = _call("POST", f"{overlord}/druid/indexer/v1/supervisor", json=spec)
        ids.append(str(answer["id"]))
    return ids


def reset_supervisor(overlord: str, supervisor: str) -> None:
    """Forget a supervisor and its datasource's data (tests, ``druid reset`` of one set)."""
    _call("POST", f"{overlord}/druid/indexer/v1/supervisor/{supervisor}/terminate")


@dataclass(frozen=True)
class SupervisorHealth:
    id: str
    state: str
    healthy: bool
    lag: int | None
    active_tasks: int
    topic: str | None


@dataclass(frozen=True)
class DatasourceHealth:
    name: str
    segments: int
    rows: int
    size_bytes: int


def supervisor_health(overlord: str) -> list[SupervisorHealth]:
    """State, health, total lag and running tasks of every supervisor."""
    out: list[SupervisorHealth] = []
    for item in _call("GET", f"{overlord}/druid/indexer/v1/supervisor?full") or []:
        status = _call("GET", f"{overlord}/druid/indexer/v1/supervisor/{item['id']}/status")
        payload = (status or {}).get("payload", {})
        out.append(
            SupervisorHealth(
                id=str(item["id"]),
                state=str(payload.get("detailedState") or payload.get("state") or "?"),
                healthy=bool(payload.get("healthy", False)),
                lag=payload.get("aggregateLag"),
                active_tasks=len(payload.get("activeTasks") or []),
                topic=payload.get("stream") or payload.get("topic"),
            )
        )
    return out


def datasource_health(broker: str) -> list[DatasourceHealth]:
    """Segments (published and real-time), rows and bytes per datasource (``sys.segments``)."""
    query = (
        "SELECT datasource, COUNT(*) AS segments, SUM(num_rows) AS num_rows, SUM(size) AS bytes "
        "FROM sys.segments GROUP BY datasource ORDER BY datasource"
    )
    rows = _call("POST", f"{broker}/druid/v2/sql", json={"query": query}) or []
    return [
        DatasourceHealth(
            r["datasource"], int(r["segments"]), int(r["num_rows"] or 0), int(r["bytes"] or 0)
        )
        for r in rows
    ]


def wait_until_counted(broker: str, datasource: str, rows: int, timeout_s: float = 180.0) -> float:
    """Block until ``datasource`` counts at least ``rows`` rows; returns the seconds waited."""
    started = time.monotonic()
    query = {"query": f'SELECT COUNT(*) AS n FROM "{datasource}"'}
    counted = 0
    while time.monotonic() - started < timeout_s:
        try:
            answer = httpx.post(f"{broker}/druid/v2/sql", json=query, timeout=30.0)
            if answer.status_code == 200:
                counted = int(answer.json()[0]["n"])
                if counted >= rows:
                    return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise DruidControlError(
        f"druid counted {counted} of {rows} rows of {datasource} after {timeout_s:.0f} s"
    )
