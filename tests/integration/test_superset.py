"""The Superset bundle on the DuckDB score store: it imports into a fresh Superset, every
chart's query answers with rows through ``/api/v1/chart/data``, the numbers are the query
set's, and the dashboard renders in headless Chromium."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from driverscore.adapters.score_store.duckdb_store import DuckDBScoreStore
from driverscore.adapters.score_store.queries import QueryParams
from driverscore.adapters.score_store.records import ScoreBatch
from driverscore.adapters.superset.bundle import (
    CHARTS,
    DASHBOARD_SLUGS,
    BundleTarget,
    bundle_zip,
    duckdb_sqlalchemy_uri,
)
from driverscore.simulation.score_records import random_score_records

pytestmark = [pytest.mark.superset, pytest.mark.integration, pytest.mark.slow]

START = datetime(2026, 1, 1, tzinfo=UTC)


def scored_store(path: Path) -> DuckDBScoreStore:
    """Five days of trips scored by version 1, 40 of them rescored by version 2, alerts for
    the trips under 30."""
    first = random_score_records(500, start=START, days=5, seed=3)
    second = random_score_records(
        40, start=START, days=5, seed=3, model_version="2", scored_at=START + timedelta(days=7)
    ).with_columns(pl.lit("challenger").alias("model_role"))
    alerts = first.filter(pl.col("score") < 30).with_columns(
        pl.format("risk {} below the threshold", pl.col("risk_probability").round(2)).alias("alert")
    )
    store = DuckDBScoreStore(path)
    store.write(ScoreBatch("score", scores=pl.concat([first, second]), alerts=alerts))
    return store


def test_bundle_on_duckdb_imports_and_every_chart_answers(superset: Any, tmp_path: Path) -> None:
    store = scored_store(tmp_path / "scores.duckdb")
    superset.local.import_bundle(
        bundle_zip([BundleTarget("duckdb", duckdb_sqlalchemy_uri(store.path))])
    )
    data = superset.dashboard_chart_data(DASHBOARD_SLUGS["duckdb"])

    assert sorted(data) == sorted(c.name for row in CHARTS for c in row)
    empty = [name for name, rows in data.items() if not rows]
    assert empty == []
    # The charts count what the query set counts: the latest record per trip.
    assert data["Trips"] == [{"trips": 500}]
    period = QueryParams(START, START + timedelta(days=6), level="fleet")
    fleets = store.query("group_scores", period)
    charted = {r["fleet_id"]: r for r in data["Fleets"]}
    assert sorted(charted) == sorted(fleets["group_id"].to_list())
    for row in fleets.iter_rows(named=True):
        assert charted[row["group_id"]]["weighted_score"] == pytest.approx(row["score"], rel=1e-9)
        assert charted[row["group_id"]]["trips"] == row["trip_count"]
    alerts = store.query("latest_alerts", QueryParams(START, START + timedelta(days=6), limit=500))
    assert len(data["High-risk trip alerts"]) == alerts.height
    # Model history keeps both versions' records.
    versions = {r["model_version"]: r["records"] for r in data["Model versions"]}
    assert versions == {"1": 500, "2": 40}

    shot = tmp_path / "superset-duckdb.png"
    shown = superset.screenshot(DASHBOARD_SLUGS["duckdb"], shot, tmp_path / "chromium")
    print(f"screenshot: {shot} {shown}")
    assert shown["charts"] == len(data)
    assert shown["loading"] == 0 and shown["errors"] == []
    assert shot.stat().st_size > 50_000
    # DRIVERSCORE_SUPERSET_SCREENSHOT=docs/img/superset-duckdb.png refreshes the docs' image.
    if target := os.environ.get("DRIVERSCORE_SUPERSET_SCREENSHOT"):
        shutil.copyfile(shot, target)
