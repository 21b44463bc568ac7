"""The built-in dashboard on the embedded DuckDB store: every page in headless Chromium
with data and no console error, hostile ids and filters, and sign-in with a token.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
import polars as pl
import pytest
from pydantic import SecretStr

from dashboard_pages import ScoredFleet, check_page, entity_paths, score_fleet, serve
from driverscore.adapters.score_store import ScoreBatch
from driverscore.adapters.score_store.duckdb_store import open_score_store
from driverscore.adapters.storage import DataStore
from driverscore.domain.features import EVENT_COLUMNS
from driverscore.pipelines.dashboard_run import build_dashboard_app
from driverscore.pipelines.monitoring_run import MONITORING_KIND, RESULT_NAME
from driverscore.services.dashboard.app import SESSION_COOKIE
from driverscore.settings import Settings
from headless_chromium import Chromium

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: A driver id made to break out of SQL strings and HTML attributes.
HOSTILE = "d' OR '1'='1 <script>alert(1)</script> \"Ωmega\" 🚗"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> ScoredFleet:
    scored = score_fleet(tmp_path_factory.mktemp("dashboard-home"))
    # One more trip, driven by the hostile id long before the others (outside the default
    # period of the overview): its page must show it, escaped.
    odd = scored.output.scores.head(1).with_columns(
        pl.lit(HOSTILE).alias("driver_id"),
        pl.lit("odd-trip").alias("trip_id"),
        pl.col("start_ts", "end_ts") - timedelta(days=90),
    )
    open_score_store(scored.settings).write(ScoreBatch("test", scores=odd))
    # The monitor's verdict, as `driverscore monitor` writes it, for the model page.
    DataStore(scored.settings.resolved_data_uri, scored.settings.storage_options()).write_json(
        MONITORING_KIND,
        "20260107T000000-test",
        RESULT_NAME,
        {
            "verdict": "drift",
            "summary": "2 features drifted",
            "drifted_features": ["speeding_share", "night_share"],
            "window": {"start": "2026-01-06T00:00:00+00:00", "end": "2026-01-07T00:00:00+00:00"},
            "model": {"version": "1"},
        },
    )
    return scored


@pytest.fixture(scope="module")
def client(fleet: ScoredFleet) -> Iterator[httpx.Client]:
    with serve(build_dashboard_app(fleet.settings)) as url, httpx.Client(base_url=url) as http:
        yield http


def test_every_page_loads_in_headless_chromium_with_data(
    fleet: ScoredFleet, tmp_path: Path
) -> None:
    records = fleet.output.scores
    paths = ["/dashboard/", "/dashboard/alerts", *entity_paths(records), "/dashboard/model"]
    seen = {}
    with serve(build_dashboard_app(fleet.settings)) as url:
        browser = Chromium(tmp_path / "chromium-profile")
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                browser.call(f"{domain}.enable")
            for i, path in enumerate(paths):
                seen[path] = check_page(browser, url, path, tmp_path / f"dashboard-{i}.png")
                if i == 2:  # the driver page of the riskiest trip: its route as drawn
                    route_traces = browser.evaluate(
                        "JSON.stringify(document.getElementById('route').data"
                        ".map(t => [t.name, t.mode, t.x.filter(x => x !== null).length]))"
                    )
                    legend = browser.evaluate(
                        "Array.from(document.querySelectorAll('#route .legendtext'))"
                        ".map(t => t.textContent).join('|')"
                    )
            # The live feed connected and lists the stored alerts.
            browser.open(url + "/dashboard/alerts")
            deadline = time.monotonic() + 10
            while "live" not in browser.evaluate(
                "document.getElementById('feed-status').textContent"
            ):
                assert time.monotonic() < deadline, "the alerts feed did not connect"
                time.sleep(0.1)
            feed_rows = browser.evaluate("document.querySelectorAll('#alerts tbody tr').length")
        finally:
            browser.close()
    print(f"screenshots: {tmp_path}")
    overview = seen["/dashboard/"]
    assert f"{records.height:,} trips" in overview["text"]
    assert seen["/dashboard/alerts"]["rows"] == fleet.output.alerts.height > 0
    assert feed_rows == fleet.output.alerts.height
    driver_page = seen[paths[2]]
    assert driver_page["title"].startswith("Driver ")
    assert "no route stored" not in driver_page["text"]
    # The route: the line in time order, then its points coloured by event, with a legend;
    # each event's points are the trip's counted events.
    worst = records.sort("score").row(0, named=True)
    stored = open_score_store(fleet.settings).route(worst["vehicle_id"], worst["trip_id"])
    traces = {name: (mode, n) for name, mode, n in json.loads(route_traces)}
    assert traces.pop("route (time order)") == ("lines", stored.height)
    assert legend.split("|") == [
        "no event",
        "hard brake",
        "harsh acceleration",
        "harsh cornering",
        "speeding",
    ]
    assert traces["hard brake"] == ("markers", worst["hard_brake_count"])
    assert traces["harsh acceleration"] == ("markers", worst["harsh_accel_count"])
    assert traces["harsh cornering"] == ("markers", worst["harsh_corner_count"])
    assert (traces["speeding"][1] > 0) == ((worst["speeding_share"] or 0.0) > 0)
    flagged = stored.select(pl.any_horizontal(EVENT_COLUMNS)).to_series()
    assert traces["no event"] == ("markers", stored.height - flagged.sum())
    assert worst["hard_brake_count"] + worst["harsh_accel_count"] + worst["harsh_corner_count"] > 0
    model = seen["/dashboard/model"]["text"]
    assert "champion" in model and "challenger" in model and "Versions" in model
    assert "drifted: speeding_share, night_share" in model
    assert "canary, 10% of drivers answered by the challenger" in model
    assert "canary of version 2" in model  # the audit log's newest move
    assert (tmp_path / "dashboard-0.png").stat().st_size > 20_000
    if (docs := Path(__file__).parents[2] / "docs" / "img").is_dir() and _refresh_docs():
        shutil.copy(tmp_path / "dashboard-0.png", docs / "dashboard.png")


def _refresh_docs() -> bool:
    import os

    return os.environ.get("DRIVERSCORE_DOCS_SCREENSHOTS") == "1"


def test_alerts_are_newest_trip_end_first(client: httpx.Client, fleet: ScoredFleet) -> None:
    page = client.get("/dashboard/alerts").text
    ends = [part.split('"', 1)[0] for part in page.split('data-end="')[1:]]
    assert ends and ends == sorted(ends, reverse=True)


def test_unknown_driver_is_a_404_page(client: httpx.Client) -> None:
    answer = client.get("/dashboard/drivers/nobody-drives-here")
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("text/html")
    assert "no driver &#x27;nobody-drives-here&#x27; in the score store" in answer.text


@pytest.mark.parametrize(
    "driver",
    [
        "x' OR '1'='1",
        "x'; DROP TABLE trip_latest; --",
        'x" UNION SELECT 1 --',
        "Ωmega 🚗 ünïcødé",
        "a/b",
        "x" * 500,
    ],
)
def test_odd_driver_ids_are_bound_never_spliced(
    client: httpx.Client, fleet: ScoredFleet, driver: str
) -> None:
    answer = client.get(f"/dashboard/drivers/{quote(driver, safe='')}")
    assert answer.status_code == 404, answer.text[:300]
    assert "in the score store" in answer.text
    assert (
        open_score_store(fleet.settings).counts()["trip_latest"] == fleet.output.scores.height + 1
    )


def test_a_very_long_id_is_refused_in_one_line(client: httpx.Client) -> None:
    answer = client.get(f"/dashboard/vehicles/{'v' * 5000}")
    assert answer.status_code == 400
    assert "longer than 512 characters" in answer.text


def test_a_hostile_driver_id_is_shown_escaped(client: httpx.Client) -> None:
    answer = client.get(f"/dashboard/drivers/{quote(HOSTILE, safe='')}")
    assert answer.status_code == 200
    assert "<script>alert(1)</script>" not in answer.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in answer.text
    assert "odd-trip" in answer.text


@pytest.mark.parametrize(
    ("query", "line"),
    [
        ("days=abc", "days='abc' is not a number of days"),
        ("days=-3", "use a number of days above 0"),
        ("days=nan", "use a number of days above 0"),
        ("end=yesterday", "end='yesterday' is not a date"),
        ("start=2026-03-02&end=2026-03-01", "is not before end"),
        ("fleet=" + "f" * 600, "fleet is 600 characters long"),
        ("colour=red", "unknown filter 'colour'"),
    ],
)
def test_bad_filters_are_a_400_with_one_clear_line(
    client: httpx.Client, query: str, line: str
) -> None:
    answer = client.get(f"/dashboard/?{query}")
    assert answer.status_code == 400
    errors = [x for x in answer.text.split('<p class="error">')[1:]]
    assert len(errors) == 1
    assert line in errors[0].split("</p>")[0].replace("&#x27;", "'")


def test_filters_narrow_the_overview_to_one_fleet(client: httpx.Client, fleet: ScoredFleet) -> None:
    records = fleet.output.scores
    one = records["fleet_id"].drop_nulls().mode()[0]
    end = records["end_ts"].max() + timedelta(minutes=1)  # type: ignore[operator]
    answer = client.get(
        "/dashboard/", params={"fleet": one, "days": "30", "end": f"{end:%Y-%m-%dT%H:%M}"}
    )
    assert answer.status_code == 200
    mine = records.filter(pl.col("fleet_id") == one).height
    assert mine < records.height
    assert f"<b>{mine:,}</b> trips" in answer.text


def test_pages_need_a_session_when_the_service_needs_tokens(fleet: ScoredFleet) -> None:
    service = fleet.settings.service.model_copy(
        update={"auth": "on", "tokens": [SecretStr("s3cret")]}
    )
    settings = fleet.settings.model_copy(update={"service": service})
    with (
        serve(build_dashboard_app(settings)) as url,
        httpx.Client(base_url=url, follow_redirects=False) as client,
    ):
        first = client.get("/dashboard/model")
        assert first.status_code == 303
        assert first.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fmodel"
        assert client.get("/dashboard/alerts/stream").status_code == 401
        wrong = client.post("/dashboard/login", data={"token": "guess", "next": "/dashboard/"})
        assert wrong.status_code == 401 and SESSION_COOKIE not in wrong.cookies
        # A sign-in never sends anyone to another site.
        right = client.post(
            "/dashboard/login", data={"token": "s3cret", "next": "https://evil.example/"}
        )
        assert right.status_code == 303 and right.headers["location"] == "/dashboard/"
        cookie = right.headers["set-cookie"]
        assert {"httponly", "samesite=strict", "path=/dashboard"} <= {
            part.strip().lower() for part in cookie.split(";")
        }
        assert client.get("/dashboard/").status_code == 200
        session = client.cookies[SESSION_COOKIE]
        client.cookies.set(SESSION_COOKIE, session[:-1] + ("0" if session[-1] != "0" else "1"))
        assert client.get("/dashboard/").status_code == 303


def test_served_by_driverscore_serve_under_dashboard(fleet: ScoredFleet) -> None:
    from driverscore.adapters.registry import open_registry
    from driverscore.pipelines.dashboard_run import mount_dashboard
    from driverscore.services.api.app import create_app

    settings: Settings = fleet.settings
    app = create_app(settings, lambda: open_registry(settings))
    mount_dashboard(app, settings)
    with serve(app) as url, httpx.Client(base_url=url) as client:
        overview = client.get("/dashboard/")
        assert overview.status_code == 200 and "Fleet overview" in overview.text
        model = client.get("/dashboard/model").text
        assert "in force on this service: <b>champion</b>" in model
        plotly = client.get("/dashboard/static/plotly.min.js")
        assert plotly.status_code == 200 and len(plotly.content) > 1_000_000
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--engine", "sqlite"], "--engine 'sqlite': use duckdb or druid"),
        (["--host", "0.0.0.0"], "the dashboard binds to 0.0.0.0 so sign-in is on, but no token"),
    ],
)
def test_a_wrong_dashboard_option_is_one_line(tmp_path: Path, args: list[str], line: str) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVERSCORE_")}
    done = subprocess.run(
        [sys.executable, "-m", "driverscore", "dashboard", *args],
        env={**env, "DRIVERSCORE_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert line in done.stderr and "Traceback" not in done.stderr
    assert "dashboard: http" not in done.stdout
