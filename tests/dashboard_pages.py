"""Shared by the dashboard's browser tests on DuckDB (tests/integration) and Druid
(tests/kafka): a scored simulated fleet, the app served on a free port, and a page check.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import polars as pl
import uvicorn
from fastapi import FastAPI

from driverscore.adapters.registry import open_registry
from driverscore.adapters.score_store.duckdb_store import open_score_store
from driverscore.domain.rollout import RolloutPolicy
from driverscore.services.stream import StreamMetrics, TripScoringStep
from driverscore.services.stream_embedded import (
    MemoryScoreSink,
    ScoreStoreSink,
    TeeSink,
    run_embedded_stream,
)
from driverscore.settings import Settings
from driverscore.simulation import DirtConfig, SimulationConfig, simulate
from driverscore.training.synthetic import register_synthetic_model
from headless_chromium import Chromium, outside_requests, page_problems

__all__ = ["ScoredFleet", "check_page", "entity_paths", "score_fleet", "serve"]


@dataclass(frozen=True)
class ScoredFleet:
    settings: Settings
    #: What the embedded runner produced (records, alerts), as stored.
    output: MemoryScoreSink


def score_fleet(home: Path, *, vehicles: int = 8, days: int = 2, seed: int = 21) -> ScoredFleet:
    """A home whose registry holds two versions (champion 1, challenger 2 in a 10 % canary:
    moves in its audit log) and whose DuckDB store holds a simulated fleet scored on the
    stream path (records, alerts and routes)."""
    settings = Settings(home=home)
    registry = open_registry(settings)
    register_synthetic_model(registry, trips=2500, seed=3, max_iter=30, code_version="first")
    register_synthetic_model(registry, trips=2500, seed=4, max_iter=30, code_version="second")
    registry.set_rollout_policy(
        RolloutPolicy(mode="canary", challenger_percent=10.0),
        actor="test",
        reason="canary of version 2",
    )
    scorer = registry.load_scorer("champion")
    pings = simulate(
        SimulationConfig(vehicles=vehicles, days=days, seed=seed, dirt=DirtConfig.clean())
    ).pings
    memory = MemoryScoreSink()
    store = ScoreStoreSink(open_score_store(settings), source="test")
    run_embedded_stream(
        pings, TripScoringStep(scorer, StreamMetrics()), TeeSink((memory, store)), grace_s=30
    )
    store.flush()
    return ScoredFleet(settings, memory)


def entity_paths(records: pl.DataFrame) -> list[str]:
    """The driver and vehicle pages of the riskiest trip (its route drawn)."""
    worst = records.sort("score").row(0, named=True)
    trip = quote(str(worst["trip_id"]), safe="")
    return [
        f"/dashboard/drivers/{quote(worst['driver_id'], safe='')}?trip={trip}",
        f"/dashboard/vehicles/{quote(worst['vehicle_id'], safe='')}",
    ]


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """``app`` on uvicorn in a thread, on a free port of 127.0.0.1; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


#: Charts each page draws (``div[data-chart]``), by path prefix.
CHARTS = {"/dashboard/": 4, "/dashboard/alerts": 0, "/dashboard/model": 1}


def check_page(browser: Chromium, url: str, path: str, shot: Path) -> dict[str, Any]:
    """Open ``path``, wait until its charts are drawn, screenshot it; fails on a console
    error, an uncaught exception or a request that leaves the app. Returns what it saw."""
    browser.events.clear()
    browser.open(url + path)
    expected = CHARTS.get(path.split("?")[0], 2)
    drawn = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        drawn = browser.evaluate(
            "Array.from(document.querySelectorAll('div[data-chart]'))"
            ".filter(d => d.querySelector('svg.main-svg')).length"
        )
        if drawn >= expected:
            break
        time.sleep(0.1)
    seen = {
        "charts": drawn,
        "title": browser.evaluate("document.querySelector('h1').textContent"),
        "rows": browser.evaluate("document.querySelectorAll('tbody tr').length"),
        "text": browser.evaluate("document.body.innerText"),
    }
    browser.screenshot(shot)
    assert page_problems(browser.events) == [], path
    assert outside_requests(browser.events, url) == [], path
    assert drawn == expected, (path, seen)
    return seen
