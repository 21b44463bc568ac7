"""The scoring service: ``create_app(settings, registry_factory)`` builds it, nothing at import.

Routes: ``POST /v1/score`` and ``/v1/score:batch``; the SageMaker container contract
(``GET /ping``, ``POST /invocations`` with JSON or CSV); ``GET /v1/models``; the rollout
split (``GET``/``PUT /v1/rollout``, also re-read from a file on every poll); ``/healthz``,
``/readyz`` and Prometheus ``/metrics``.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import io
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import polars as pl
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from driverscore.adapters.prediction_log import PredictionLog
from driverscore.domain.mapping import apply_mapping
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import TripScorer
from driverscore.domain.trip_scoring import TRIP_RECORD_SCHEMA
from driverscore.errors import ConfigError
from driverscore.services.api.bodies import (
    JSON_DOCUMENT,
    BodyError,
    parse_json_body,
    request_json,
)
from driverscore.services.api.holder import LoadedModels, ModelHolder, RegistryReader
from driverscore.services.api.logs import flush_logs
from driverscore.services.api.metrics import ServiceMetrics
from driverscore.services.api.schemas import (
    BatchScoreRequest,
    BatchScoreResponse,
    ErrorResponse,
    FieldProblem,
    ModelsResponse,
    ModelVersionInfo,
    Readiness,
    TripFeaturesIn,
    TripIn,
    TripScore,
    ValidationErrorResponse,
)
from driverscore.services.api.scoring import (
    InvalidTripsError,
    RequestLimits,
    ScoredBatch,
    score_posted_pings,
    score_posted_trips,
    trip_problems,
)
from driverscore.services.prediction_log import open_prediction_log
from driverscore.settings import ServiceConfig, Settings

__all__ = ["ServiceState", "create_app"]

_log = logging.getLogger("driverscore.service")
_LOCAL_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})
#: How often the prediction log and the batched log lines are written out (s).
_TICK_S: Final = 1.0
#: While no model is loaded, the registry is tried again at least this often (s).
_NOT_READY_RETRY_S: Final = 5.0
#: A registry call still running at shutdown is waited for this long at most (s).
_REGISTRY_JOIN_S: Final = 2.0
#: Requests with bodies above this size are checked and answered in a worker thread, off
#: the event loop (bytes).
_INLINE_CHECK_BYTES: Final = 64 * 1024
#: The fast path only ever takes one trip of features: bigger bodies (pings, batches) skip
#: it rather than be parsed on the event loop for nothing (bytes).
_FAST_PATH_MAX_BYTES: Final = 16 * 1024


class _ServiceError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def auth_enabled(config: ServiceConfig) -> bool:
    if config.auth == "auto":
        return config.host not in _LOCAL_HOSTS
    return config.auth == "on"


def _load_tokens(config: ServiceConfig) -> list[bytes]:
    """The accepted tokens: the setting's, then the token file's, one a line.

    In the file, blank lines and lines starting with ``#`` (comments, such as who a token
    was issued to) are not tokens: a comment accepted as a token would let anyone who read
    the file's comments in.
    """
    tokens = [t.get_secret_value() for t in config.tokens]
    if config.token_file is not None:
        try:
            text = config.token_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"service.token_file {config.token_file}: cannot read it ({exc.strerror})"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"service.token_file {config.token_file}: not UTF-8 text — one token a line"
            ) from None
        lines = (line.strip() for line in text.splitlines())
        tokens.extend(line for line in lines if line and not line.startswith("#"))
    return [t.encode() for t in tokens if t]


def _bearer(header: str) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def _token_matches(tokens: list[bytes], given: bytes) -> bool:
    # Compare against every token without stopping early: timing reveals nothing.
    matches = [hmac.compare_digest(given, t) for t in tokens]
    return any(matches)


def _token_ok(tokens: list[bytes], header: bytes | None) -> bool:
    """The check of ``require_token`` on a raw header (decoded as Starlette does)."""
    given = _bearer(header.decode("latin-1")) if header is not None else None
    return given is not None and _token_matches(tokens, given)


#: ``TripScore`` to JSON bytes, as FastAPI serialises a route's response model.
_TRIP_SCORE_JSON: Final = TypeAdapter(TripScore)


@dataclass
class ServiceState:
    """What the routes share: settings, models, rollout policy, log and metrics.

    Three background threads keep it current, each on its own clock so that none can hold
    up another: the registry poller (:meth:`poll_registry_forever`; registry calls have
    HTTP timeouts but may still take seconds), the rollout-file watcher and the log flusher
    (:meth:`every`). Requests never call the registry.
    """

    settings: Settings
    holder: ModelHolder
    metrics: ServiceMetrics
    prediction_log: PredictionLog
    policy: RolloutPolicy
    tokens: list[bytes]
    auth: bool
    limits: RequestLimits
    rollout_mtime: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    models_frozen: bool = False

    def reload_rollout_file(self) -> None:
        path = self.settings.service.rollout_file
        if path is None:
            return
        try:
            mtime = path.stat().st_mtime
            if mtime == self.rollout_mtime:
                return
            policy = RolloutPolicy.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            _log.error(
                "rollout file unreadable; keeping the current split",
                extra={"path": str(path), "error": type(exc).__name__},
            )
            return
        self.rollout_mtime = mtime
        if policy != self.policy:
            self.policy = policy
            _log.info("rollout changed", extra={"rollout": policy.model_dump()})

    def every(self, interval_s: float, action: Callable[[], None]) -> None:
        """Run ``action`` every ``interval_s`` seconds until the service stops."""
        while not self.stop.wait(interval_s):
            action()

    def poll_registry_forever(self) -> None:
        """Poll the registry at once, then every ``poll_interval_s`` (at least every 5 s
        while no model is loaded, so the service turns ready soon after the registry
        answers)."""
        while True:
            self.poll_registry()
            wait = self.settings.service.poll_interval_s
            if not self.holder.ready:
                wait = min(wait, _NOT_READY_RETRY_S)
            if self.stop.wait(wait):
                return

    def poll_registry(self) -> None:
        changed = self.holder.refresh()
        outcome = "failed" if self.holder.last_error else ("swapped" if changed else "unchanged")
        self.metrics.registry_polls.labels(outcome).inc()
        if changed and not self.models_frozen:
            # The first models live as long as the process, like the libraries: out of the
            # collector's full passes too (see ``lifespan``).
            gc.freeze()
            self.models_frozen = True

    def flush_logs(self) -> None:
        """Write out the prediction log and the request lines batched by the log handler."""
        self._flush_log()
        flush_logs()

    def _flush_log(self) -> None:
        try:
            self.prediction_log.flush()
        except Exception:
            _log.exception("prediction log flush failed")
            self.metrics.errors.labels("prediction_log").inc()


def _record_models(metrics: ServiceMetrics) -> Callable[[LoadedModels], None]:
    def record(models: LoadedModels) -> None:
        metrics.models.info(
            {
                "model_name": models.champion.model_name,
                "champion_version": models.champion.model_version,
                "challenger_version": (
                    models.challenger.model_version if models.challenger else "none"
                ),
            }
        )

    return record


#: Answers a request from its scope and body, or ``None`` to leave it to the app.
FastPath = Callable[[Scope, bytes], Response | None]
#: A probe answered by the guard itself: its route (for the metrics) and its answer.
Probe = tuple[BaseRoute, Callable[[], Response]]


class _Guard:
    """Outermost ASGI layer: request id, body size limit, in-flight gauge, latency, access log.

    The body is read here, up to the limit, and replayed to the app: a chunked upload
    without Content-Length is cut off as soon as it passes the limit. A JSON body that is
    not UTF-8 JSON or nests too deep is answered 400 here, before any route parses it
    (``bodies.parse_json_body``); the parsed document is left in the request's state
    (``bodies.request_json``) so a route need not parse it again. ``probes`` (``GET
    /healthz``, ``/readyz``, ``/ping``) are answered here too, on the event loop without
    routing or a worker thread, so they answer while every worker thread is busy scoring.
    Requests with large bodies run on an event loop of their own (``_off_the_loop``).
    ``fast`` may answer a request before the app sees it (see ``_fast_score``); whatever
    it declines goes to the app, with the body replayed.
    """

    def __init__(
        self,
        app: ASGIApp,
        state: ServiceState,
        fast: FastPath | None = None,
        probes: dict[str, Probe] | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.fast = fast
        self.probes = probes or {}
        # ``Histogram.labels`` hashes and locks on every call: keep the children.
        self._latency: dict[tuple[str, str, int, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.state.metrics
        request_id = os.urandom(8).hex()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        answered = False
        metrics.in_flight.inc()

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                metrics.errors.labels("body_too_large").inc()
                limit = self.state.settings.service.max_body_bytes
                await _send_json(
                    send_with_id,
                    413,
                    ErrorResponse(
                        error="body_too_large",
                        message=f"request body exceeds {limit} bytes",
                        request_id=request_id,
                    ),
                )
                return
            probe = self.probes.get(scope["path"]) if scope["method"] == "GET" else None
            if probe is not None:
                scope["route"] = probe[0]
                await probe[1]()(scope, _replay(body), send_with_id)
                return
            refused = await _refuse_body(scope, body)
            if refused is not None:
                metrics.errors.labels(refused.kind).inc()
                await _send_json(
                    send_with_id,
                    400,
                    ErrorResponse(
                        error=refused.kind, message=refused.message, request_id=request_id
                    ),
                )
                return
            answer = None
            if self.fast is not None and len(body) <= _FAST_PATH_MAX_BYTES:
                answer = self.fast(scope, body)
            if answer is not None:
                await answer(scope, _replay(body), send_with_id)
                return
            try:
                if len(body) > _INLINE_CHECK_BYTES:
                    await _off_the_loop(self.app, scope, body, send_with_id)
                else:
                    await self.app(scope, _replay(body), send_with_id)
            except Exception:
                # Starlette sends the 500 of an unhandled error (logged with its traceback
                # by ``internal_error``), then raises the error again, on which uvicorn
                # drops the connection: the client would lose its keep-alive connection
                # with the request. Once the answer is out, the error has been dealt with.
                if not answered:
                    raise
        finally:
            metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            version = scope["state"].get("model_version", "none")
            key = (path, scope["method"], status, version)
            child = self._latency.get(key)
            if child is None:
                child = metrics.latency.labels(path, scope["method"], str(status), version)
                self._latency[key] = child
            child.observe(elapsed)
            if _log.isEnabledFor(logging.INFO):
                # The access log line, made directly: ``_log.info`` would also look up the
                # caller's frame, a cost on every request for fields the log never shows.
                _log.handle(
                    _log.makeRecord(
                        _log.name,
                        logging.INFO,
                        __file__,
                        0,
                        "request",
                        (),
                        None,
                        extra={
                            "request_id": request_id,
                            "method": scope["method"],
                            "route": path,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 2),
                            "model_version": version,
                        },
                    )
                )

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.state.settings.service.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _is_json(scope: Scope) -> bool:
    """Whether a route would parse the body as JSON: no content type, or a JSON one."""
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            media = bytes(value).split(b";")[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True


async def _refuse_body(scope: Scope, body: bytes) -> BodyError | None:
    """Why a JSON body cannot be read by any route, or ``None`` when it can (or is not JSON).

    A readable body's document goes into the request's state for the route.
    """
    if not body or not _is_json(scope):
        return None
    try:
        if len(body) <= _INLINE_CHECK_BYTES:
            document = parse_json_body(body)
        else:
            # Parsing megabytes takes tens of milliseconds: not on the event loop.
            document = await asyncio.to_thread(parse_json_body, body)
    except BodyError as exc:
        return exc
    scope["state"][JSON_DOCUMENT] = document
    return None


async def _off_the_loop(app: ASGIApp, scope: Scope, body: bytes, send: Send) -> None:
    """Run the app for one request on an event loop of its own, in a worker thread.

    FastAPI parses and validates a body, and serialises the answer, on the event loop: for
    a trip of 50,000 pings that is most of a second during which no other request, not even
    ``/healthz``, is answered. On its own loop the request only shares the interpreter with
    the others; what it sends is written out by the server's loop.
    """
    server_loop = asyncio.get_running_loop()

    async def send_on_server_loop(message: Message) -> None:
        await send(message)

    async def send_from_worker(message: Message) -> None:
        sent = asyncio.run_coroutine_threadsafe(send_on_server_loop(message), server_loop)
        await asyncio.wrap_future(sent)

    async def answer() -> None:
        await app(scope, _replay(body), send_from_worker)

    def run() -> None:
        asyncio.run(answer())

    await asyncio.to_thread(run)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # After the body, wait like a real connection would until the client goes away.
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}  # pragma: no cover

    return receive


async def _send_json(send: Send, status: int, body: Any) -> None:
    payload = body.model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _field_name(loc: tuple[int | str, ...]) -> str:
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
        name = _field_name(tuple(error.get("loc", ())))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "json_invalid":
            message = "body is not valid JSON"
        seen.setdefault(name, message)
    return [FieldProblem(field=k, message=v) for k, v in seen.items()]


def _invalid(problems: list[FieldProblem]) -> JSONResponse:
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    body = ValidationErrorResponse(
        message=f"{first.field}: {first.message}{more}", problems=problems
    )
    return JSONResponse(body.model_dump(), status_code=422)


def create_app(settings: Settings, registry_factory: Callable[[], RegistryReader]) -> FastAPI:
    """Build the service; models load in the background when it starts (lifespan)."""
    config = settings.service
    metrics = ServiceMetrics.create()
    holder = ModelHolder(registry_factory, on_swap=_record_models(metrics))
    auth = auth_enabled(config)
    tokens = _load_tokens(config)
    if auth and not tokens:
        raise ConfigError(
            f"the service binds to {config.host} so bearer-token auth is on, but no token is "
            "set: set DRIVERSCORE_SERVICE__TOKENS or DRIVERSCORE_SERVICE__TOKEN_FILE "
            "(or DRIVERSCORE_SERVICE__AUTH=off behind an authenticating proxy)"
        )
    state = ServiceState(
        settings=settings,
        holder=holder,
        metrics=metrics,
        prediction_log=open_prediction_log(settings),
        policy=RolloutPolicy(
            mode=config.rollout_mode, challenger_percent=config.challenger_percent
        ),
        tokens=tokens,
        auth=auth,
        limits=RequestLimits(max_pings=config.max_pings, max_future_s=config.max_future_s),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.prediction_log.setup()
        state.reload_rollout_file()
        # Everything loaded so far (libraries) lives as long as the process: keep it out of
        # the garbage collector's full passes, which otherwise stall requests.
        gc.collect()
        gc.freeze()
        # The registry is not awaited here: a registry that is down or slow delays
        # readiness (``/readyz`` says why), never listening.
        poller = threading.Thread(
            target=state.poll_registry_forever, name="registry-poller", daemon=True
        )
        workers = [
            threading.Thread(
                target=state.every,
                args=(config.rollout_reload_s, state.reload_rollout_file),
                name="rollout-file-watcher",
                daemon=True,
            ),
            threading.Thread(
                target=state.every,
                args=(_TICK_S, state.flush_logs),
                name="log-flusher",
                daemon=True,
            ),
        ]
        for thread in (poller, *workers):
            thread.start()
        try:
            yield
        finally:
            state.stop.set()
            for thread in workers:
                await asyncio.to_thread(thread.join, 10)
            # A daemon thread: a registry call in flight must not hold up the stop.
            await asyncio.to_thread(poller.join, _REGISTRY_JOIN_S)
            state.prediction_log.flush()

    app = FastAPI(
        title="driverscore scoring service",
        version="1",
        summary="Driver Score for a trip, from raw pings or precomputed features.",
        lifespan=lifespan,
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

    @app.exception_handler(RequestValidationError)
    async def _on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.errors.labels("invalid_request").inc()
        return _invalid(_problems(exc))

    @app.exception_handler(InvalidTripsError)
    async def _on_invalid_trips(request: Request, exc: InvalidTripsError) -> JSONResponse:
        metrics.errors.labels("invalid_request").inc()
        return _invalid(exc.problems)

    @app.exception_handler(BodyError)
    async def _on_unreadable_body(request: Request, exc: BodyError) -> JSONResponse:
        # Routes that parse a body themselves (``bodies.request_json``) answer as the guard.
        metrics.errors.labels(exc.kind).inc()
        body = ErrorResponse(
            error=exc.kind, message=exc.message, request_id=request.state.request_id
        )
        return JSONResponse(body.model_dump(), status_code=400)

    @app.exception_handler(_ServiceError)
    async def _on_service_error(request: Request, exc: _ServiceError) -> JSONResponse:
        metrics.errors.labels(exc.kind).inc()
        body = ErrorResponse(
            error=exc.kind, message=exc.message, request_id=request.state.request_id
        )
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(body.model_dump(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(kind).inc()
        body = ErrorResponse(
            error=kind,
            message=str(exc.detail),
            request_id=getattr(request.state, "request_id", None),
        )
        return JSONResponse(body.model_dump(), status_code=exc.status_code)

    def internal_error(request_id: str | None) -> JSONResponse:
        """The 500 of an unexpected error; the traceback goes to the log only."""
        _log.exception("unhandled error", extra={"request_id": request_id})
        metrics.errors.labels("internal").inc()
        body = ErrorResponse(
            error="internal",
            message="internal error; the service log has the details under this request id",
            request_id=request_id,
        )
        return JSONResponse(body.model_dump(), status_code=500)

    @app.exception_handler(Exception)
    async def _on_bug(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(getattr(request.state, "request_id", None))

    # async: a few comparisons, not worth a hop to the thread pool on every request.
    async def require_token(request: Request) -> None:
        if not state.auth:
            return
        given = _bearer(request.headers.get("authorization", ""))
        if given is None:
            raise _ServiceError(401, "unauthorized", "missing bearer token")
        if not _token_matches(state.tokens, given):
            raise _ServiceError(401, "unauthorized", "invalid bearer token")

    authorized = [Depends(require_token)]

    def loaded() -> LoadedModels:
        models = state.holder.models
        if models is None:
            raise _ServiceError(
                503, "not_ready", f"no model loaded yet ({state.holder.public_error or 'loading'})"
            )
        return models

    # ``Counter.labels`` hashes and locks on every call: keep the children.
    scored_counters: dict[tuple[str, str], Any] = {}

    def score(
        request_state: dict[str, Any], trips: list[TripIn], wheres: list[str]
    ) -> list[TripScore]:
        models = loaded()
        now = datetime.now(UTC)
        if len(trips) > config.max_trips:
            raise InvalidTripsError(
                [
                    FieldProblem(
                        field="trips", message=f"{len(trips)} trips; at most {config.max_trips}"
                    )
                ]
            )
        problems = [
            p
            for t, w in zip(trips, wheres, strict=True)
            for p in trip_problems(t, w, state.limits, now)
        ]
        if problems:
            raise InvalidTripsError(problems)
        try:
            scored = score_posted_trips(trips, wheres, models, state.policy, now)
        except InvalidTripsError as exc:
            for reason in exc.set_aside_reasons:
                metrics.trips_set_aside.labels(reason).inc()
            raise
        return _logged(request_state, scored)

    def score_pings_frame(request_state: dict[str, Any], pings: pl.DataFrame) -> ScoredBatch:
        """CSV pings of any number of trips, on the same path as posted trips."""
        models = loaded()
        try:
            scored = score_posted_pings(pings, models, state.policy, datetime.now(UTC))
        except InvalidTripsError as exc:
            for reason in exc.set_aside_reasons:
                metrics.trips_set_aside.labels(reason).inc()
            raise
        _logged(request_state, scored)
        return scored

    def _logged(request_state: dict[str, Any], scored: ScoredBatch) -> list[TripScore]:
        state.prediction_log.add(scored.records)
        versions = {s.model_version for s in scored.scores}
        request_state["model_version"] = ",".join(sorted(versions))
        for s in scored.scores:
            key = (s.model_role, s.model_version)
            counter = scored_counters.get(key)
            if counter is None:
                counter = scored_counters[key] = metrics.trips_scored.labels(*key)
            counter.inc()
        return scored.scores

    @app.post("/v1/score", response_model=TripScore, tags=["scoring"], dependencies=authorized)
    async def score_trip(trip: TripIn, request: Request) -> TripScore:
        """Score one trip, given as raw pings or as precomputed features."""
        # Feature trips usually take the fast path (``_fast_score``) and never get here.
        if trip.features is not None:
            # Well under a millisecond: cheaper inline than a hop to the thread pool.
            return score(request.scope["state"], [trip], [""])[0]
        return (await asyncio.to_thread(score, request.scope["state"], [trip], [""]))[0]

    @app.post(
        "/v1/score:batch",
        response_model=BatchScoreResponse,
        tags=["scoring"],
        dependencies=authorized,
    )
    def score_batch(batch: BatchScoreRequest, request: Request) -> BatchScoreResponse:
        """Score many trips; scores come back in the order of the posted trips."""
        wheres = [f"trips.{i}." for i in range(len(batch.trips))]
        return _batch_response(score(request.scope["state"], batch.trips, wheres))

    @app.get("/v1/models", response_model=ModelsResponse, tags=["models"], dependencies=authorized)
    def list_models(request: Request) -> ModelsResponse:
        """The champion and challenger being served, their metrics and lineage."""
        models = loaded()
        infos = [_version_info("champion", models.champion, models.champion_loaded_at, models)]
        if models.challenger is not None and models.challenger_loaded_at is not None:
            infos.append(
                _version_info("challenger", models.challenger, models.challenger_loaded_at, models)
            )
        return ModelsResponse(
            model_name=models.champion.model_name, models=infos, rollout=state.policy
        )

    @app.get("/v1/rollout", response_model=RolloutPolicy, tags=["models"], dependencies=authorized)
    def get_rollout() -> RolloutPolicy:
        """The current champion/challenger split."""
        return state.policy

    @app.put("/v1/rollout", response_model=RolloutPolicy, tags=["models"], dependencies=authorized)
    def put_rollout(policy: RolloutPolicy) -> RolloutPolicy:
        """Change the split at once, without a restart (this instance only)."""
        state.policy = policy
        _log.info("rollout changed", extra={"rollout": policy.model_dump()})
        return policy

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, tags=["operations"])
    def readyz() -> JSONResponse:
        """Readiness: 200 once a champion is loaded, 503 (with the reason) before."""
        return _readiness(state)

    @app.get("/ping", tags=["sagemaker"])
    def ping() -> JSONResponse:
        """SageMaker health check: 200 when a model is loaded."""
        return _readiness(state)

    @app.post(
        "/invocations",
        tags=["sagemaker"],
        dependencies=authorized,
        responses={200: {"model": BatchScoreResponse}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "anyOf": [
                                {"$ref": "#/components/schemas/TripIn"},
                                {"$ref": "#/components/schemas/BatchScoreRequest"},
                            ]
                        }
                    },
                    "text/csv": {"schema": {"type": "string"}},
                },
            }
        },
    )
    async def invocations(request: Request) -> Response:
        """SageMaker inference: a trip or ``{"trips": [...]}`` as JSON, or CSV with a header.

        CSV rows are canonical pings (when there is a ``lat`` column: cleaned as in batch,
        bad rows set aside) or one row of precomputed features per trip. Answers JSON, or
        CSV when ``Accept: text/csv``.
        """
        body = await request.body()
        content_type = request.headers.get("content-type", "application/json").split(";")[0]
        if content_type.strip() == "text/csv":
            answer = await asyncio.to_thread(
                _score_csv, state, request, body, score, score_pings_frame
            )
        elif content_type.strip() in ("application/json", ""):
            return await asyncio.to_thread(_invoke_json, state, request, body, score)
        else:
            raise _ServiceError(415, "unsupported_media_type", "send application/json or text/csv")
        if "text/csv" in request.headers.get("accept", ""):
            return Response(_scores_csv(answer), media_type="text/csv")
        return JSONResponse(answer.model_dump(mode="json"))

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def prometheus_metrics() -> Response:
        """Prometheus metrics: latency, errors, in-flight requests, loaded model versions."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    score_route = next(r for r in app.routes if getattr(r, "path", None) == "/v1/score")

    def fast_score(scope: Scope, body: bytes) -> Response | None:
        """``POST /v1/score`` of one feature trip, answered without FastAPI's request cycle.

        The hot path of the service: routing, dependency solving and response validation
        cost more than scoring the trip. It takes only the plain case - a JSON body that
        is a valid feature trip, a valid token, a model loaded - and validates, scores,
        logs and serialises exactly as the route does (same ``TripIn`` model, same
        ``score``, same ``TripScore``). Anything else (a missing or wrong token, invalid
        JSON or fields, pings, no model yet, another route) returns ``None`` and goes to
        the app, which answers it as before.
        """
        if scope["method"] != "POST" or scope["path"] != "/v1/score" or scope.get("root_path"):
            return None
        content_type = authorization = None
        for name, value in scope["headers"]:
            if name == b"content-type" and content_type is None:
                content_type = value
            elif name == b"authorization" and authorization is None:
                authorization = value
        if content_type is None or content_type.split(b";")[0].strip() != b"application/json":
            return None
        if state.auth and not _token_ok(state.tokens, authorization):
            return None
        if state.holder.models is None:
            return None
        try:
            # The document the guard parsed (depth-checked), then the route's model.
            trip = TripIn.model_validate(request_json(scope["state"], body))
        except Exception:  # invalid JSON or fields: the app answers with the 4xx
            return None
        if trip.features is None:
            return None
        scope["route"] = score_route
        try:
            answer = score(scope["state"], [trip], [""])[0]
        except Exception:
            return internal_error(scope["state"]["request_id"])
        return Response(_TRIP_SCORE_JSON.dump_json(answer), media_type="application/json")

    def route(path: str) -> BaseRoute:
        return next(r for r in app.routes if getattr(r, "path", None) == path)

    probes: dict[str, Probe] = {
        "/healthz": (route("/healthz"), lambda: JSONResponse({"status": "ok"})),
        "/readyz": (route("/readyz"), lambda: _readiness(state)),
        "/ping": (route("/ping"), lambda: _readiness(state)),
    }
    guarded = _Guard(app.router, state, fast_score, probes)
    _wrap_router(app, guarded)
    return app


def _wrap_router(app: FastAPI, guard: _Guard) -> None:
    """Put the guard outermost, around Starlette's own error and exception middleware."""
    build = app.build_middleware_stack

    def build_guarded() -> ASGIApp:
        guard.app = build()
        return guard

    app.build_middleware_stack = build_guarded  # type: ignore[method-assign]


def _readiness(state: ServiceState) -> JSONResponse:
    models = state.holder.models
    if models is None:
        body = Readiness(ready=False, reason=state.holder.public_error or "loading the models")
        return JSONResponse(body.model_dump(), status_code=503)
    body = Readiness(
        ready=True,
        champion_version=models.champion.model_version,
        challenger_version=models.challenger.model_version if models.challenger else None,
    )
    return JSONResponse(body.model_dump(), status_code=200)


def _version_info(
    role: Literal["champion", "challenger"],
    scorer: TripScorer,
    loaded_at: datetime,
    models: LoadedModels,
) -> ModelVersionInfo:
    card = scorer.card
    return ModelVersionInfo(
        role=role,
        version=scorer.model_version,
        loaded_at=loaded_at,
        created_at=card.created_at,
        decision_threshold=card.decision_threshold,
        feature_names=card.feature_names,
        metrics={**card.metrics, **models.run_metrics.get(scorer.model_version, {})},
        lineage={**card.lineage, **models.tags.get(scorer.model_version, {})},
    )


def _invoke_json(
    state: ServiceState,
    request: Request,
    body: bytes,
    score: Callable[[dict[str, Any], list[TripIn], list[str]], list[TripScore]],
) -> Response:
    # Parsed once by the guard (depth-checked); unreadable JSON is a 400 (``BodyError``).
    document = request_json(request.scope["state"], body)
    try:
        if isinstance(document, dict) and "trips" in document:
            batch = BatchScoreRequest.model_validate(document)
            wheres = [f"trips.{i}." for i in range(len(batch.trips))]
            scores = score(request.scope["state"], batch.trips, wheres)
            return JSONResponse(_batch_response(scores).model_dump(mode="json"))
        trip = TripIn.model_validate(document)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    return JSONResponse(score(request.scope["state"], [trip], [""])[0].model_dump(mode="json"))


def _batch_response(scores: list[TripScore]) -> BatchScoreResponse:
    total: dict[str, int] = {}
    for trip in scores:
        for reason, n in trip.pings_set_aside.items():
            total[reason] = total.get(reason, 0) + n
    return BatchScoreResponse(scores=scores, pings_set_aside=dict(sorted(total.items())))


#: Columns of a CSV feature row that are outputs of scoring or feature computation: a CSV
#: written by ``driverscore score`` may be posted back; they are not inputs.
_CSV_OUTPUTS: Final = frozenset(TRIP_RECORD_SCHEMA) | {"decision_id", "alert"}


def _score_csv(
    state: ServiceState,
    request: Request,
    body: bytes,
    score: Callable[[dict[str, Any], list[TripIn], list[str]], list[TripScore]],
    score_pings: Callable[[dict[str, Any], pl.DataFrame], ScoredBatch],
) -> BatchScoreResponse:
    """CSV rows through the same validation and scoring as JSON.

    Rows of pings (a ``lat`` column) are read with the canonical mapping, then cut into
    trips and scored as batch does; rows of features become the same ``TripIn`` bodies a
    JSON caller posts, so they meet the same checks and the same answers.
    """
    if state.holder.models is None:
        raise _ServiceError(503, "not_ready", "no model loaded yet")
    try:
        raw = pl.read_csv(io.BytesIO(body), infer_schema=False)
    except Exception:
        raise InvalidTripsError(
            [FieldProblem(field="(body)", message="body is not CSV with a header row")]
        ) from None
    if raw.height == 0:
        raise InvalidTripsError([FieldProblem(field="(body)", message="CSV has no rows")])
    if "lat" in raw.columns:
        try:
            pings = apply_mapping(raw, None, "invocations").pings.drop("source")
        except Exception as exc:
            raise InvalidTripsError([FieldProblem(field="(body)", message=str(exc))]) from None
        scored = score_pings(request.scope["state"], pings)
        return BatchScoreResponse(scores=scored.scores, pings_set_aside=scored.pings_set_aside)
    identity = set(TripIn.model_fields) - {"pings", "features"}
    inputs = set(TripFeaturesIn.model_fields)
    unknown = [c for c in raw.columns if c not in identity | inputs | _CSV_OUTPUTS]
    if unknown:
        raise InvalidTripsError(
            [FieldProblem(field=c, message="unknown CSV column") for c in unknown]
        )
    trips: list[TripIn] = []
    problems: list[FieldProblem] = []
    for i, row in enumerate(raw.iter_rows(named=True)):
        document = {
            "features": {k: _csv_value(v) for k, v in row.items() if k in inputs},
            **{k: v for k, v in row.items() if k in identity and v not in (None, "")},
        }
        try:
            trips.append(TripIn.model_validate(document))
        except ValidationError as exc:
            problems.extend(
                FieldProblem(field=f"rows.{i}.{_field_name(e['loc'])}", message=e["msg"])
                for e in exc.errors()
            )
    if problems:
        raise InvalidTripsError(problems)
    wheres = [f"rows.{i}." for i in range(len(trips))]
    return _batch_response(score(request.scope["state"], trips, wheres))


def _csv_value(text: str | None) -> float | str | None:
    """A CSV cell as JSON would carry it: empty is null, numbers are numbers."""
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text  # the model's validation names it


def _scores_csv(answer: BatchScoreResponse) -> str:
    """Score records as CSV, one row per trip: identity, features, score columns."""
    rows = []
    for trip in answer.scores:
        row = trip.model_dump(mode="json", exclude={"features", "pings_set_aside"})
        row.update(trip.features.model_dump(mode="json"))
        row["reasons"] = "; ".join(trip.reasons)
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None).write_csv()
