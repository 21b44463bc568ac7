"""``POST /v1/score`` of one feature trip, answered before FastAPI's request cycle.

The hot path of the service: routing, dependency solving and response validation cost
more than scoring the trip (``bench/bench_service.py``). The guard calls
:class:`FastScore` with every small body; it takes only the plain case and gives
everything else back to the app.
"""

from __future__ import annotations

from typing import Final

from fastapi import Response
from pydantic import TypeAdapter
from starlette.routing import BaseRoute
from starlette.types import Scope

from driverscore.services.api.auth import token_ok
from driverscore.services.api.bodies import request_json
from driverscore.services.api.errors import internal_error
from driverscore.services.api.schemas import TripIn, TripScore
from driverscore.services.api.scorer import Scorer
from driverscore.services.api.state import ServiceState

__all__ = ["FastScore"]

#: ``TripScore`` to JSON bytes, as FastAPI serialises a route's response model.
_TRIP_SCORE_JSON: Final = TypeAdapter(TripScore)


class FastScore:
    """Answers ``POST /v1/score`` of one feature trip, or ``None`` to leave it to the app.

    It takes only the plain case - a JSON body that is a valid feature trip, a valid token,
    a model loaded - and validates, scores, logs and serialises exactly as the route does
    (same ``TripIn`` model, same :meth:`Scorer.score`, same ``TripScore``). Anything else (a
    missing or wrong token, invalid JSON or fields, pings, no model yet, another route)
    returns ``None`` and goes to the app, which answers it as before. ``route`` is the app's
    ``/v1/score`` route: what the latency metric and access log name.
    """

    def __init__(self, state: ServiceState, scorer: Scorer, route: BaseRoute) -> None:
        self.state = state
        self.route = route
        self._score = scorer.score

    def __call__(self, scope: Scope, body: bytes) -> Response | None:
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
        state = self.state
        if state.auth and not token_ok(state.tokens, authorization):
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
        scope["route"] = self.route
        try:
            answer = self._score(scope["state"], [trip], [""])[0]
        except Exception:
            return internal_error(state.metrics, scope["state"]["request_id"])
        return Response(_TRIP_SCORE_JSON.dump_json(answer), media_type="application/json")
