"""``driverscore serve``: JSON logs, the app on uvicorn, models from the configured registry."""

from __future__ import annotations

import uvicorn

from driverscore.services.api.app import create_app
from driverscore.services.api.logs import configure_json_logging
from driverscore.settings import Settings

__all__ = ["run_service"]


def run_service(settings: Settings) -> None:
    """Serve until interrupted; the registry is opened lazily so a down registry only delays
    readiness."""
    from driverscore.pipelines.training_run import open_registry

    configure_json_logging()
    app = create_app(settings, lambda: open_registry(settings))
    uvicorn.run(
        app,
        host=settings.service.host,
        port=settings.service.port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
    )
