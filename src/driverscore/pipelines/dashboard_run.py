"""`driverscore dashboard` and the dashboard of `driverscore serve`: what it reads, wired.

The score store of the chosen engine (DuckDB file or Druid); routes from the DuckDB
store's routes table (Druid keeps none: on Druid they come from the home's DuckDB file
when there is one); the registry, opened once on first use (versions, aliases, the
rollout policy it holds, its audit log of moves); the monitor's latest result from the
data store; and, served by `driverscore serve`, the split in force on that service.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Literal

import polars as pl
import uvicorn
from fastapi import FastAPI

from driverscore.adapters.score_store.duckdb_store import StoreMissingError, open_score_store
from driverscore.adapters.storage import DataStore
from driverscore.domain.rollout import RolloutPolicy
from driverscore.pipelines.store_queries import open_reader
from driverscore.services.api.auth import auth_enabled, load_tokens
from driverscore.services.api.state import ServiceState
from driverscore.services.dashboard import DashboardSources, create_dashboard
from driverscore.services.dashboard.app import standalone_app
from driverscore.services.dashboard.sources import ModelCatalog
from driverscore.settings import Settings

__all__ = [
    "dashboard_sources",
    "latest_monitoring_result",
    "mount_dashboard",
    "run_dashboard",
]


def latest_monitoring_result(settings: Settings) -> dict[str, Any] | None:
    """The newest ``monitoring.json`` in the data store, ``None`` before the first run."""
    # Here, not at the top: the monitoring pipeline imports MLflow and scikit-learn (10 s
    # on a busy machine), which the dashboard needs only once someone opens the model page.
    from driverscore.pipelines.monitoring_run import MONITORING_KIND, RESULT_NAME

    store = DataStore(settings.resolved_data_uri, settings.storage_options())
    for uri in reversed(store.report_uris(MONITORING_KIND, RESULT_NAME)):
        try:
            result = store.read_json(uri)
        except (OSError, ValueError):
            continue
        if isinstance(result, dict):
            return result
    return None


def dashboard_sources(
    settings: Settings,
    engine: Literal["duckdb", "druid"] = "duckdb",
    *,
    service_rollout: Callable[[], RolloutPolicy] | None = None,
) -> DashboardSources:
    """The dashboard's sources for ``settings`` (module docstring)."""
    routes_store = open_score_store(settings)

    def route(vehicle_id: str, trip_id: str) -> pl.DataFrame | None:
        try:
            return routes_store.trip_route(vehicle_id, trip_id)
        except StoreMissingError:
            return None

    lock = threading.Lock()
    opened: list[ModelCatalog] = []

    def registry() -> ModelCatalog:
        # MLflow takes seconds to import and connect: once, on the first model page.
        with lock:
            if not opened:
                from driverscore.adapters.registry import open_registry

                opened.append(open_registry(settings))
            return opened[0]

    return DashboardSources(
        reader=open_reader(settings, engine),
        engine=engine,
        route=route,
        registry=registry,
        service_rollout=service_rollout,
        drift=lambda: latest_monitoring_result(settings),
    )


#: Where the dashboard is served, by `driverscore serve` and `driverscore dashboard`.
DASHBOARD_PATH = "/dashboard"


def mount_dashboard(app: FastAPI, settings: Settings) -> None:
    """`driverscore serve`: the dashboard under ``/dashboard``, with the service's tokens
    and its live rollout split."""
    state: ServiceState = app.state.service
    sources = dashboard_sources(settings, service_rollout=lambda: state.policy)
    dashboard = create_dashboard(
        sources, base=DASHBOARD_PATH, tokens=state.tokens, require_token=state.auth
    )
    app.mount(DASHBOARD_PATH, dashboard)


def build_dashboard_app(
    settings: Settings, engine: Literal["duckdb", "druid"] = "duckdb", *, poll_s: float = 1.0
) -> FastAPI:
    """The dashboard on its own (``/`` sends to ``/dashboard/``), with the service's token
    rule: pages need a token whenever the service at these settings would."""
    config = settings.service
    tokens = load_tokens(config)
    required = auth_enabled(config)
    if required and not tokens:
        from driverscore.errors import ConfigError

        raise ConfigError(
            f"the dashboard binds to {config.host} so sign-in is on, but no token is set: set "
            "DRIVERSCORE_SERVICE__TOKENS or DRIVERSCORE_SERVICE__TOKEN_FILE "
            "(or DRIVERSCORE_SERVICE__AUTH=off behind an authenticating proxy)"
        )
    dashboard = create_dashboard(
        dashboard_sources(settings, engine),
        base=DASHBOARD_PATH,
        tokens=tokens,
        require_token=required,
        poll_s=poll_s,
    )
    return standalone_app(dashboard, DASHBOARD_PATH)


def run_dashboard(
    settings: Settings,
    engine: Literal["duckdb", "druid"] = "duckdb",
    announce: Callable[[str], None] = lambda _url: None,
) -> None:
    """Serve the dashboard alone until interrupted (`driverscore dashboard`); ``announce``
    gets its URL once the app is built (a wrong setting fails before)."""
    app = build_dashboard_app(settings, engine)
    config = settings.service
    announce(f"http://{config.host}:{config.port}{DASHBOARD_PATH}/")
    uvicorn.run(
        app,
        host=settings.service.host,
        port=settings.service.port,
        log_level="warning",
        server_header=False,
    )
