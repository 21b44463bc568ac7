"""Limits on the HTTP calls the MLflow client makes to an MLflow server (registry, artifacts).

Kept apart from ``registry.py`` so that setting them does not import MLflow (seconds):
``driverscore serve`` sets them, then listens, then imports MLflow in its registry thread.
"""

from __future__ import annotations

import os

__all__ = ["configure_registry_http"]


def configure_registry_http(timeout_s: int, max_retries: int, backoff_factor: int = 1) -> None:
    """Bound every HTTP call this process makes to an MLflow server.

    MLflow reads these limits from the environment on every call; its defaults (120 s per
    request, 7 retries with doubling back-off) let one call to a registry that is down take
    some 4 minutes. A service polling the registry wants a poll to fail within seconds and
    try again at the next one. Variables already set in the environment are kept.
    Process-wide: call once, from an entry point.
    """
    limits = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": timeout_s,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": max_retries,
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": backoff_factor,
    }
    for name, value in limits.items():
        os.environ.setdefault(name, str(value))
