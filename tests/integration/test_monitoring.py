"""`driverscore monitor` end to end on a real registry and data store (synthetic trips).

A champion registered without a reference profile (as before profiles existed) serves a
few weeks of scored trips; the monitor builds its reference once from the lineage's
features dataset, judges the window, writes the JSON result and the HTML report.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from websockets.sync.client import connect

from driverscore.adapters.registry import open_registry
from driverscore.adapters.storage import DataStore
from driverscore.domain.profiles import TripProfile
from driverscore.pipelines.monitoring_run import MonitoringRunResult, run_monitor
from driverscore.settings import Settings
from driverscore.training.synthetic import register_synthetic_model, synthetic_trips

pytestmark = [pytest.mark.integration]

TRAINING_SEED = 5
WINDOW_START = datetime(2026, 6, 1, tzinfo=UTC)
AS_OF = datetime(2026, 7, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Monitored:
    settings: Settings
    home: Path
    labels: Path
    first: MonitoringRunResult
    second: MonitoringRunResult


def _score_and_store(settings: Settings, features: pl.DataFrame) -> None:
    scorer = open_registry(settings).load_scorer("champion")
    records = scorer.score_trips(features, datetime(2026, 7, 1, tzinfo=UTC))
    DataStore(settings.resolved_data_uri, {}).write_dataset("scores", records, name="scores")


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Monitored:
    home = tmp_path_factory.mktemp("monitor-home")
    settings = Settings(home=home)
    store = DataStore(settings.resolved_data_uri, {})
    training_features, _ = synthetic_trips(4000, seed=TRAINING_SEED)
    features_ref = store.write_dataset("features", training_features, name="features")
    register_synthetic_model(
        open_registry(settings),
        trips=4000,
        seed=TRAINING_SEED,
        lineage={"features": features_ref.version, "data_uri": store.root_uri},
    )
    # Thirty days of undrifted trips after training, all claims reported within the month.
    window, incidents = synthetic_trips(6000, seed=11, start=WINDOW_START, days=30)
    _score_and_store(settings, window)
    labels = home / "claims.parquet"
    incidents.with_columns(reported_at=pl.col("incident_ts") + timedelta(days=1)).write_parquet(
        labels
    )
    first = run_monitor(settings, as_of=AS_OF, window_hours=14 * 24, labels_uri=str(labels))
    second = run_monitor(settings, as_of=AS_OF, window_hours=14 * 24, labels_uri=str(labels))
    return Monitored(settings, home, labels, first, second)


def test_reference_is_built_once_from_the_lineage_and_stored(monitored: Monitored) -> None:
    assert monitored.first.result["model"]["reference_source"] == "lineage"
    assert monitored.second.result["model"]["reference_source"] == "model_version"
    # The scores dataset written before profile parts existed is profiled once, then merged.
    assert len(monitored.first.result["profile_parts"]["scores_profiled_now"]) == 1
    assert monitored.second.result["profile_parts"]["scores_profiled_now"] == []
    assert monitored.second.result["profile_parts"]["current"] > 0
    registry = open_registry(monitored.settings)
    stored = registry.load_reference_profile(registry.alias_version("champion") or "")
    assert stored is not None
    profile = TripProfile.from_json(stored)
    assert profile.rows == 4000
    # The reference profiles the card's inputs and the score, whatever they are.
    card = registry.load_card(registry.alias_version("champion") or "")
    assert set(profile.edges.numeric) == {*card.feature_names, "risk_probability", "score"}
    assert monitored.second.result["model"]["reference_profile_sha256"] == profile.sha256()


def test_an_undrifted_window_is_ok(monitored: Monitored) -> None:
    result = monitored.first.result
    assert result["verdict"] == "ok", result["alarms"]
    assert result["trips"] > 2000
    assert result["summary"].startswith("ok: ")
    assert {s["value"] for s in result["slices"] if s["column"] == "fleet_id"} == {
        "F0",
        "F1",
        "F2",
    }


def test_the_result_is_versioned_json_in_the_data_store(monitored: Monitored) -> None:
    uri = monitored.first.result_uri
    assert uri.startswith(str(monitored.home / "data" / "monitoring"))
    stored = json.loads(Path(uri).read_text())
    assert stored["result_schema_version"] == "1"
    assert stored["kind"] == "monitoring"
    assert stored["verdict"] == monitored.first.verdict
    features = {f["column"] for f in stored["features"]}
    assert {"distance_km", "hard_brake_per_100km", "score", "fleet_id"} <= features
    assert Path(monitored.first.report_uri).read_text().startswith("<!DOCTYPE html>")


def test_estimated_performance_is_beside_the_realised(monitored: Monitored) -> None:
    performance = monitored.first.result["performance"]
    realised, estimated = performance["realised"], performance["estimated_on_matured"]
    assert realised["n"] >= 2000
    assert estimated["n"] == realised["n"]
    assert abs(estimated["roc_auc"] - realised["roc_auc"]) <= 0.03
    assert abs(estimated["brier"] - realised["brier"]) <= 0.01


def test_a_drifted_window_names_its_features(monitored: Monitored, tmp_path: Path) -> None:
    # Same registry, another data store holding only drifted trips.
    settings = Settings(
        home=tmp_path,
        data_uri=str(tmp_path / "data"),
        mlflow_tracking_uri=monitored.settings.resolved_tracking_uri,
    )
    drifted, _ = synthetic_trips(3000, seed=12, start=WINDOW_START + timedelta(days=20), days=9)
    drifted = drifted.with_columns(pl.col("hard_brake_per_100km") * 3.0)
    _score_and_store(settings, drifted)
    result = run_monitor(settings, as_of=AS_OF, window_hours=14 * 24)
    assert result.verdict == "drift"
    assert "hard_brake_per_100km" in result.judgement.drifted_features
    assert "avg_speed_kmh" not in result.judgement.drifted_features
    assert result.result["performance"]["realised"] is None


def test_cli_prints_the_verdict_and_writes_the_report(monitored: Monitored, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    env = {**os.environ, "DRIVERSCORE_HOME": str(monitored.home)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "driverscore",
            "monitor",
            "--as-of",
            AS_OF.isoformat(),
            "--window-hours",
            "336",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "ok: " in done.stdout
    page = report.read_text()
    # plotly.js is in the page itself (the browser test checks nothing is fetched).
    assert "<script src" not in page
    assert "plotly.js v" in page


def test_cli_without_a_champion_says_so_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DRIVERSCORE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "driverscore", "monitor"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert done.returncode == 1
    assert "has no champion to monitor" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


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


def test_report_opens_offline_in_headless_chromium(monitored: Monitored, tmp_path: Path) -> None:
    browser = Chromium(tmp_path / "chromium-profile")
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable")
        browser.call("Page.navigate", url=Path(monitored.first.report_uri).as_uri())
        browser.wait_for("Page.loadEventFired")
        charts = browser.call(
            "Runtime.evaluate",
            expression=(
                "Array.from(document.querySelectorAll('.js-plotly-plot'))"
                ".filter(d => d.querySelector('svg.main-svg')).length"
            ),
            returnByValue=True,
        )["result"]["value"]
        shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    finally:
        browser.close()
    screenshot = tmp_path / "monitoring-report.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {screenshot}")
    problems = [
        e
        for e in browser.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (
            e.get("method") == "Runtime.consoleAPICalled"
            and e["params"]["type"] in ("error", "assert")
        )
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert problems == []
    fetched = [
        e["params"]["request"]["url"]
        for e in browser.events
        if e.get("method") == "Network.requestWillBeSent"
        and not e["params"]["request"]["url"].startswith(("file:", "data:"))
    ]
    assert fetched == []
    # One histogram per profiled column, the band shares and the performance trend.
    columns = len(monitored.first.result["model"]["features"]) + 2
    assert charts == columns + 2
    assert screenshot.stat().st_size > 20_000


def test_dagster_monitoring_job_runs_hourly_and_materialises_the_result(
    monitored: Monitored,
) -> None:
    import dagster as dg

    from driverscore.pipelines.dagster_defs import (
        MONITOR_JOB_NAME,
        MonitoringWindow,
        TelemetrySource,
        build_definitions,
    )

    defs = build_definitions(
        monitored.settings,
        TelemetrySource(pings_uri="unused", incidents_uri="unused"),
        MonitoringWindow(as_of=AS_OF.isoformat(), window_hours=14 * 24),
    )
    schedule = defs.resolve_schedule_def(f"{MONITOR_JOB_NAME}_schedule")
    assert (schedule.cron_schedule, schedule.job_name) == ("0 * * * *", MONITOR_JOB_NAME)
    with dg.DagsterInstance.ephemeral() as instance:
        outcome = defs.resolve_job_def(MONITOR_JOB_NAME).execute_in_process(instance=instance)
    assert outcome.success
    output = outcome.output_for_node("monitoring_result")
    assert output["verdict"] == "ok"
    assert json.loads(Path(str(output["result"])).read_text())["verdict"] == "ok"


def test_service_metrics_carry_the_drift_gauges(monitored: Monitored) -> None:
    import threading

    import uvicorn

    from driverscore.services.api.app import create_app

    settings = monitored.settings
    names = open_registry(settings).load_card("1").feature_names
    features, _ = synthetic_trips(60, seed=21)
    trips = [
        {
            "trip_id": row["trip_id"],
            "vehicle_id": row["vehicle_id"],
            "fleet_id": row["fleet_id"],
            # NaN is not JSON: an unknown speeding share is posted as null.
            "features": {n: None if row[n] != row[n] else row[n] for n in names},
        }
        for row in features.iter_rows(named=True)
    ]
    app = create_app(settings, lambda: open_registry(settings))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while not server.started or client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the service did not get ready"
                time.sleep(0.1)
            answer = client.post("/v1/score:batch", json={"trips": trips})
            assert answer.status_code == 200, answer.text
            # The champion's reference is fetched off the scrape: the gauges follow shortly.
            text = client.get("/metrics").text
            while "driverscore_monitor_window_trips 60.0" not in text:
                assert time.monotonic() < deadline, text[-2000:]
                time.sleep(0.5)
                text = client.get("/metrics").text
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert "driverscore_monitor_window_trips 60.0" in text
    assert 'driverscore_monitor_drift{column="distance_km",statistic="psi"}' in text
    assert 'driverscore_monitor_estimated_performance{metric="roc_auc"}' in text
    # The scheduled monitor's last realised performance is shown beside the live window.
    assert 'driverscore_monitor_realised_performance{metric="roc_auc"}' in text
