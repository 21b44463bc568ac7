"""The dashboard's FastAPI app: pages, the live alerts feed, sign-in, and its own assets.

Pages are rendered on the server (``pages.py``) from the answers of ``sources.py``; store
and registry reads block, so page routes are plain functions (run in the thread pool).
The alerts feed is server-sent events: every ``poll_s`` the newest alerts are read and
the ones the page has not been sent go out, newest trip end first.

**Sign-in.** When the scoring service requires tokens (``services/api/auth.py``), so do
the pages: ``/login`` takes one of the service's tokens and answers with a session cookie
(expiry and an HMAC-SHA256 of it under a key derived from all accepted tokens; HttpOnly,
SameSite=Strict), which every page load and the feed present. Replicas with the same
tokens accept each other's sessions; a change of tokens ends them all; no token is ever
stored in the browser.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from functools import cache
from importlib import resources
from typing import Annotated, Any, Final
from urllib.parse import parse_qsl, quote

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from driverscore.adapters.score_store.duckdb_store import StoreMissingError
from driverscore.errors import DriverscoreError
from driverscore.services.api.auth import token_matches
from driverscore.services.dashboard.pages import (
    alert_row,
    alerts_page,
    entity_html,
    error_page,
    login_page,
    model_html,
    overview_html,
)
from driverscore.services.dashboard.sources import (
    MAX_ID_CHARS,
    DashboardSources,
    PeriodError,
    entity_page,
    fleet_overview,
    latest_alerts,
    model_page,
    parse_period,
)

__all__ = ["SESSION_COOKIE", "create_dashboard", "standalone_app"]

SESSION_COOKIE: Final = "driverscore_session"
_SESSION_S: Final = 12 * 3600
_HEADERS: Final = {
    # Scripts and styles from the app only (plotly.js sets inline styles on its nodes).
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_ASSETS: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "plotly.min.js": "text/javascript; charset=utf-8",
}


@cache
def _asset(name: str) -> bytes:
    if name == "plotly.min.js":
        # plotly.js as the Python package ships it (the monitoring report's too): no CDN.
        return resources.files("plotly").joinpath("package_data", "plotly.min.js").read_bytes()
    return resources.files("driverscore.services.dashboard").joinpath("static", name).read_bytes()


class Sessions:
    """Signed session cookies (module docstring)."""

    def __init__(self, tokens: list[bytes], *, required: bool, lifetime_s: int = _SESSION_S):
        self.tokens = tokens
        self.required = required
        self.lifetime_s = lifetime_s
        # The key is derived from every accepted token: replicas behind one load balancer
        # accept each other's cookies, a restart signs nobody out, and revoking or adding a
        # token ends every session. Without tokens (no sign-in) it is never used.
        self._key = hashlib.sha256(
            b"driverscore-dashboard-session\0" + b"\0".join(sorted(tokens))
        ).digest()

    def _sign(self, expires: int) -> str:
        return hmac.new(self._key, str(expires).encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float) -> str:
        expires = int(now) + self.lifetime_s
        return f"{expires}.{self._sign(expires)}"

    def valid(self, cookie: str | None, now: float) -> bool:
        if not self.required:
            return True
        expires, _, signature = (cookie or "").partition(".")
        if not expires.isdigit() or int(expires) < now:
            return False
        return hmac.compare_digest(signature, self._sign(int(expires)))


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=_HEADERS)


def create_dashboard(
    sources: DashboardSources,
    *,
    base: str = "/dashboard",
    tokens: list[bytes] | None = None,
    require_token: bool = False,
    poll_s: float = 1.0,
) -> FastAPI:
    """The dashboard app, to be mounted at ``base`` (its links start there).

    ``require_token``: pages need a session from ``/login``, which takes one of ``tokens``
    (the scoring service's, ``services/api/auth.load_tokens``).
    """
    sessions = Sessions(list(tokens or []), required=require_token)
    app = FastAPI(title="driverscore dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    engine = sources.engine

    def signed_in(request: Request) -> bool:
        return sessions.valid(request.cookies.get(SESSION_COOKIE), time.time())

    def sign_in_first(request: Request) -> Response:
        path = request.url.path
        # Mounted, the path may or may not carry the mount point (Starlette versions differ).
        wanted = (path if path.startswith(f"{base}/") else base + path) + (
            f"?{request.url.query}" if request.url.query else ""
        )
        return RedirectResponse(f"{base}/login?next={quote(wanted, safe='')}", status_code=303)

    @app.exception_handler(PeriodError)
    async def bad_filter(_request: Request, exc: PeriodError) -> Response:
        return _html(error_page(400, str(exc), base=base), 400)

    @app.exception_handler(StoreMissingError)
    async def no_store(_request: Request, exc: StoreMissingError) -> Response:
        return _html(error_page(503, str(exc), base=base), 503)

    @app.exception_handler(DriverscoreError)
    async def store_down(_request: Request, exc: DriverscoreError) -> Response:
        return _html(error_page(503, str(exc).splitlines()[0], base=base), 503)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return _html(error_page(exc.status_code, str(exc.detail), base=base), exc.status_code)

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in _ASSETS:
            raise StarletteHTTPException(404, f"no asset {name[:80]!r}")
        return Response(
            _asset(name),
            media_type=_ASSETS[name],
            headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/login", include_in_schema=False)
    def login_form(next: str = "") -> Response:
        return _html(login_page(base=base, failed=False, next_path=_safe_next(next, base)))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        body = await request.body()
        form = dict(parse_qsl(body.decode("utf-8", errors="replace")))
        target = _safe_next(form.get("next", ""), base)
        given = form.get("token", "").strip().encode()
        if not given or not token_matches(sessions.tokens, given):
            return _html(login_page(base=base, failed=True, next_path=target), 401)
        answer = RedirectResponse(target, status_code=303)
        answer.set_cookie(
            SESSION_COOKIE,
            sessions.issue(time.time()),
            max_age=sessions.lifetime_s,
            path=base or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return answer

    @app.get("/", include_in_schema=False)
    def overview(request: Request) -> Response:
        if not signed_in(request):
            return sign_in_first(request)
        period = parse_period(
            dict(request.query_params), sources.reader.newest_trip_end(), sources.now()
        )
        return _html(overview_html(fleet_overview(sources, period), base=base, engine=engine))

    @app.get("/alerts", include_in_schema=False)
    def alerts(request: Request) -> Response:
        if not signed_in(request):
            return sign_in_first(request)
        return _html(alerts_page(latest_alerts(sources), base=base, engine=engine))

    @app.get("/alerts/stream", include_in_schema=False)
    async def alert_stream(request: Request) -> Response:
        if not signed_in(request):
            return Response("sign in first", status_code=401, media_type="text/plain")
        return StreamingResponse(
            _alert_events(request, sources, base, poll_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    def entity(request: Request, kind: str, entity_id: str, trip: str | None) -> Response:
        if not signed_in(request):
            return sign_in_first(request)
        if len(entity_id) > MAX_ID_CHARS or (trip is not None and len(trip) > MAX_ID_CHARS):
            raise PeriodError(f"the {kind} or trip id is longer than {MAX_ID_CHARS} characters")
        page = entity_page(sources, kind, entity_id, trip)  # type: ignore[arg-type]
        if page is None:
            raise StarletteHTTPException(404, f"no {kind} {entity_id[:80]!r} in the score store")
        return _html(entity_html(page, base=base, engine=engine))

    @app.get("/drivers/{driver_id:path}", include_in_schema=False)
    def driver(
        request: Request, driver_id: Annotated[str, PathParam()], trip: str | None = None
    ) -> Response:
        return entity(request, "driver", driver_id, trip)

    @app.get("/vehicles/{vehicle_id:path}", include_in_schema=False)
    def vehicle(
        request: Request, vehicle_id: Annotated[str, PathParam()], trip: str | None = None
    ) -> Response:
        return entity(request, "vehicle", vehicle_id, trip)

    @app.get("/model", include_in_schema=False)
    def model(request: Request) -> Response:
        if not signed_in(request):
            return sign_in_first(request)
        return _html(model_html(model_page(sources), base=base, engine=engine))

    return app


def _safe_next(target: str, base: str) -> str:
    """Where to go after signing in: a path of the dashboard, never another site."""
    home = f"{base}/"
    if not target.startswith(home) or target.startswith("//") or "\\" in target:
        return home
    return target


async def _alert_events(
    request: Request, sources: DashboardSources, base: str, poll_s: float
) -> AsyncIterator[bytes]:
    """Server-sent events: ``alert`` (one new alert row) as they are stored, a comment as a
    heartbeat otherwise."""
    sent: set[str] = set()
    first = True
    yield b"retry: 2000\n\n"
    while not await request.is_disconnected():
        try:
            frame = await asyncio.to_thread(latest_alerts, sources)
        except DriverscoreError as exc:
            yield _event("status", {"text": f"store unavailable: {str(exc).splitlines()[0]}"})
            await asyncio.sleep(poll_s)
            continue
        fresh: list[dict[str, Any]] = []
        for row in frame.iter_rows(named=True):
            key = f"{row['vehicle_id']}/{row['trip_id']}/{row['model_version']}"
            if key not in sent:
                sent.add(key)
                fresh.append(row)
        # Oldest first, so the page (which puts each at its place by trip end) ends up
        # newest first whatever the order of arrival.
        for row in reversed(fresh):
            yield _event(
                "alert",
                {
                    "key": f"{row['vehicle_id']}/{row['trip_id']}/{row['model_version']}",
                    "end": row["end_ts"].isoformat() if row["end_ts"] is not None else "",
                    "html": alert_row(row, base=base),
                    "initial": first,
                },
            )
        if first or not fresh:
            yield _event("status", {"text": f"live · {len(sent):,} alerts"})
        first = False
        await asyncio.sleep(poll_s)


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def standalone_app(dashboard: FastAPI, base: str = "/dashboard") -> FastAPI:
    """``driverscore dashboard``: the dashboard at ``base``, ``/`` sending there."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", include_in_schema=False)
    def home() -> Response:
        return RedirectResponse(f"{base}/", status_code=307)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.mount(base, dashboard)
    return app
