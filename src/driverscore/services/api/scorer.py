"""A request's trips scored and recorded: the part every scoring route shares.

:class:`Scorer` checks the request's limits, scores on the one scoring path
(``scoring.score_posted_trips`` / ``score_posted_pings``), and records what it did: the
decisions in the prediction log, the trips scored or set aside in the metrics, and the
answering model version in the request's state (for the latency metric and the access
log line). ``/v1/score``, ``/v1/score:batch``, the fast path and ``/invocations`` (JSON and
CSV) all score through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import polars as pl

from driverscore.services.api.schemas import (
    BatchScoreRequest,
    BatchScoreResponse,
    FieldProblem,
    TripIn,
    TripScore,
)
from driverscore.services.api.scoring import (
    InvalidTripsError,
    ScoredBatch,
    score_posted_pings,
    score_posted_trips,
    trip_problems,
)
from driverscore.services.api.state import ServiceState

__all__ = ["Scorer", "batch_response", "monitored_records", "trip_records"]


class Scorer:
    """Scores the trips of a request and records them (prediction log, metrics).

    ``request_state`` is the request's ``scope["state"]``: the answering model versions go
    there as ``model_version``.
    """

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.metrics = state.metrics
        self.max_trips = state.settings.service.max_trips
        # ``Counter.labels`` hashes and locks on every call: keep the children.
        self._scored_counters: dict[tuple[str, str], Any] = {}

    def score(
        self, request_state: dict[str, Any], trips: list[TripIn], wheres: list[str]
    ) -> list[TripScore]:
        """Answers for posted trips in posted order; ``wheres`` prefix each trip's field
        names in a 422 (``"trips.3."``)."""
        models = self.state.loaded_models()
        now = datetime.now(UTC)
        if len(trips) > self.max_trips:
            raise InvalidTripsError(
                [
                    FieldProblem(
                        field="trips", message=f"{len(trips)} trips; at most {self.max_trips}"
                    )
                ]
            )
        limits = self.state.limits
        problems = [
            p for t, w in zip(trips, wheres, strict=True) for p in trip_problems(t, w, limits, now)
        ]
        if problems:
            raise InvalidTripsError(problems)
        try:
            scored = score_posted_trips(trips, wheres, models, self.state.policy, now)
        except InvalidTripsError as exc:
            self._count_set_aside(exc)
            raise
        if self.state.live_monitor is not None:
            pings = sum(len(t.pings) for t in trips if t.pings is not None)
            self.state.live_monitor.observe_later(scored.scores, monitored_records, pings_in=pings)
        return self._logged(request_state, scored)

    def score_batch(
        self, request_state: dict[str, Any], batch: BatchScoreRequest
    ) -> BatchScoreResponse:
        """A batch's answers, in posted order, with the pings set aside in all."""
        wheres = [f"trips.{i}." for i in range(len(batch.trips))]
        return batch_response(self.score(request_state, batch.trips, wheres))

    def score_pings(self, request_state: dict[str, Any], pings: pl.DataFrame) -> ScoredBatch:
        """CSV pings of any number of trips, on the same path as posted trips."""
        models = self.state.loaded_models()
        try:
            scored = score_posted_pings(pings, models, self.state.policy, datetime.now(UTC))
        except InvalidTripsError as exc:
            self._count_set_aside(exc)
            raise
        if self.state.live_monitor is not None:
            self.state.live_monitor.observe_later(
                scored.scores, monitored_records, pings_in=pings.height
            )
        self._logged(request_state, scored)
        return scored

    def _count_set_aside(self, exc: InvalidTripsError) -> None:
        for reason in exc.set_aside_reasons:
            self.metrics.trips_set_aside.labels(reason).inc()

    def _logged(self, request_state: dict[str, Any], scored: ScoredBatch) -> list[TripScore]:
        self.state.prediction_log.add(scored.records)
        if self.state.profile_writer is not None:
            # Profiled off the request path, when the parts are flushed.
            self.state.profile_writer.observe_later(scored.scores, trip_records)
        versions = {s.model_version for s in scored.scores}
        request_state["model_version"] = ",".join(sorted(versions))
        counters = self._scored_counters
        for s in scored.scores:
            key = (s.model_role, s.model_version)
            counter = counters.get(key)
            if counter is None:
                counter = counters[key] = self.metrics.trips_scored.labels(*key)
            counter.inc()
        return scored.scores


def batch_response(scores: list[TripScore]) -> BatchScoreResponse:
    """Scores of a batch with the pings their trips set aside, summed per reason."""
    total: dict[str, int] = {}
    for trip in scores:
        for reason, n in trip.pings_set_aside.items():
            total[reason] = total.get(reason, 0) + n
    return BatchScoreResponse(scores=scores, pings_set_aside=dict(sorted(total.items())))


def trip_records(scores: Sequence[TripScore]) -> pl.DataFrame:
    """Answers as trip score records (what profiles and the monitor's keys need): the
    features, identity, times, probability, score, band and model."""
    rows = [
        {
            **s.features.model_dump(),
            "trip_id": s.trip_id,
            "vehicle_id": s.vehicle_id,
            "driver_id": s.driver_id,
            "fleet_id": s.fleet_id,
            "client_id": s.client_id,
            "start_ts": s.start_ts,
            "end_ts": s.end_ts,
            "risk_probability": s.risk_probability,
            "score": s.score,
            "risk_band": s.risk_band,
            "model_version": s.model_version,
            "model_role": s.model_role,
            "scored_at": s.scored_at,
        }
        for s in scores
    ]
    if not rows:
        return pl.DataFrame()
    frame = pl.from_dicts(rows, infer_schema_length=None)
    utc = pl.Datetime("us", "UTC")
    return frame.with_columns(pl.col("start_ts", "end_ts", "scored_at").cast(utc))


def monitored_records(
    scores: Sequence[TripScore],
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Answers as trip score records for the live monitor, and their pings set aside."""
    quarantined: dict[str, int] = {}
    for s in scores:
        for reason, n in s.pings_set_aside.items():
            quarantined[reason] = quarantined.get(reason, 0) + n
    return trip_records(scores), quarantined
