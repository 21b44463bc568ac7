"""Engines the whole suite shares: one Kafka broker and one Apache Superset per run.

With ``DRIVERSCORE_KAFKA_BOOTSTRAP`` set (CI or a developer's `driverscore kafka up`), the
tests use that broker; otherwise the first test that needs it starts a single-node KRaft
broker with ``adapters/kafka/broker.sh`` (jars fetched from Maven Central once, then
cached), and the session stops it at the end. The Kafka and the container tests use the
same one.

The Superset tests (marker ``superset``) live beside the engines they need: DuckDB in
``tests/integration``, Druid in ``tests/kafka`` (with the session's Druid). Both use this
one Superset, started once: its environment is built from
``adapters/superset/requirements.txt`` the first time (~100-200 s, then cached under
``~/.cache/driverscore``, reused while the requirements file is unchanged), its metadata
set up in the run's tmp dir (30-150 s; later local runs copy a freshly set-up database kept
beside the environment), and each test imports its bundle into it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from driverscore.adapters.kafka.broker import LocalKafkaBroker, wait_until_ready


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("DRIVERSCORE_KAFKA_BOOTSTRAP")
    if given:
        wait_until_ready(given)
        yield given
        return
    broker = LocalKafkaBroker(tmp_path_factory.mktemp("kafka"))
    bootstrap = broker.up()
    try:
        yield bootstrap
    finally:
        broker.down()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class RunningSuperset:
    """The session's Superset: import bundles, ask its API, render its dashboards."""

    local: Any  # driverscore.adapters.superset.local.LocalSuperset
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return str(self.local.url)

    def api(self) -> httpx.Client:
        """A client (to close) logged in through the REST API (JWT), with a CSRF token for POSTs."""
        client = httpx.Client(base_url=self.url, timeout=120)
        login = client.post(
            "/api/v1/security/login",
            json={
                "username": self.local.admin_user,
                "password": self.local.admin_password(),
                "provider": "db",
                "refresh": True,
            },
        )
        assert login.status_code == 200, login.text
        client.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
        csrf = client.get("/api/v1/security/csrf_token/").json()["result"]
        client.headers.update({"X-CSRFToken": csrf, "Referer": self.url})
        return client

    def dashboard_chart_data(self, slug: str) -> dict[str, list[dict[str, Any]]]:
        """Every chart of dashboard ``slug``: its saved query sent to ``/api/v1/chart/data``
        (with this Superset's id of the chart's dataset); chart name → rows."""
        client = self.api()
        try:
            answer = client.get(f"/api/v1/dashboard/{slug}/charts")
            assert answer.status_code == 200, answer.text
            out: dict[str, list[dict[str, Any]]] = {}
            for listed in answer.json()["result"]:
                chart = client.get(f"/api/v1/chart/{listed['id']}").json()["result"]
                query_context = json.loads(chart["query_context"])
                # The saved query names the dataset id of the Superset that wrote it; the
                # chart knows this one's (as the browser does when it asks).
                query_context["datasource"] = {"id": chart["datasource_id"], "type": "table"}
                data = client.post("/api/v1/chart/data", json=query_context)
                assert data.status_code == 200, (chart["slice_name"], data.text[:1000])
                result = data.json()["result"][0]
                assert not result.get("error"), (chart["slice_name"], result["error"])
                out[chart["slice_name"]] = result["data"]
            return out
        finally:
            client.close()

    def session_cookie(self) -> str:
        """Logs in through the login form, as a person does: the session cookie."""
        with httpx.Client(base_url=self.url, timeout=60, follow_redirects=False) as client:
            page = client.get("/login/").text
            token = page.split('id="csrf_token"', 1)[1].split('value="', 1)[1].split('"', 1)[0]
            done = client.post(
                "/login/",
                data={
                    "username": self.local.admin_user,
                    "password": self.local.admin_password(),
                    "csrf_token": token,
                },
            )
            assert done.status_code in (302, 303), done.text[:500]
            cookie = client.cookies.get("session")
            assert cookie, "superset set no session cookie at login"
            return cookie

    def screenshot(self, slug: str, path: Path, profile: Path) -> dict[str, Any]:
        """Render dashboard ``slug`` (``?standalone=1``) in headless Chromium, save a PNG at
        ``path``; returns what the page showed: charts drawn, charts in error."""
        browser = _Chromium(profile)
        try:
            for domain in ("Page", "Runtime", "Network"):
                browser.call(f"{domain}.enable")
            browser.call(
                "Network.setCookie", name="session", value=self.session_cookie(), url=self.url
            )
            browser.call("Page.navigate", url=f"{self.url}/superset/dashboard/{slug}/?standalone=1")
            browser.wait_for("Page.loadEventFired")
            state: dict[str, Any] = {}
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                state = browser.call(
                    "Runtime.evaluate",
                    expression=(
                        "({charts: document.querySelectorAll('.dashboard-chart').length,"
                        " drawn: document.querySelectorAll('.dashboard-chart canvas,"
                        " .dashboard-chart table, .dashboard-chart .header-line').length,"
                        " loading: document.querySelectorAll('.dashboard-chart .loading').length,"
                        " errors: Array.from(document.querySelectorAll("
                        "'.dashboard-chart .alert-danger, .dashboard-chart [role=alert]'))"
                        ".map(e => e.innerText)})"
                    ),
                    returnByValue=True,
                )["result"]["value"]
                if state["charts"] and not state["loading"] and state["drawn"] >= state["charts"]:
                    break
                time.sleep(1.0)
            time.sleep(2.0)  # let ECharts finish its entry animation before the shot
            # The window is as tall as the dashboard: a capture beyond the viewport re-lays
            # the grid out and shows it empty.
            shot = browser.call("Page.captureScreenshot", format="png")
        finally:
            browser.close()
        path.write_bytes(base64.b64decode(shot["data"]))
        return state


class _Chromium:
    """Headless Chromium over the DevTools protocol (as the monitoring report's test)."""

    def __init__(self, profile_dir: Path) -> None:
        from websockets.sync.client import connect

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            pytest.fail("headless Chromium is needed: apt-get install chromium (.ci/run does)")
        self._stack = ExitStack()
        self.process = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile_dir}",
                "--window-size=1600,2300",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        deadline = time.monotonic() + 60
        self.port = 0
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if "DevTools listening on ws://" in line:
                self.port = int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
                break
        assert self.port, "chromium did not open its DevTools port"
        pages = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=10).json()
        page = next(p for p in pages if p["type"] == "page")
        self.ws = self._stack.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        )
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == self._next_id:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)

    def wait_for(self, method: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == method for e in self.events):
            self.events.append(
                json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            )

    def close(self) -> None:
        self._stack.close()
        self.process.terminate()
        self.process.wait(timeout=20)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture(scope="session")
def superset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSuperset]:
    """One Superset for the run, from the cached environment (built on first use)."""
    from driverscore.adapters.superset.local import LocalSuperset, default_venv_dir, ensure_venv

    timings: dict[str, float] = {}
    started = time.monotonic()
    venv, built = ensure_venv(default_venv_dir())
    timings["venv built" if built else "venv reused"] = time.monotonic() - started
    local = LocalSuperset(tmp_path_factory.mktemp("superset"), venv, port=_free_port())
    started = time.monotonic()
    local.configure()
    # A freshly set-up metadata database is kept beside the environment: later local runs
    # copy it instead of migrating again (CI, without the cache, sets it up once).
    template = venv / "metadata-template"
    copied = (template / "superset.db").is_file()
    local.setup_metadata(template=template)
    timings["metadata copied" if copied else "metadata set up"] = time.monotonic() - started
    started = time.monotonic()
    local.start()
    timings["started"] = time.monotonic() - started
    print("superset: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    try:
        yield RunningSuperset(local, timings)
    finally:
        local.stop()
