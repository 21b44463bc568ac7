"""Headless Chromium driven over the DevTools protocol, for the suite's browser tests.

The monitoring report and the dashboard pages are opened with it: no chromedriver, no
Playwright, only Debian's ``chromium`` and a websocket. :func:`page_problems` lists the
console errors and uncaught exceptions a page raised; :func:`outside_requests` lists the
requests that went anywhere but the allowed origins (pages must work offline).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

__all__ = ["Chromium", "outside_requests", "page_problems"]


class Chromium:
    """Headless Chromium driven over the DevTools protocol (no chromedriver needed)."""

    def __init__(self, profile_dir: Path) -> None:
        self._stack = contextlib.ExitStack()
        self.process = subprocess.Popen(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile_dir}",
                "--window-size=1400,2000",
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
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self._next_id:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)

    def wait_for(self, method: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == method for e in self.events):
            self.events.append(
                json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            )

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def open(self, url: str) -> None:
        """Navigate and wait for the page's load event (events of earlier pages are kept)."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def screenshot(self, path: Path) -> Path:
        """The whole page as a PNG at ``path``."""
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        self._stack.close()
        self.process.terminate()
        self.process.wait(timeout=20)
        if self.process.stderr is not None:
            self.process.stderr.close()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("headless Chromium is needed: apt-get install chromium (.ci/run installs it)")
    return found


def page_problems(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Uncaught exceptions, console errors and assertion failures, and error log entries."""
    return [
        e
        for e in events
        if e.get("method") == "Runtime.exceptionThrown"
        or (
            e.get("method") == "Runtime.consoleAPICalled"
            and e["params"]["type"] in ("error", "assert")
        )
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]


def outside_requests(events: list[dict[str, Any]], *allowed: str) -> list[str]:
    """URLs requested that start with none of ``allowed`` (``file:`` and ``data:`` always are)."""
    return [
        e["params"]["request"]["url"]
        for e in events
        if e.get("method") == "Network.requestWillBeSent"
        and not e["params"]["request"]["url"].startswith(("file:", "data:", *allowed))
    ]
