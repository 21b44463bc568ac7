"""The service's outermost ASGI layer: what every request goes through before any route.

:class:`Guard` gives each request its id (``X-Request-Id``), reads the body up to the size
limit, refuses JSON bodies no route can read, answers the probes itself, lets the fast
path answer what it can, runs requests with large bodies on an event loop of their own,
and records every request: the in-flight gauge, the latency histogram and the access log
line. :func:`install_guard` puts it around the app.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Final

from fastapi import FastAPI, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from driverscore.services.api.bodies import JSON_DOCUMENT, BodyError, parse_json_body
from driverscore.services.api.schemas import ErrorResponse
from driverscore.services.api.state import ServiceState

__all__ = ["FastPath", "Guard", "Probe", "install_guard"]

_log = logging.getLogger("driverscore.service")
#: Requests with bodies above this size are checked and answered in a worker thread, off
#: the event loop (bytes).
_INLINE_CHECK_BYTES: Final = 64 * 1024
#: The fast path only ever takes one trip of features: bigger bodies (pings, batches) skip
#: it rather than be parsed on the event loop for nothing (bytes).
_FAST_PATH_MAX_BYTES: Final = 16 * 1024


#: Answers a request from its scope and body, or ``None`` to leave it to the app.
FastPath = Callable[[Scope, bytes], Response | None]
#: A probe answered by the guard itself: its route (for the metrics) and its answer.
Probe = tuple[BaseRoute, Callable[[], Response]]


class Guard:
    """Outermost ASGI layer: request id, body size limit, in-flight gauge, latency, access log.

    The body is read here, up to the limit, and replayed to the app: a chunked upload
    without Content-Length is cut off as soon as it passes the limit. A JSON body that is
    not UTF-8 JSON or nests too deep is answered 400 here, before any route parses it
    (``bodies.parse_json_body``); the parsed document is left in the request's state
    (``bodies.request_json``) so a route need not parse it again. ``probes`` (``GET
    /healthz``, ``/readyz``, ``/ping``) are answered here too, on the event loop without
    routing or a worker thread, so they answer while every worker thread is busy scoring.
    Requests with large bodies run on an event loop of their own (``_off_the_loop``).
    ``fast`` may answer a request before the app sees it (``fast_path.FastScore``); whatever
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


def install_guard(app: FastAPI, guard: Guard) -> None:
    """Put the guard outermost, around Starlette's own error and exception middleware."""
    build = app.build_middleware_stack

    def build_guarded() -> ASGIApp:
        guard.app = build()
        return guard

    app.build_middleware_stack = build_guarded  # type: ignore[method-assign]
