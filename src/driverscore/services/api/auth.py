"""Bearer tokens: which are accepted, and the check of a request's ``Authorization`` header.

Tokens come from the settings and the token file; auth is on unless the service binds to
localhost only (``service.auth = auto``). A given token is compared in constant time
against every accepted one. The routes check it through :class:`RequireToken`, the fast
path through :func:`token_ok` on the raw header; both accept and refuse the same headers.
"""

from __future__ import annotations

import hmac
from typing import Final

from fastapi import Request

from driverscore.errors import ConfigError
from driverscore.services.api.errors import ServiceError
from driverscore.services.api.state import ServiceState
from driverscore.settings import ServiceConfig

__all__ = [
    "RequireToken",
    "auth_enabled",
    "bearer",
    "load_tokens",
    "service_auth",
    "token_matches",
    "token_ok",
]

_LOCAL_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})


def auth_enabled(config: ServiceConfig) -> bool:
    if config.auth == "auto":
        return config.host not in _LOCAL_HOSTS
    return config.auth == "on"


def load_tokens(config: ServiceConfig) -> list[bytes]:
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


def service_auth(config: ServiceConfig) -> tuple[bool, list[bytes]]:
    """Whether auth is on, and the accepted tokens; a :class:`ConfigError` when auth is on
    and no token is set (the service would refuse every request)."""
    auth = auth_enabled(config)
    tokens = load_tokens(config)
    if auth and not tokens:
        raise ConfigError(
            f"the service binds to {config.host} so bearer-token auth is on, but no token is "
            "set: set DRIVERSCORE_SERVICE__TOKENS or DRIVERSCORE_SERVICE__TOKEN_FILE "
            "(or DRIVERSCORE_SERVICE__AUTH=off behind an authenticating proxy)"
        )
    return auth, tokens


def bearer(header: str) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def token_matches(tokens: list[bytes], given: bytes) -> bool:
    # Compare against every token without stopping early: timing reveals nothing.
    matches = [hmac.compare_digest(given, t) for t in tokens]
    return any(matches)


def token_ok(tokens: list[bytes], header: bytes | None) -> bool:
    """The check of :class:`RequireToken` on a raw header (decoded as Starlette does)."""
    given = bearer(header.decode("latin-1")) if header is not None else None
    return given is not None and token_matches(tokens, given)


class RequireToken:
    """The FastAPI dependency of the routes that need a token: a 401 without a valid one."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    # async: a few comparisons, not worth a hop to the thread pool on every request.
    async def __call__(self, request: Request) -> None:
        if not self.state.auth:
            return
        given = bearer(request.headers.get("authorization", ""))
        if given is None:
            raise ServiceError(401, "unauthorized", "missing bearer token")
        if not token_matches(self.state.tokens, given):
            raise ServiceError(401, "unauthorized", "invalid bearer token")
