"""The scoring service: ``create_app(settings, registry_factory)`` builds it, nothing at import.

Routes: ``POST /v1/score`` and ``/v1/score:batch``; the SageMaker container contract
(``GET /ping``, ``POST /invocations`` with JSON or CSV); ``GET /v1/models``; the rollout
split (``GET``/``PUT /v1/rollout``, also re-read from a file on every poll); ``/healthz``,
``/readyz`` and Prometheus ``/metrics``.

This module only composes the parts, one job each: ``state`` (what requests share, the
background threads), ``auth`` (bearer tokens), ``errors`` (every error answer),
``scorer`` (a request's trips scored and recorded), ``routes`` and ``sagemaker`` (the
routes), ``fast_path`` (one feature trip without FastAPI's request cycle) and ``guard``
(the outermost ASGI layer every request goes through).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute

from driverscore.services.api.auth import RequireToken, service_auth
from driverscore.services.api.errors import install_error_handlers
from driverscore.services.api.fast_path import FastScore
from driverscore.services.api.guard import Guard, Probe, install_guard
from driverscore.services.api.holder import RegistryReader
from driverscore.services.api.routes import (
    ServiceRoutes,
    document_posted_bodies,
    readiness_response,
)
from driverscore.services.api.sagemaker import SageMakerRoutes
from driverscore.services.api.schemas import ErrorResponse, ValidationErrorResponse
from driverscore.services.api.scorer import Scorer
from driverscore.services.api.state import ServiceState
from driverscore.settings import Settings

__all__ = ["ServiceState", "create_app"]


def create_app(settings: Settings, registry_factory: Callable[[], RegistryReader]) -> FastAPI:
    """Build the service; models load in the background when it starts (lifespan)."""
    auth, tokens = service_auth(settings.service)
    state = ServiceState.create(settings, registry_factory, auth=auth, tokens=tokens)
    scorer = Scorer(state)
    app = FastAPI(
        title="driverscore scoring service",
        version="1",
        summary="Driver Score for a trip, from raw pings or precomputed features.",
        lifespan=state.lifespan,
        responses={
            400: {
                "model": ErrorResponse,
                "description": "Body is not UTF-8 JSON, or nests deeper than 64 levels.",
            },
            401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
            413: {"model": ErrorResponse, "description": "Request body too large."},
            422: {"model": ValidationErrorResponse, "description": "Invalid fields, named."},
        },
    )
    app.state.service = state
    install_error_handlers(app, state.metrics)
    authorized = [Depends(RequireToken(state))]
    ServiceRoutes(state, scorer).add_to(app, authorized)
    SageMakerRoutes(state, scorer).add_to(app, authorized)
    document_posted_bodies(app)

    probes: dict[str, Probe] = {
        "/healthz": (_route(app, "/healthz"), lambda: JSONResponse({"status": "ok"})),
        "/readyz": (_route(app, "/readyz"), lambda: readiness_response(state)),
        "/ping": (_route(app, "/ping"), lambda: readiness_response(state)),
    }
    fast = FastScore(state, scorer, _route(app, "/v1/score"))
    install_guard(app, Guard(app.router, state, fast, probes))
    return app


def _route(app: FastAPI, path: str) -> BaseRoute:
    return next(r for r in app.routes if getattr(r, "path", None) == path)
