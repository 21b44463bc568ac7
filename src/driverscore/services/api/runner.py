"""``driverscore serve``: JSON logs, the app on uvicorn, models from the configured registry
or from an exported model directory."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from driverscore.adapters.registry_http import configure_registry_http
from driverscore.services.api.app import create_app
from driverscore.services.api.holder import RegistryReader
from driverscore.services.api.logs import configure_json_logging, flush_logs
from driverscore.settings import Settings

__all__ = ["run_service"]

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers


def _flush_logs_on(signals: tuple[signal.Signals, ...]) -> None:
    """Write out batched log lines before a stop signal ends the process.

    uvicorn shuts down gracefully on SIGTERM/SIGINT, then restores the handlers it found and
    raises the signal again, which ends the process without ``atexit`` (so without
    ``logging.shutdown``). The handler found is this one: it flushes the JSON log handler,
    then lets the signal act as it would have.
    """
    for sig in signals:
        found = signal.getsignal(sig)
        previous = signal.SIG_DFL if found is None else found

        def flush_then_resume(
            signum: int, frame: FrameType | None, previous: _Handler = previous
        ) -> None:
            flush_logs()
            signal.signal(signum, previous)
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)

        signal.signal(sig, flush_then_resume)


def run_service(settings: Settings) -> None:
    """Serve until interrupted; the registry is opened lazily so a down registry only delays
    readiness."""
    configure_json_logging()
    _flush_logs_on((signal.SIGTERM, signal.SIGINT))
    configure_registry_http(settings.service.registry_timeout_s, settings.service.registry_retries)

    model_dir = settings.service.model_dir
    if model_dir is not None:
        from driverscore.adapters.model_dir import ModelDirectory

        # Read before listening: a directory without a complete export is a deployment
        # error, said in one line at start (SageMaker then fails the endpoint with it).
        directory = ModelDirectory(model_dir)

        def open_models() -> RegistryReader:
            return directory
    else:

        def open_models() -> RegistryReader:
            # Imported at the first poll, in the registry thread: MLflow takes seconds to
            # import, and the service listens (answers /healthz, says why on /readyz) before.
            from driverscore.adapters.registry import open_registry

            return open_registry(settings)

    app = create_app(settings, open_models)
    try:
        uvicorn.run(
            app,
            host=settings.service.host,
            port=settings.service.port,
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
        )
    finally:
        flush_logs()
