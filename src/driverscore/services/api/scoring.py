"""From posted trips to trip score records: the one scoring path of every route.

Posted pings become canonical pings and are prepared with the configurations stored in
the models' cards (``domain.trip_scoring.prepare_for_models``); posted features are
the model's numbers already. Either way the trips go through
``domain.trip_scoring.score_trip_features``, as in batch and in the stream: the same
validation, rollout, records, decisions and set-aside reasons. This module only turns
requests into feature columns and the domain's records into response bodies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import polars as pl

from driverscore.domain.features import FEATURE_SCHEMA
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.schema import conform_pings
from driverscore.domain.scoring import ModelCard
from driverscore.domain.trip_scoring import (
    SET_ASIDE_NON_FINITE,
    PredictionRecord,
    ScoredTrips,
    ScoringModels,
    prepare_for_models,
    score_trip_features,
    score_trip_pings,
)
from driverscore.services.api.holder import LoadedModels
from driverscore.services.api.schemas import FieldProblem, TripFeaturesOut, TripIn, TripScore

__all__ = [
    "InvalidTripsError",
    "RequestLimits",
    "ScoredBatch",
    "score_posted_pings",
    "score_posted_trips",
    "trip_problems",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_PROBLEMS: Final = 20
_IDENTITY: Final = ("trip_id", "vehicle_id", "driver_id", "fleet_id", "client_id")
_FEATURE_OUT: Final = tuple(TripFeaturesOut.model_fields)


class InvalidTripsError(Exception):
    """Posted trips that cannot be scored, with the fields to blame (a 422)."""

    def __init__(
        self, problems: list[FieldProblem], set_aside_reasons: list[str] | None = None
    ) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = problems
        #: Reasons of trips the scoring path set aside (counted in a metric by the caller).
        self.set_aside_reasons = set_aside_reasons or []


@dataclass(frozen=True)
class RequestLimits:
    max_pings: int
    max_future_s: float


@dataclass(frozen=True)
class ScoredBatch:
    """Answers in posted order, the prediction-log decisions, and what was set aside."""

    scores: list[TripScore]
    records: list[PredictionRecord]
    #: Pings set aside by cleaning and trip cutting, per reason (posted pings only).
    pings_set_aside: dict[str, int]


def _ts(value: datetime | int) -> datetime:
    if isinstance(value, int):
        return _EPOCH + timedelta(milliseconds=value)
    return value.astimezone(UTC)


def trip_problems(
    trip: TripIn, where: str, limits: RequestLimits, now: datetime
) -> list[FieldProblem]:
    """Checks that need the limits or the clock: ping count, time order, future times."""
    if trip.pings is None:
        return []
    problems: list[FieldProblem] = []
    if len(trip.pings) > limits.max_pings:
        return [
            FieldProblem(
                field=f"{where}pings",
                message=f"{len(trip.pings)} pings; at most {limits.max_pings} per trip",
            )
        ]
    latest = now + timedelta(seconds=limits.max_future_s)
    previous: datetime | None = None
    for i, ping in enumerate(trip.pings):
        ts = _ts(ping.ts)
        if ts > latest:
            problems.append(
                FieldProblem(
                    field=f"{where}pings.{i}.ts",
                    message=f"{ts.isoformat()} is in the future (server time {now.isoformat()})",
                )
            )
        elif previous is not None and ts < previous:
            problems.append(
                FieldProblem(
                    field=f"{where}pings.{i}.ts",
                    message=(
                        f"{ts.isoformat()} is earlier than the previous ping "
                        f"({previous.isoformat()}); pings must be in time order"
                    ),
                )
            )
        previous = ts if previous is None else max(previous, ts)
        if len(problems) >= _MAX_PROBLEMS:
            break
    return problems


def _pings_frame(trip: TripIn) -> pl.DataFrame:
    assert trip.pings is not None
    n = len(trip.pings)
    columns: dict[str, Any] = {
        "ts": pl.Series([_ts(p.ts) for p in trip.pings], dtype=pl.Datetime("us", "UTC")),
        "lat": [p.lat for p in trip.pings],
        "lon": [p.lon for p in trip.pings],
        "speed_mps": [p.speed_mps for p in trip.pings],
        "heading_deg": [p.heading_deg for p in trip.pings],
        "accel_long_mps2": [p.accel_long_mps2 for p in trip.pings],
        "accel_lat_mps2": [p.accel_lat_mps2 for p in trip.pings],
        "speed_limit_mps": [p.speed_limit_mps for p in trip.pings],
    }
    for name in _IDENTITY:
        columns[name] = [getattr(trip, name)] * n
    frame = pl.DataFrame(
        columns, schema_overrides={k: pl.Float64 for k in columns if k not in ("ts", *_IDENTITY)}
    )
    return conform_pings(frame)


_NOT_SET_ASIDE: Final = frozenset(("rows_in", "kept", "quarantined", "trips", "reordered"))


def _set_aside_counts(counts: dict[str, int]) -> dict[str, int]:
    """Quarantine reasons with their ping counts, from ``prepare_trips`` counts."""
    return {
        k: v for k, v in sorted(counts.items()) if "." not in k and v and k not in _NOT_SET_ASIDE
    }


def _no_trip_message(counts: dict[str, int], card: ModelCard) -> str:
    set_aside = ", ".join(f"{k}: {v}" for k, v in _set_aside_counts(counts).items()) or "none"
    tc = card.trip_config
    return (
        f"no trip left to score: {counts['rows_in']} pings posted, set aside by cleaning "
        f"or as too short ({set_aside}); a trip needs at least {tc.min_pings} valid pings, "
        f"{tc.min_duration_s:g} s and {tc.min_distance_km:g} km"
    )


@dataclass
class _Prepared:
    """Feature columns of the posted trips, one row per trip, in posted order."""

    features: dict[str, list[Any]]
    challenger: dict[str, list[Any]] | None
    pings_set_aside: list[dict[str, int]]


def _append_row(out: dict[str, list[Any]], row: dict[str, Any]) -> None:
    for name in FEATURE_SCHEMA:
        out[name].append(row.get(name))


def _prepare(
    trips: list[TripIn],
    wheres: list[str],
    models: ScoringModels,
    policy: RolloutPolicy,
    now: datetime,
) -> _Prepared:
    if len(trips) == 1 and trips[0].features is not None:
        # The service's hot path (one feature trip per request): one row, built at once.
        row = _feature_identity(trips[0])
        return _Prepared({name: [row.get(name)] for name in FEATURE_SCHEMA}, None, [{}])
    features: dict[str, list[Any]] = {name: [] for name in FEATURE_SCHEMA}
    challenger: dict[str, list[Any]] | None = None
    set_aside: list[dict[str, int]] = []
    problems: list[FieldProblem] = []
    for trip, where in zip(trips, wheres, strict=True):
        if trip.features is not None:
            row = _feature_identity(trip)
            _append_row(features, row)
            if challenger is not None:
                _append_row(challenger, row)
            set_aside.append({})
            continue
        prepared = prepare_for_models(_pings_frame(trip), models, policy, now)
        height = prepared.features.height
        if height != 1:
            message = (
                _no_trip_message(prepared.counts, models.champion.card)
                if height == 0
                else (
                    f"the pings form {height} trips (a silence longer than "
                    f"{models.champion.card.trip_config.gap_s:g} s ends a trip); post each "
                    "trip on its own"
                )
            )
            problems.append(FieldProblem(field=f"{where}pings", message=message))
            continue
        (row,) = prepared.features.to_dicts()
        _append_row(features, row)
        if prepared.challenger_features is not None:
            if challenger is None:
                # Rows so far are posted features or the same trips: the same numbers.
                challenger = {k: v[:-1] for k, v in features.items()}
            (other,) = prepared.challenger_features.to_dicts()
            _append_row(challenger, other)
        elif challenger is not None:
            _append_row(challenger, row)
        set_aside.append(_set_aside_counts(prepared.counts))
    if problems:
        raise InvalidTripsError(problems)
    return _Prepared(features, challenger, set_aside)


def _feature_identity(trip: TripIn) -> dict[str, Any]:
    """A posted feature trip as a feature row (counts and other outputs null)."""
    assert trip.features is not None
    row: dict[str, Any] = {name: getattr(trip, name) for name in _IDENTITY}
    row.update(trip.features.model_dump())
    for name in ("start_ts", "end_ts"):
        if row[name] is not None:
            row[name] = row[name].astimezone(UTC)
    return row


def _refused(scored: ScoredTrips, wheres: list[str]) -> None:
    """A trip the answering model could not score is a clear error, never a made-up score."""
    refused = [s for s in scored.set_aside if s.model_role != "shadow"]
    problems = [
        FieldProblem(
            field=f"{wheres[s.row]}features",
            message=(
                f"not scored ({s.reason}): {s.detail}"
                if s.reason != SET_ASIDE_NON_FINITE
                else f"not scored: model {s.model_version} gave no finite risk for this trip "
                f"({s.detail})"
            ),
        )
        for s in refused
    ]
    if problems:
        raise InvalidTripsError(problems, [s.reason for s in refused])


def _to_scores(scored: ScoredTrips, pings_set_aside: list[dict[str, int]]) -> list[TripScore]:
    rec = scored.records
    out: list[TripScore] = []
    for k, decision in enumerate(scored.decisions):
        out.append(
            TripScore(
                trip_id=rec["trip_id"][k],
                vehicle_id=rec["vehicle_id"][k],
                driver_id=rec["driver_id"][k],
                fleet_id=rec["fleet_id"][k],
                client_id=rec["client_id"][k],
                start_ts=rec["start_ts"][k],
                end_ts=rec["end_ts"][k],
                features=TripFeaturesOut(**{f: rec[f][k] for f in _FEATURE_OUT}),
                risk_probability=rec["risk_probability"][k],
                score=rec["score"][k],
                risk_band=rec["risk_band"][k],
                reasons=rec["reasons"][k],
                model_name=rec["model_name"][k],
                model_version=rec["model_version"][k],
                model_role=rec["model_role"][k],
                scored_at=rec["scored_at"][k],
                decision_id=decision.decision_id,
                pings_set_aside=pings_set_aside[scored.rows[k]],
            )
        )
    return out


def score_posted_trips(
    trips: list[TripIn],
    wheres: list[str],
    models: LoadedModels,
    policy: RolloutPolicy,
    now: datetime,
) -> ScoredBatch:
    """Score posted trips on the one scoring path; one prediction-log record per trip.

    Every trip is answered (in posted order) or the request is refused with the fields to
    blame: a trip the model cannot score is never answered with a made-up score.
    """
    scoring = ScoringModels(models.champion, models.challenger)
    prepared = _prepare(trips, wheres, scoring, policy, now)
    scored = score_trip_features(
        prepared.features, scoring, policy, now, challenger_features=prepared.challenger
    )
    _refused(scored, wheres)
    return ScoredBatch(
        scores=_to_scores(scored, prepared.pings_set_aside),
        records=scored.decisions,
        pings_set_aside=_merged(prepared.pings_set_aside),
    )


def score_posted_pings(
    pings: pl.DataFrame, models: LoadedModels, policy: RolloutPolicy, now: datetime
) -> ScoredBatch:
    """Score canonical pings of any number of trips (``/invocations`` CSV of pings).

    Trips are cut as in batch; a request whose pings all end up set aside is refused with
    the counts per reason, as a JSON trip of pings is.
    """
    scoring = ScoringModels(models.champion, models.challenger)
    result = score_trip_pings(pings, scoring, policy, now)
    counts = _set_aside_counts(result.counts)
    if result.features.height == 0:
        raise InvalidTripsError(
            [
                FieldProblem(
                    field="(body)", message=_no_trip_message(result.counts, models.champion.card)
                )
            ]
        )
    wheres = [
        f"rows of trip {v}/{t}: "
        for v, t in zip(
            result.features["vehicle_id"].to_list(),
            result.features["trip_id"].to_list(),
            strict=True,
        )
    ]
    _refused(result.scored, wheres)
    per_trip: list[dict[str, int]] = [{} for _ in range(result.features.height)]
    return ScoredBatch(
        scores=_to_scores(result.scored, per_trip),
        records=result.scored.decisions,
        pings_set_aside=counts,
    )


def _merged(per_trip: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in per_trip:
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))
