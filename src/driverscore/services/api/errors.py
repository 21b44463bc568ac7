"""Every error the service answers, in one shape, each counted by kind.

``ErrorResponse`` (kind, message, request id) for most; ``ValidationErrorResponse`` with
the fields to blame for a 422. Tracebacks go to the log under the request id, never into
an answer.
"""

from __future__ import annotations

import logging
from typing import Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from driverscore.services.api.bodies import BodyError
from driverscore.services.api.metrics import ServiceMetrics
from driverscore.services.api.schemas import (
    ErrorResponse,
    FieldProblem,
    ValidationErrorResponse,
)
from driverscore.services.api.scoring import InvalidTripsError

__all__ = [
    "ServiceError",
    "field_name",
    "install_error_handlers",
    "internal_error",
    "invalid_response",
]

_log = logging.getLogger("driverscore.service")
#: Kinds of the HTTP errors Starlette raises itself (no route, wrong method).
_HTTP_KINDS: Final = {404: "not_found", 405: "method_not_allowed"}


class ServiceError(Exception):
    """An answer other than a 422 or a 500: status, error kind (the metric label), message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def field_name(loc: tuple[int | str, ...]) -> str:
    """The dotted field path of a validation error's location, e.g. ``pings.3.ts``."""
    parts = [str(p) for p in loc if p != "body"]
    # Union members (``ts`` as datetime or int) add the member's type to the path.
    while parts and (
        parts[-1] in ("datetime", "int", "constrained-int")
        or parts[-1].startswith("function-after[")
    ):
        parts.pop()
    return ".".join(parts) or "(body)"


def _problems(exc: RequestValidationError) -> list[FieldProblem]:
    seen: dict[str, str] = {}
    for error in exc.errors():
        name = field_name(tuple(error.get("loc", ())))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "json_invalid":
            message = "body is not valid JSON"
        seen.setdefault(name, message)
    return [FieldProblem(field=k, message=v) for k, v in seen.items()]


def invalid_response(problems: list[FieldProblem]) -> JSONResponse:
    """The 422 naming the invalid fields; its message is the first problem."""
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    body = ValidationErrorResponse(
        message=f"{first.field}: {first.message}{more}", problems=problems
    )
    return JSONResponse(body.model_dump(), status_code=422)


def internal_error(metrics: ServiceMetrics, request_id: str | None) -> JSONResponse:
    """The 500 of an unexpected error; the traceback goes to the log only."""
    _log.exception("unhandled error", extra={"request_id": request_id})
    metrics.errors.labels("internal").inc()
    body = ErrorResponse(
        error="internal",
        message="internal error; the service log has the details under this request id",
        request_id=request_id,
    )
    return JSONResponse(body.model_dump(), status_code=500)


class _ErrorHandlers:
    """The app's exception handlers: each answers its error and counts it by kind."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def invalid_request(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        self.metrics.errors.labels("invalid_request").inc()
        return invalid_response(_problems(exc))

    async def invalid_trips(self, request: Request, exc: InvalidTripsError) -> JSONResponse:
        self.metrics.errors.labels("invalid_request").inc()
        return invalid_response(exc.problems)

    async def unreadable_body(self, request: Request, exc: BodyError) -> JSONResponse:
        # Routes that parse a body themselves (``bodies.request_json``) answer as the guard.
        self.metrics.errors.labels(exc.kind).inc()
        body = ErrorResponse(
            error=exc.kind, message=exc.message, request_id=request.state.request_id
        )
        return JSONResponse(body.model_dump(), status_code=400)

    async def service_error(self, request: Request, exc: ServiceError) -> JSONResponse:
        self.metrics.errors.labels(exc.kind).inc()
        body = ErrorResponse(
            error=exc.kind, message=exc.message, request_id=request.state.request_id
        )
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(body.model_dump(), status_code=exc.status, headers=headers)

    async def http_error(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(exc.status_code, "http_error")
        self.metrics.errors.labels(kind).inc()
        body = ErrorResponse(
            error=kind,
            message=str(exc.detail),
            request_id=getattr(request.state, "request_id", None),
        )
        return JSONResponse(body.model_dump(), status_code=exc.status_code)

    async def bug(self, request: Request, exc: Exception) -> JSONResponse:
        return internal_error(self.metrics, getattr(request.state, "request_id", None))


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Answer every error of ``app``'s routes in the service's shape, counted by kind."""
    handlers = _ErrorHandlers(metrics)
    app.exception_handler(RequestValidationError)(handlers.invalid_request)
    app.exception_handler(InvalidTripsError)(handlers.invalid_trips)
    app.exception_handler(BodyError)(handlers.unreadable_body)
    app.exception_handler(ServiceError)(handlers.service_error)
    app.exception_handler(StarletteHTTPException)(handlers.http_error)
    app.exception_handler(Exception)(handlers.bug)
