"""The SageMaker container contract: ``GET /ping`` and ``POST /invocations``.

``/invocations`` takes a trip or ``{"trips": [...]}`` as JSON, or CSV with a header row
(canonical pings, or one row of features per trip), and answers JSON, or CSV when asked
(``Accept: text/csv``). Every form goes through the same validation and the same
:class:`~driverscore.services.api.scorer.Scorer` as ``/v1/score``.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from typing import Final

import polars as pl
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from driverscore.domain.mapping import apply_mapping
from driverscore.domain.trip_scoring import TRIP_RECORD_SCHEMA
from driverscore.services.api.bodies import request_json
from driverscore.services.api.errors import ServiceError, field_name
from driverscore.services.api.routes import readiness_response
from driverscore.services.api.schemas import (
    BatchScoreRequest,
    BatchScoreResponse,
    FieldProblem,
    TripFeaturesIn,
    TripIn,
)
from driverscore.services.api.scorer import Scorer, batch_response
from driverscore.services.api.scoring import InvalidTripsError
from driverscore.services.api.state import ServiceState

__all__ = ["SageMakerRoutes"]

#: Columns of a CSV feature row that are outputs of scoring or feature computation: a CSV
#: written by ``driverscore score`` may be posted back; they are not inputs.
_CSV_OUTPUTS: Final = frozenset(TRIP_RECORD_SCHEMA) | {"decision_id", "alert"}
#: ``/invocations`` reads its body itself (JSON or CSV): what the OpenAPI document says.
_INVOCATIONS_BODY: Final = {
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
}


class SageMakerRoutes:
    """``/ping`` and ``/invocations`` of one service instance."""

    def __init__(self, state: ServiceState, scorer: Scorer) -> None:
        self.state = state
        self.scorer = scorer

    def add_to(self, app: FastAPI, authorized: Sequence[Depends]) -> None:
        """Add the routes to ``app``; ``authorized`` are the dependencies of routes that
        need a token."""
        app.add_api_route("/ping", self.ping, methods=["GET"], tags=["sagemaker"])
        app.add_api_route(
            "/invocations",
            self.invocations,
            methods=["POST"],
            tags=["sagemaker"],
            dependencies=list(authorized),
            responses={200: {"model": BatchScoreResponse}},
            openapi_extra=_INVOCATIONS_BODY,
        )

    def ping(self) -> JSONResponse:
        """SageMaker health check: 200 when a model is loaded."""
        return readiness_response(self.state)

    async def invocations(self, request: Request) -> Response:
        """SageMaker inference: a trip or ``{"trips": [...]}`` as JSON, or CSV with a header.

        CSV rows are canonical pings (when there is a ``lat`` column: cleaned as in batch,
        bad rows set aside) or one row of precomputed features per trip. Answers JSON, or
        CSV when ``Accept: text/csv``.
        """
        body = await request.body()
        content_type = request.headers.get("content-type", "application/json").split(";")[0]
        if content_type.strip() == "text/csv":
            answer = await asyncio.to_thread(self._score_csv, request, body)
        elif content_type.strip() in ("application/json", ""):
            return await asyncio.to_thread(self._invoke_json, request, body)
        else:
            raise ServiceError(415, "unsupported_media_type", "send application/json or text/csv")
        if "text/csv" in request.headers.get("accept", ""):
            return Response(_scores_csv(answer), media_type="text/csv")
        return JSONResponse(answer.model_dump(mode="json"))

    def _invoke_json(self, request: Request, body: bytes) -> Response:
        # Parsed once by the guard (depth-checked); unreadable JSON is a 400 (``BodyError``).
        request_state = request.scope["state"]
        document = request_json(request_state, body)
        try:
            if isinstance(document, dict) and "trips" in document:
                batch = BatchScoreRequest.model_validate(document)
                answer = self.scorer.score_batch(request_state, batch)
                return JSONResponse(answer.model_dump(mode="json"))
            trip = TripIn.model_validate(document)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        score = self.scorer.score(request_state, [trip], [""])[0]
        return JSONResponse(score.model_dump(mode="json"))

    def _score_csv(self, request: Request, body: bytes) -> BatchScoreResponse:
        """CSV rows through the same validation and scoring as JSON.

        Rows of pings (a ``lat`` column) are read with the canonical mapping, then cut into
        trips and scored as batch does; rows of features become the same ``TripIn`` bodies a
        JSON caller posts, so they meet the same checks and the same answers.
        """
        if self.state.holder.models is None:
            raise ServiceError(503, "not_ready", "no model loaded yet")
        try:
            raw = pl.read_csv(io.BytesIO(body), infer_schema=False)
        except Exception:
            raise InvalidTripsError(
                [FieldProblem(field="(body)", message="body is not CSV with a header row")]
            ) from None
        if raw.height == 0:
            raise InvalidTripsError([FieldProblem(field="(body)", message="CSV has no rows")])
        request_state = request.scope["state"]
        if "lat" in raw.columns:
            try:
                pings = apply_mapping(raw, None, "invocations").pings.drop("source")
            except Exception as exc:
                raise InvalidTripsError([FieldProblem(field="(body)", message=str(exc))]) from None
            scored = self.scorer.score_pings(request_state, pings)
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
                    FieldProblem(field=f"rows.{i}.{field_name(e['loc'])}", message=e["msg"])
                    for e in exc.errors()
                )
        if problems:
            raise InvalidTripsError(problems)
        wheres = [f"rows.{i}." for i in range(len(trips))]
        return batch_response(self.scorer.score(request_state, trips, wheres))


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
