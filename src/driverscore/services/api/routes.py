"""The service's own routes: scoring (``/v1/score``, ``/v1/score:batch``), the models and
the rollout split (``/v1/models``, ``/v1/rollout``), and operations (``/healthz``,
``/readyz``, ``/metrics``). The SageMaker contract is in ``sagemaker.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from fastapi import FastAPI, Request, Response
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import TripScorer
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

__all__ = ["ServiceRoutes", "readiness_response"]

_log = logging.getLogger("driverscore.service")


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
        )
        app.add_api_route(
            "/v1/score:batch",
            self.score_batch,
            methods=["POST"],
            response_model=BatchScoreResponse,
            tags=["scoring"],
            dependencies=deps,
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

    async def score_trip(self, trip: TripIn, request: Request) -> TripScore:
        """Score one trip, given as raw pings or as precomputed features."""
        # Feature trips usually take the fast path (``fast_path.FastScore``) and never get here.
        if trip.features is not None:
            # Well under a millisecond: cheaper inline than a hop to the thread pool.
            return self.scorer.score(request.scope["state"], [trip], [""])[0]
        return (await asyncio.to_thread(self.scorer.score, request.scope["state"], [trip], [""]))[0]

    def score_batch(self, batch: BatchScoreRequest, request: Request) -> BatchScoreResponse:
        """Score many trips; scores come back in the order of the posted trips."""
        return self.scorer.score_batch(request.scope["state"], batch)

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
        """Change the split at once, without a restart (this instance only)."""
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
