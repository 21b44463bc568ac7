"""The Superset bundle: a database, datasets, charts and a dashboard per score store engine,
written in Superset's import format (a zip of YAML files, ``version: 1.0.0``).

Everything is generated here from one description (:data:`CHARTS` and the datasets), so
the DuckDB and the Druid dashboards hold the same charts over the same columns, and the
SQL comes from the store's own definitions: the distance-weighted score of the query set
(``queries.WEIGHTED_SCORE``) and Druid's latest record per trip
(``druid.latest_records_sql``). The trips and alerts datasets count what the query set
counts, the latest record per trip (DuckDB's ``trip_latest``; ``LATEST_BY`` per trip on
Druid); the model history keeps every version's record of a trip.

Object uuids are derived from the engine and the object's name, so importing the bundle
again (overwrite) updates the same database, datasets, charts and dashboard: a second
``driverscore superset up`` re-points them at the store of the current settings.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import yaml

from driverscore.adapters.score_store.druid import latest_records_sql
from driverscore.adapters.score_store.queries import WEIGHTED_SCORE

__all__ = [
    "CHARTS",
    "DASHBOARD_SLUGS",
    "DATASETS",
    "BundleTarget",
    "bundle_zip",
    "druid_sqlalchemy_uri",
    "duckdb_sqlalchemy_uri",
]

Engine = Literal["duckdb", "druid"]

_NAMESPACE: Final = uuid.UUID("6f1d8c52-3a0e-4d8b-9a57-0c2f7e9d1b44")
_VERSION: Final = "1.0.0"

#: The dashboard of each engine answers at ``/superset/dashboard/<slug>/``.
DASHBOARD_SLUGS: Final[dict[Engine, str]] = {
    "duckdb": "driverscore-duckdb",
    "druid": "driverscore-druid",
}


def _uuid(engine: Engine, kind: str, name: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{engine}/{kind}/{name}"))


@dataclass(frozen=True)
class BundleTarget:
    """One engine's store as Superset reaches it: the SQLAlchemy URI and, on Druid, the
    datasource names of the settings (``store.druid``)."""

    engine: Engine
    sqlalchemy_uri: str
    trips_datasource: str = "driverscore_trips"
    alerts_datasource: str = "driverscore_alerts"


def duckdb_sqlalchemy_uri(path: Path) -> str:
    """Read-only, so Superset never holds the write lock the store's writers need (Superset
    opens a connection per query and closes it)."""
    return f"duckdb:///{path.resolve()}?access_mode=read_only"


def druid_sqlalchemy_uri(url: str) -> str:
    """pydruid's SQLAlchemy URI of a Druid broker or router URL (``http[s]://host:port``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"druid url {url!r} is not http(s)://host:port")
    scheme = "druid+https" if parts.scheme == "https" else "druid"
    port = parts.port or (443 if parts.scheme == "https" else 8082)
    return f"{scheme}://{parts.hostname}:{port}/druid/v2/sql/"


# -- datasets ---------------------------------------------------------------------------

_TRIP_COLUMNS: Final = (
    ("vehicle_id", "VARCHAR"),
    ("trip_id", "VARCHAR"),
    ("driver_id", "VARCHAR"),
    ("fleet_id", "VARCHAR"),
    ("client_id", "VARCHAR"),
    ("start_ts", "TIMESTAMP"),
    ("end_ts", "TIMESTAMP"),
    ("distance_km", "DOUBLE"),
    ("risk_probability", "DOUBLE"),
    ("score", "DOUBLE"),
    ("score_bucket", "DOUBLE"),
    ("risk_band", "VARCHAR"),
    ("reasons", "VARCHAR"),
    ("model_name", "VARCHAR"),
    ("model_version", "VARCHAR"),
    ("model_role", "VARCHAR"),
    ("scored_at", "TIMESTAMP"),
)
_ALERT_COLUMNS: Final = (*_TRIP_COLUMNS, ("alert", "VARCHAR"))
_HISTORY_COLUMNS: Final = (
    ("vehicle_id", "VARCHAR"),
    ("trip_id", "VARCHAR"),
    ("model_name", "VARCHAR"),
    ("model_version", "VARCHAR"),
    ("model_role", "VARCHAR"),
    ("score", "DOUBLE"),
    ("end_ts", "TIMESTAMP"),
    ("scored_at", "TIMESTAMP"),
)

#: The 10-point bucket of ``score_histogram`` (scores of 100 fall in the 90 bucket).
_BUCKET: Final = "LEAST(FLOOR(score / 10), 9) * 10"

_TRIP_METRICS: Final = (
    ("trips", "Trips", "COUNT(*)", ",d"),
    ("weighted_score", "Score (distance-weighted)", WEIGHTED_SCORE, ".1f"),
    ("mean_score", "Mean trip score", "AVG(score)", ".1f"),
    ("min_score", "Lowest trip score", "MIN(score)", ".1f"),
    ("max_score", "Highest trip score", "MAX(score)", ".1f"),
    ("km", "Distance (km)", "SUM(COALESCE(distance_km, 0.0))", ",.0f"),
    (
        "high_risk_trips",
        "High-risk trips",
        "SUM(CASE WHEN risk_band = 'high' THEN 1 ELSE 0 END)",
        ",d",
    ),
)
_HISTORY_METRICS: Final = (
    ("records", "Records", "COUNT(*)", ",d"),
    ("mean_score", "Mean score", "AVG(score)", ".1f"),
)


def _duckdb_utc(column: str) -> str:
    # Superset compares time columns with naive literals: give it UTC wall time.
    return f"timezone('UTC', {column}) AS {column}"


def _duckdb_trips_sql(table: str, *, alerts: bool) -> str:
    times = ", ".join(_duckdb_utc(c) for c in ("start_ts", "end_ts", "scored_at"))
    extra = ", alert" if alerts else ""
    latest = (
        # trip_alerts keeps each version's alert: the latest per trip, as `latest_alerts`.
        " QUALIFY row_number() OVER (PARTITION BY vehicle_id, trip_id "
        "ORDER BY scored_at DESC, model_version DESC) = 1"
        if alerts
        else " WHERE score IS NOT NULL"
    )
    return (
        "SELECT vehicle_id, trip_id, driver_id, fleet_id, client_id, "
        f"{times}, distance_km, risk_probability, score, {_BUCKET} AS score_bucket, "
        "risk_band, array_to_string(reasons, '; ') AS reasons, model_name, model_version, "
        f"model_role{extra} FROM {table}{latest}"
    )


def _druid_trips_sql(datasource: str, *, alerts: bool) -> str:
    where = "1 = 1" if alerts else "score IS NOT NULL"
    latest = latest_records_sql(datasource, where, alerts=alerts)
    extra = ", alert" if alerts else ""
    return (
        "SELECT vehicle_id, trip_id, driver_id, fleet_id, client_id, start_ts, end_ts, "
        f"distance_km, risk_probability, score, {_BUCKET} AS score_bucket, risk_band, "
        "reasons, model_name, model_version, model_role, "
        f"MILLIS_TO_TIMESTAMP(scored_at_ms) AS scored_at{extra} FROM ({latest})"
    )


def _history_sql(target: BundleTarget) -> str:
    if target.engine == "duckdb":
        times = ", ".join(_duckdb_utc(c) for c in ("end_ts", "scored_at"))
        return (
            "SELECT vehicle_id, trip_id, model_name, model_version, model_role, score, "
            f"{times} FROM trip_scores WHERE score IS NOT NULL"
        )
    # One row per trip and version, as DuckDB's trip_scores (Druid keeps every message).
    by = "MILLIS_TO_TIMESTAMP(scored_at_ms)"
    return (
        "SELECT vehicle_id, trip_id, model_version, "
        f"LATEST_BY(model_name, {by}, 128) AS model_name, "
        f"LATEST_BY(model_role, {by}, 128) AS model_role, LATEST_BY(score, {by}) AS score, "
        f"MAX(__time) AS end_ts, MILLIS_TO_TIMESTAMP(MAX(scored_at_ms)) AS scored_at "
        f'FROM "{target.trips_datasource}" WHERE score IS NOT NULL '
        "GROUP BY vehicle_id, trip_id, model_version"
    )


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    time_column: str
    columns: tuple[tuple[str, str], ...]
    metrics: tuple[tuple[str, str, str, str], ...]

    def sql(self, target: BundleTarget) -> str:
        if self.name == "model_history":
            return _history_sql(target)
        alerts = self.name == "alerts"
        if target.engine == "duckdb":
            return _duckdb_trips_sql("trip_alerts" if alerts else "trip_latest", alerts=alerts)
        source = target.alerts_datasource if alerts else target.trips_datasource
        return _druid_trips_sql(source, alerts=alerts)


DATASETS: Final[dict[str, Dataset]] = {
    d.name: d
    for d in (
        Dataset(
            "trips",
            "The latest score record of every trip (what the query set counts).",
            "end_ts",
            _TRIP_COLUMNS,
            _TRIP_METRICS,
        ),
        Dataset(
            "alerts",
            "High-risk trip alerts: the latest alert record per trip, with its text.",
            "end_ts",
            _ALERT_COLUMNS,
            (("alerts", "Alerts", "COUNT(*)", ",d"),),
        ),
        Dataset(
            "model_history",
            "Every model version's record of each trip: which versions scored, and when.",
            "scored_at",
            _HISTORY_COLUMNS,
            _HISTORY_METRICS,
        ),
    )
}


# -- charts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Chart:
    """One chart: its Superset form data (``params``) and the query it sends."""

    name: str
    viz_type: str
    dataset: str
    #: Grid cells: width of 12 per row, height in Superset's 8 px units.
    width: int
    height: int
    params: dict[str, Any]
    #: The chart's query: ``columns`` (an axis column is ``{"axis": name, "grain": ...}``),
    #: ``metrics``, ``orderby`` and ``row_limit``.
    query: dict[str, Any] = field(default_factory=dict)


def _axis(column: str, grain: str | None) -> dict[str, Any]:
    axis: dict[str, Any] = {
        "columnType": "BASE_AXIS",
        "sqlExpression": column,
        "label": column,
        "expressionType": "SQL",
    }
    if grain:
        axis["timeGrain"] = grain
    return axis


def _table(groupby: list[str], metrics: list[str], order: str, limit: int) -> dict[str, Any]:
    return {
        "query_mode": "aggregate",
        "groupby": groupby,
        "metrics": metrics,
        "timeseries_limit_metric": order,
        "order_desc": False,
        "row_limit": limit,
        "table_timestamp_format": "smart_date",
        "show_cell_bars": True,
    }


#: Rows of the dashboard, top to bottom; each row's widths add up to 12 at most.
CHARTS: Final[tuple[tuple[Chart, ...], ...]] = (
    (
        Chart(
            "Trips",
            "big_number_total",
            "trips",
            2,
            50,
            {"metric": "trips"},
            {"metrics": ["trips"]},
        ),
        Chart(
            "Risk bands",
            "pie",
            "trips",
            4,
            50,
            {
                "groupby": ["risk_band"],
                "metric": "trips",
                "show_labels": True,
                "label_type": "key_percent",
                "donut": True,
                "row_limit": 10,
            },
            {"columns": ["risk_band"], "metrics": ["trips"], "row_limit": 10},
        ),
        Chart(
            "Fleets",
            "table",
            "trips",
            6,
            50,
            _table(
                ["fleet_id"],
                ["weighted_score", "trips", "km", "high_risk_trips"],
                "weighted_score",
                100,
            ),
            {
                "columns": ["fleet_id"],
                "metrics": ["weighted_score", "trips", "km", "high_risk_trips"],
                "orderby": [["weighted_score", True]],
                "row_limit": 100,
            },
        ),
    ),
    (
        Chart(
            "Daily score per fleet",
            "echarts_timeseries_line",
            "trips",
            6,
            50,
            {
                "x_axis": "end_ts",
                "time_grain_sqla": "P1D",
                "metrics": ["weighted_score"],
                "groupby": ["fleet_id"],
                "row_limit": 10000,
                "show_legend": True,
                "markerEnabled": True,
            },
            {
                "columns": [{"axis": "end_ts", "grain": "P1D"}, "fleet_id"],
                "metrics": ["weighted_score"],
                "orderby": [["weighted_score", False]],
                "row_limit": 10000,
            },
        ),
        Chart(
            "Score distribution per client",
            "echarts_timeseries_bar",
            "trips",
            6,
            50,
            {
                "x_axis": "score_bucket",
                "xAxisForceCategorical": True,
                "metrics": ["trips"],
                "groupby": ["client_id"],
                "row_limit": 10000,
                "show_legend": True,
                "x_axis_title": "score bucket (10 points)",
            },
            {
                "columns": [{"axis": "score_bucket", "grain": None}, "client_id"],
                "metrics": ["trips"],
                "orderby": [["trips", False]],
                "row_limit": 10000,
            },
        ),
    ),
    (
        Chart(
            "High-risk trip alerts",
            "table",
            "alerts",
            12,
            50,
            {
                "query_mode": "raw",
                "all_columns": [
                    "end_ts",
                    "fleet_id",
                    "client_id",
                    "vehicle_id",
                    "driver_id",
                    "score",
                    "alert",
                    "reasons",
                ],
                "order_by_cols": ['["end_ts", false]'],
                "row_limit": 100,
                "table_timestamp_format": "%Y-%m-%d %H:%M:%S",
                "column_config": {"score": {"d3NumberFormat": ".1f"}},
            },
            {
                "columns": [
                    "end_ts",
                    "fleet_id",
                    "client_id",
                    "vehicle_id",
                    "driver_id",
                    "score",
                    "alert",
                    "reasons",
                ],
                "orderby": [["end_ts", False]],
                "row_limit": 100,
            },
        ),
    ),
    (
        Chart(
            "Score per vehicle",
            "table",
            "trips",
            6,
            50,
            _table(
                ["vehicle_id", "fleet_id"],
                ["weighted_score", "min_score", "max_score", "trips", "km"],
                "weighted_score",
                100,
            ),
            {
                "columns": ["vehicle_id", "fleet_id"],
                "metrics": ["weighted_score", "min_score", "max_score", "trips", "km"],
                "orderby": [["weighted_score", True]],
                "row_limit": 100,
            },
        ),
        Chart(
            "Worst drivers",
            "table",
            "trips",
            6,
            50,
            _table(["driver_id"], ["weighted_score", "trips", "km"], "weighted_score", 20),
            {
                "columns": ["driver_id"],
                "metrics": ["weighted_score", "trips", "km"],
                "orderby": [["weighted_score", True]],
                "row_limit": 20,
            },
        ),
    ),
    (
        Chart(
            "Model versions over time",
            "echarts_timeseries_bar",
            "model_history",
            8,
            50,
            {
                "x_axis": "scored_at",
                "time_grain_sqla": "P1D",
                "metrics": ["records"],
                "groupby": ["model_version"],
                "stack": "Stack",
                "row_limit": 10000,
                "show_legend": True,
            },
            {
                "columns": [{"axis": "scored_at", "grain": "P1D"}, "model_version"],
                "metrics": ["records"],
                "orderby": [["records", False]],
                "row_limit": 10000,
            },
        ),
        Chart(
            "Model versions",
            "table",
            "model_history",
            4,
            50,
            _table(
                ["model_name", "model_version", "model_role"],
                ["records", "mean_score"],
                "records",
                50,
            ),
            {
                "columns": ["model_name", "model_version", "model_role"],
                "metrics": ["records", "mean_score"],
                "orderby": [["records", False]],
                "row_limit": 50,
            },
        ),
    ),
)


def _query_context(chart: Chart, params: dict[str, Any]) -> dict[str, Any]:
    """What Superset saves beside a chart and ``/api/v1/chart/data`` answers; its
    datasource id is the importing Superset's, so callers replace it."""
    columns = [
        _axis(c["axis"], c["grain"]) if isinstance(c, dict) else c
        for c in chart.query.get("columns", [])
    ]
    query = {
        "filters": [],
        "extras": {"having": "", "where": ""},
        "applied_time_extras": {},
        "columns": columns,
        "metrics": chart.query.get("metrics", []),
        "orderby": chart.query.get("orderby", []),
        "annotation_layers": [],
        "row_limit": chart.query.get("row_limit", 1),
        "series_limit": 0,
        "order_desc": True,
        "url_params": {},
        "custom_params": {},
        "custom_form_data": {},
        "time_range": "No filter",
    }
    return {
        "datasource": {"id": 0, "type": "table"},
        "force": False,
        "queries": [query],
        "form_data": params,
        "result_format": "json",
        "result_type": "full",
    }


# -- the zip ----------------------------------------------------------------------------


def _database(target: BundleTarget) -> dict[str, Any]:
    return {
        "database_name": f"driverscore {target.engine}",
        "sqlalchemy_uri": target.sqlalchemy_uri,
        "cache_timeout": None,
        "expose_in_sqllab": True,
        "allow_run_async": False,
        "allow_ctas": False,
        "allow_cvas": False,
        "allow_dml": False,
        "allow_csv_upload": False,
        "extra": {"allows_virtual_table_explore": True},
        "uuid": _uuid(target.engine, "database", "store"),
        "version": _VERSION,
    }


def _dataset(target: BundleTarget, dataset: Dataset) -> dict[str, Any]:
    return {
        "table_name": f"driverscore_{target.engine}_{dataset.name}",
        "main_dttm_col": dataset.time_column,
        "description": dataset.description,
        "default_endpoint": None,
        "offset": 0,
        "cache_timeout": None,
        "schema": None,
        "sql": dataset.sql(target),
        "params": None,
        "template_params": None,
        "filter_select_enabled": True,
        "fetch_values_predicate": None,
        "extra": None,
        "normalize_columns": False,
        "always_filter_main_dttm": False,
        "uuid": _uuid(target.engine, "dataset", dataset.name),
        "metrics": [
            {
                "metric_name": name,
                "verbose_name": label,
                "metric_type": None,
                "expression": expression,
                "description": None,
                "d3format": d3format,
                "extra": None,
                "warning_text": None,
            }
            for name, label, expression, d3format in dataset.metrics
        ],
        "columns": [
            {
                "column_name": name,
                "verbose_name": None,
                "is_dttm": sql_type == "TIMESTAMP",
                "is_active": True,
                "type": sql_type,
                "advanced_data_type": None,
                "groupby": True,
                "filterable": True,
                "expression": None,
                "description": None,
                "python_date_format": None,
                "extra": None,
            }
            for name, sql_type in dataset.columns
        ],
        "version": _VERSION,
        "database_uuid": _uuid(target.engine, "database", "store"),
    }


def _chart(target: BundleTarget, chart: Chart) -> dict[str, Any]:
    dataset_uuid = _uuid(target.engine, "dataset", chart.dataset)
    params = {
        "viz_type": chart.viz_type,
        "datasource": f"{dataset_uuid}__table",
        "time_range": "No filter",
        "adhoc_filters": [],
        **chart.params,
    }
    return {
        "slice_name": chart.name,
        "description": None,
        "certified_by": None,
        "certification_details": None,
        "viz_type": chart.viz_type,
        "params": params,
        "query_context": json.dumps(_query_context(chart, params)),
        "cache_timeout": None,
        "uuid": _uuid(target.engine, "chart", chart.name),
        "version": _VERSION,
        "dataset_uuid": dataset_uuid,
    }


def _filter(target: BundleTarget, column: str, label: str) -> dict[str, Any]:
    return {
        "id": f"NATIVE_FILTER-{column}",
        "name": label,
        "filterType": "filter_select",
        "targets": [
            {"datasetUuid": _uuid(target.engine, "dataset", "trips"), "column": {"name": column}}
        ],
        "controlValues": {
            "enableEmptyFilter": False,
            "defaultToFirstItem": False,
            "multiSelect": True,
            "searchAllOptions": False,
            "inverseSelection": False,
        },
        "defaultDataMask": {"extraFormData": {}, "filterState": {}, "ownState": {}},
        "cascadeParentIds": [],
        "scope": {"rootPath": ["ROOT_ID"], "excluded": []},
        "type": "NATIVE_FILTER",
        "description": "",
    }


def _dashboard(target: BundleTarget) -> dict[str, Any]:
    title = f"Driver scores ({'DuckDB' if target.engine == 'duckdb' else 'Druid'})"
    position: dict[str, Any] = {
        "DASHBOARD_VERSION_KEY": "v2",
        "ROOT_ID": {"type": "ROOT", "id": "ROOT_ID", "children": ["GRID_ID"]},
        "GRID_ID": {"type": "GRID", "id": "GRID_ID", "children": [], "parents": ["ROOT_ID"]},
        "HEADER_ID": {"id": "HEADER_ID", "type": "HEADER", "meta": {"text": title}},
    }
    chart_id = 0
    for row_number, row in enumerate(CHARTS, start=1):
        row_id = f"ROW-{row_number}"
        position["GRID_ID"]["children"].append(row_id)
        position[row_id] = {
            "type": "ROW",
            "id": row_id,
            "children": [],
            "parents": ["ROOT_ID", "GRID_ID"],
            "meta": {"background": "BACKGROUND_TRANSPARENT"},
        }
        for chart in row:
            chart_id += 1
            key = f"CHART-{chart_id}"
            position[row_id]["children"].append(key)
            position[key] = {
                "type": "CHART",
                "id": key,
                "children": [],
                "parents": ["ROOT_ID", "GRID_ID", row_id],
                "meta": {
                    # The importer maps the uuid to the chart's id in this Superset.
                    "chartId": chart_id,
                    "uuid": _uuid(target.engine, "chart", chart.name),
                    "sliceName": chart.name,
                    "width": chart.width,
                    "height": chart.height,
                },
            }
    return {
        "dashboard_title": title,
        "description": None,
        "css": "",
        "slug": DASHBOARD_SLUGS[target.engine],
        "uuid": _uuid(target.engine, "dashboard", "driverscore"),
        "position": position,
        "metadata": {
            "color_scheme": "supersetColors",
            "refresh_frequency": 0,
            "expanded_slices": {},
            "label_colors": {},
            "timed_refresh_immune_slices": [],
            "cross_filters_enabled": False,
            "native_filter_configuration": [
                _filter(target, "fleet_id", "Fleet"),
                _filter(target, "client_id", "Client"),
            ],
            "shared_label_colors": [],
            "color_scheme_domain": [],
        },
        "published": True,
        "version": _VERSION,
    }


def _dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def bundle_zip(targets: list[BundleTarget], *, now: datetime | None = None) -> bytes:
    """The dashboards of ``targets`` (one per engine) with their charts, datasets and
    databases: a zip that ``superset import-dashboards`` and Superset's import dialog take."""
    moment = now or datetime.now(UTC)
    root = f"driverscore_superset_{moment:%Y%m%dT%H%M%S}"
    files: dict[str, str] = {
        "metadata.yaml": _dump(
            {"version": _VERSION, "type": "Dashboard", "timestamp": moment.isoformat()}
        )
    }
    for target in targets:
        database = _database(target)
        files[f"databases/driverscore_{target.engine}.yaml"] = _dump(database)
        for dataset in DATASETS.values():
            document = _dataset(target, dataset)
            files[f"datasets/driverscore_{target.engine}/{document['table_name']}.yaml"] = _dump(
                document
            )
        for row in CHARTS:
            for chart in row:
                slug = chart.name.lower().replace(" ", "_").replace("-", "_")
                files[f"charts/{target.engine}_{slug}.yaml"] = _dump(_chart(target, chart))
        files[f"dashboards/{DASHBOARD_SLUGS[target.engine]}.yaml"] = _dump(_dashboard(target))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(f"{root}/{name}", text)
    return buffer.getvalue()
