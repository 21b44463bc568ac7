"""The Superset bundle's files, and the pins of Superset's own environment."""

from __future__ import annotations

import io
import json
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from driverscore.adapters.superset.bundle import (
    CHARTS,
    DATASETS,
    BundleTarget,
    bundle_zip,
    druid_sqlalchemy_uri,
    duckdb_sqlalchemy_uri,
)
from driverscore.adapters.superset.local import REQUIREMENTS, store_targets
from driverscore.errors import ConfigError
from driverscore.settings import DruidConfig, Settings, StoreConfig


def _files(bundle: bytes) -> dict[str, dict[str, object]]:
    with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
        return {
            name.split("/", 1)[1]: yaml.safe_load(archive.read(name)) for name in archive.namelist()
        }


TARGETS = [
    BundleTarget("duckdb", duckdb_sqlalchemy_uri(Path("/data/scores.duckdb"))),
    BundleTarget("druid", druid_sqlalchemy_uri("http://druid:8082"), "trips_x", "alerts_x"),
]


def test_the_bundle_holds_a_dashboard_per_engine_with_every_chart_on_its_datasets() -> None:
    files = _files(bundle_zip(TARGETS))
    assert files["metadata.yaml"]["type"] == "Dashboard"
    charts = [c for row in CHARTS for c in row]
    for engine in ("duckdb", "druid"):
        datasets = {
            f["uuid"]: f
            for n, f in files.items()
            if n.startswith(f"datasets/driverscore_{engine}/")
        }
        assert len(datasets) == len(DATASETS)
        engine_charts = [f for n, f in files.items() if n.startswith(f"charts/{engine}_")]
        assert sorted(c["slice_name"] for c in engine_charts) == sorted(c.name for c in charts)
        for chart in engine_charts:
            dataset = datasets[chart["dataset_uuid"]]
            metric_names = {m["metric_name"] for m in dataset["metrics"]}
            column_names = {c["column_name"] for c in dataset["columns"]}
            query = json.loads(chart["query_context"])["queries"][0]
            # Every metric a chart asks for is one of its dataset's, every column one of its.
            assert set(query["metrics"]) <= metric_names, chart["slice_name"]
            for column in query["columns"]:
                name = column["sqlExpression"] if isinstance(column, dict) else column
                assert name in column_names, (chart["slice_name"], name)
        dashboard = files[f"dashboards/driverscore-{engine}.yaml"]
        placed = {
            v["meta"]["uuid"]
            for v in dashboard["position"].values()
            if isinstance(v, dict) and v.get("type") == "CHART"
        }
        assert placed == {c["uuid"] for c in engine_charts}


def test_the_bundle_points_at_the_given_stores_and_keeps_its_uuids() -> None:
    first, again = _files(bundle_zip(TARGETS)), _files(bundle_zip(TARGETS[:1]))
    duck = first["databases/driverscore_duckdb.yaml"]
    assert duck["sqlalchemy_uri"] == "duckdb:////data/scores.duckdb?access_mode=read_only"
    assert first["databases/driverscore_druid.yaml"]["sqlalchemy_uri"] == (
        "druid://druid:8082/druid/v2/sql/"
    )
    # Importing again overwrites the same objects: the uuids depend on names only.
    assert again["databases/driverscore_duckdb.yaml"]["uuid"] == duck["uuid"]
    trips = first["datasets/driverscore_druid/driverscore_druid_trips.yaml"]["sql"]
    assert '"trips_x"' in trips and "LATEST_BY" in trips
    alerts = first["datasets/driverscore_druid/driverscore_druid_alerts.yaml"]["sql"]
    assert '"alerts_x"' in alerts


def test_druid_uris() -> None:
    assert druid_sqlalchemy_uri("https://d.example") == "druid+https://d.example:443/druid/v2/sql/"
    with pytest.raises(ValueError, match="not http"):
        druid_sqlalchemy_uri("druid.example:8082")


def test_store_targets_add_druid_only_when_one_is_known(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert [t.engine for t in store_targets(settings, "auto")] == ["duckdb"]
    configured = Settings(
        home=tmp_path, store=StoreConfig(druid=DruidConfig(url="http://127.0.0.1:9999"))
    )
    assert [t.engine for t in store_targets(configured, "auto")] == ["duckdb", "druid"]
    assert [t.engine for t in store_targets(settings, "druid")] == ["druid"]
    with pytest.raises(ConfigError, match="--engine"):
        store_targets(settings, "grafana")


def test_supersets_environment_pins_the_projects_duckdb_major() -> None:
    pins = dict(
        line.split("==", 1)
        for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["apache-superset"] == "6.1.0"
    # DuckDB 1.x cannot open a file 2.x wrote: the store's writer and Superset agree.
    assert pins["duckdb"].split(".")[0] == version("duckdb").split(".")[0]
    assert pins["flask-caching"] < "2.5"
