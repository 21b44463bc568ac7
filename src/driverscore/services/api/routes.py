"""The service's own routes: scoring (``/v1/score``, ``/v1/score:batch``), the models and
the rollout split (``/v1/models``, ``/v1/rollout``), and operations (``/healthz``,
``/readyz``, ``/metrics``). The SageMaker contract is in ``sagemaker.py``.

The scoring routes read their body themselves: the document the guard already parsed
(``bodies.request_json``), validated as FastAPI validates a typed body parameter, and for
trips of pings validated in a worker thread together with the scoring. FastAPI would
parse the body a second time and validate it on the event loop (most of a second for
50,000 pings). :func:`document_posted_bodies` keeps the OpenAPI document as it would be
with typed parameters.
"""

from __future__ import annotations

import asyncio
import email.message
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final, Literal, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import OpenAPI
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import TripScorer
from driverscore.errors import DriverscoreError
from driverscore.services.api.bodies import request_json
from driverscore.services.api.errors import ServiceError
from driverscore.services.api.holder import LoadedModels
from driverscore.services.api.schemas import (
    BatchScoreRequest,
    BatchScoreResponse,
    ModelsResponse,
    ModelVersionInfo,
    Readiness,
    TripIn,
    TripScore,
)
from driverscore.services.api.scorer import Scorer
from driverscore.services.api.state import ServiceState

__all__ = ["ServiceRoutes", "document_posted_bodies", "readiness_response"]

_log = logging.getLogger("driverscore.service")
_Body = TypeVar("_Body", bound=BaseModel)
#: Where FastAPI puts the schemas of its models in the OpenAPI document.
_SCHEMA_REF: Final = "#/components/schemas/{model}"
#: Bodies the routes read themselves; their schemas join the OpenAPI components.
_POSTED_BODIES: Final = (TripIn, BatchScoreRequest)


class _NoBody:
    """The body of a request that has none (FastAPI's "Field required" 422)."""


_NO_BODY: Final = _NoBody()


def _openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """The ``requestBody`` of a route taking ``model`` as JSON, as FastAPI documents it."""
    schema = {"$ref": _SCHEMA_REF.format(model=model.__name__)}
    return {"requestBody": {"content": {"application/json": {"schema": schema}}, "required": True}}


class ServiceRoutes:
    """``/v1/*``, ``/healthz``, ``/readyz`` and ``/metrics`` of one service instance."""

    def __init__(self, state: ServiceState, scorer: Scorer) -> None:
        self.state = state
        self.scorer = scorer

    def add_to(self, app: FastAPI, authorized: Sequence[Depends]) -> None:
        """Add the routes to ``app``; ``authorized`` are the dependencies of routes that
        need a token."""
        deps = list(authorized)
        app.add_api_route(
            "/v1/score",
            self.score_trip,
            methods=["POST"],
            response_model=TripScore,
            tags=["scoring"],
            dependencies=deps,
            openapi_extra=_openapi_body(TripIn),
        )
        app.add_api_route(
            "/v1/score:batch",
            self.score_batch,
            methods=["POST"],
            response_model=BatchScoreResponse,
            tags=["scoring"],
            dependencies=deps,
            openapi_extra=_openapi_body(BatchScoreRequest),
        )
        app.add_api_route(
            "/v1/models",
            self.list_models,
            methods=["GET"],
            response_model=ModelsResponse,
            tags=["models"],
            dependencies=deps,
        )
        app.add_api_route(
            "/v1/rollout",
            self.get_rollout,
            methods=["GET"],
            response_model=RolloutPolicy,
            tags=["models"],
            dependencies=deps,
        )
        app.add_api_route(
            "/v1/rollout",
            self.put_rollout,
            methods=["PUT"],
            response_model=RolloutPolicy,
            tags=["models"],
            dependencies=deps,
        )
        app.add_api_route("/healthz", self.healthz, methods=["GET"], tags=["operations"])
        app.add_api_route(
            "/readyz", self.readyz, methods=["GET"], response_model=Readiness, tags=["operations"]
        )
        app.add_api_route(
            "/metrics",
            self.prometheus_metrics,
            methods=["GET"],
            tags=["operations"],
            response_class=Response,
        )

    async def score_trip(self, request: Request) -> TripScore:
        """Score one trip, given as raw pings or as precomputed features."""
        # Feature trips usually take the fast path (``fast_path.FastScore``) and never get here.
        posted = await _posted_body(request)
        request_state = request.scope["state"]
        if isinstance(posted, dict) and posted.get("pings") is None:
            # A feature trip (or invalid): well under a millisecond, cheaper inline than a
            # hop to the thread pool.
            return self._score_trip(request_state, posted)
        return await asyncio.to_thread(self._score_trip, request_state, posted)

    def _score_trip(self, request_state: dict[str, Any], posted: Any) -> TripScore:
        trip = _validated(TripIn, posted)
        return self.scorer.score(request_state, [trip], [""])[0]

    async def score_batch(self, request: Request) -> BatchScoreResponse:
        """Score many trips; scores come back in the order of the posted trips."""
        posted = await _posted_body(request)
        # FastAPI's thread pool, where it ran this route when it took a typed body.
        return await run_in_threadpool(self._score_batch, request.scope["state"], posted)

    def _score_batch(self, request_state: dict[str, Any], posted: Any) -> BatchScoreResponse:
        return self.scorer.score_batch(request_state, _validated(BatchScoreRequest, posted))

    def list_models(self, request: Request) -> ModelsResponse:
        """The champion and challenger being served, their metrics and lineage."""
        models = self.state.loaded_models()
        infos = [_version_info("champion", models.champion, models.champion_loaded_at, models)]
        if models.challenger is not None and models.challenger_loaded_at is not None:
            infos.append(
                _version_info("challenger", models.challenger, models.challenger_loaded_at, models)
            )
        return ModelsResponse(
            model_name=models.champion.model_name, models=infos, rollout=self.state.policy
        )

    def get_rollout(self) -> RolloutPolicy:
        """The current champion/challenger split."""
        return self.state.policy

    def put_rollout(self, policy: RolloutPolicy) -> RolloutPolicy:
        """Change the split at once, without a restart: stored in the registry (audited),
        where every replica picks it up within one poll interval; this instance at once."""
        try:
            registry = self.state.holder.rollout_registry()
            if registry is not None:
                registry.set_rollout_policy(policy, actor="service-api", reason="PUT /v1/rollout")
        except DriverscoreError as exc:
            raise ServiceError(409, "rollout_not_stored", str(exc)) from None
        except Exception as exc:
            _log.exception("rollout policy could not be stored in the registry")
            raise ServiceError(
                503, "registry_unavailable", "the registry did not store the rollout policy"
            ) from exc
        self.state.policy = policy
        _log.info("rollout changed", extra={"rollout": policy.model_dump()})
        return policy

    def healthz(self) -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    def readyz(self) -> JSONResponse:
        """Readiness: 200 once a champion is loaded, 503 (with the reason) before."""
        return readiness_response(self.state)

    def prometheus_metrics(self) -> Response:
        """Prometheus metrics: latency, errors, in-flight requests, loaded model versions."""
        return Response(
            generate_latest(self.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )


def readiness_response(state: ServiceState) -> JSONResponse:
    """``/readyz`` (and SageMaker's ``/ping``): 200 with the versions loaded, or 503 and why."""
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


def _reads_as_json(content_type: str | None) -> bool:
    """Whether FastAPI would read a body of this content type as JSON for a typed body: a
    JSON media type (``application/json``, ``application/*+json``); no content type is not.
    """
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


async def _posted_body(request: Request) -> Any:
    """The body as FastAPI hands it to a typed body parameter, without parsing it again.

    The guard's document for a JSON body; the raw bytes for any other content type (no
    model accepts them: a 422, as before); :data:`_NO_BODY` for an empty body.
    """
    body = await request.body()
    if not body:
        return _NO_BODY
    if not _reads_as_json(request.headers.get("content-type")):
        return body
    return request_json(request.scope["state"], body)


def _validated(model: type[_Body], posted: Any) -> _Body:
    """``posted`` as ``model``, or the 422 FastAPI gives for that body (same fields named)."""
    if posted is _NO_BODY:
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    try:
        return model.model_validate(posted, from_attributes=True)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def document_posted_bodies(app: FastAPI) -> None:
    """Put the schemas of the bodies the routes read themselves into ``app``'s OpenAPI
    components, where FastAPI puts those of typed body parameters (the routes refer to
    them in their ``openapi_extra``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        _, definitions = models_json_schema(
            [(model, "validation") for model in _POSTED_BODIES], ref_template=_SCHEMA_REF
        )
        components = document.setdefault("components", {})
        schemas = {**components.get("schemas", {}), **definitions["$defs"]}
        components["schemas"] = {name: schemas[name] for name in sorted(schemas)}
        # Through FastAPI's OpenAPI model, as its own schemas went (bounds as numbers, no
        # null defaults).
        normalised: dict[str, Any] = jsonable_encoder(
            OpenAPI(**document), by_alias=True, exclude_none=True
        )
        app.openapi_schema = normalised
        return normalised

    app.openapi = openapi  # type: ignore[method-assign]
