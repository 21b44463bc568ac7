"""From posted trips to trip score records: the same prepare and score code as batch.

Posted pings become canonical pings and go through ``prepare_trips`` with the cleaning,
trip and feature settings stored in the scoring model's card, then ``TripScorer``; posted
features go straight to the scorer. The rollout rules decide which model answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import numpy as np
import polars as pl

from driverscore.adapters.prediction_log import PredictionRecord
from driverscore.domain.features import FEATURE_SCHEMA
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.rollout import RolloutDecision, RolloutPolicy, decide
from driverscore.domain.schema import conform_pings
from driverscore.domain.scoring import ModelCard, TripScorer
from driverscore.services.api.holder import LoadedModels
from driverscore.services.api.schemas import FieldProblem, TripFeaturesOut, TripIn, TripScore

__all__ = [
    "InvalidTripsError",
    "RequestLimits",
    "ScoredBatch",
    "score_posted_trips",
    "trip_problems",
]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_PROBLEMS: Final = 20
_IDENTITY: Final = ("trip_id", "vehicle_id", "driver_id", "fleet_id", "client_id")
_FEATURE_OUT: Final = tuple(TripFeaturesOut.model_fields)


class InvalidTripsError(Exception):
    """Posted trips that cannot be scored, with the fields to blame (a 422)."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class RequestLimits:
    max_pings: int
    max_future_s: float


@dataclass(frozen=True)
class ScoredBatch:
    scores: list[TripScore]
    records: list[PredictionRecord]


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


def _prepared_row(trip: TripIn, where: str, card: ModelCard, now: datetime) -> pl.DataFrame:
    prepared = prepare_trips(
        _pings_frame(trip), card.cleaning_config, card.trip_config, card.feature_config, now
    )
    rows = prepared.features
    if rows.height == 1:
        return rows
    counts = prepared.counts
    if rows.height == 0:
        reasons = {
            k: v
            for k, v in counts.items()
            if "." not in k
            and v
            and k not in ("rows_in", "kept", "quarantined", "trips", "reordered")
        }
        set_aside = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "none"
        tc = card.trip_config
        message = (
            f"no trip left to score: {counts['rows_in']} pings posted, set aside by cleaning "
            f"or as too short ({set_aside}); a trip needs at least {tc.min_pings} valid pings, "
            f"{tc.min_duration_s:g} s and {tc.min_distance_km:g} km"
        )
    else:
        message = (
            f"the pings form {rows.height} trips (a silence longer than "
            f"{card.trip_config.gap_s:g} s ends a trip); post each trip on its own"
        )
    raise InvalidTripsError([FieldProblem(field=f"{where}pings", message=message)])


def _features_row(trip: TripIn) -> pl.DataFrame:
    assert trip.features is not None
    values: dict[str, Any] = {name: [getattr(trip, name)] for name in _IDENTITY}
    values.update({k: [v] for k, v in trip.features.model_dump().items()})
    schema = {k: FEATURE_SCHEMA[k] for k in values}
    return pl.DataFrame(values, schema=schema)


def _feature_rows(
    trips: list[TripIn], wheres: list[str], card: ModelCard, now: datetime
) -> pl.DataFrame:
    rows: list[pl.DataFrame] = []
    problems: list[FieldProblem] = []
    for trip, where in zip(trips, wheres, strict=True):
        try:
            row = (
                _prepared_row(trip, where, card, now)
                if trip.pings is not None
                else (_features_row(trip))
            )
        except InvalidTripsError as exc:
            problems.extend(exc.problems)
            continue
        rows.append(row)
    if problems:
        raise InvalidTripsError(problems)
    frame = pl.concat(rows, how="diagonal_relaxed")
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in FEATURE_SCHEMA.items() if c not in frame]
    return frame.with_columns(missing) if missing else frame


def _feature_identity(trip: TripIn) -> dict[str, Any]:
    """A posted feature trip as the row ``_features_row`` would make of it."""
    assert trip.features is not None
    row: dict[str, Any] = {name: getattr(trip, name) for name in _IDENTITY}
    row.update(trip.features.model_dump())
    for name in ("start_ts", "end_ts"):
        if row[name] is not None:
            row[name] = row[name].astimezone(UTC)
    return row


def _score_identities(
    scorer: TripScorer, rows: list[dict[str, Any]], now: datetime
) -> list[dict[str, Any]]:
    names = scorer.card.feature_names
    nan = float("nan")
    x = np.array(
        [[nan if (v := row.get(n)) is None else v for n in names] for row in rows],
        dtype=np.float32,
    ).reshape(len(rows), len(names))
    scored = scorer.score_matrix(x)
    constant = {
        "model_name": scorer.model_name,
        "model_version": scorer.model_version,
        "model_role": scorer.model_role,
        "scored_at": now,
    }
    return [
        {
            **row,
            "risk_probability": float(scored.probabilities[i]),
            "score": float(scored.scores[i]),
            "risk_band": scored.bands[i],
            "reasons": scored.reasons[i],
            **constant,
        }
        for i, row in enumerate(rows)
    ]


def _decision_id() -> str:
    """``uuid.uuid4().hex`` without the ``UUID`` object: 16 random bytes, version 4 bits."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


def _same_preparation(a: ModelCard, b: ModelCard) -> bool:
    return (a.cleaning_config, a.trip_config, a.feature_config) == (
        b.cleaning_config,
        b.trip_config,
        b.feature_config,
    )


def _to_record(row: dict[str, Any], decision_id: str) -> TripScore:
    return TripScore(
        trip_id=row["trip_id"],
        vehicle_id=row["vehicle_id"],
        driver_id=row["driver_id"],
        fleet_id=row["fleet_id"],
        client_id=row["client_id"],
        start_ts=row["start_ts"],
        end_ts=row["end_ts"],
        features=TripFeaturesOut(**{k: row.get(k) for k in _FEATURE_OUT}),
        risk_probability=row["risk_probability"],
        score=row["score"],
        risk_band=row["risk_band"],
        reasons=list(row["reasons"] or []),
        model_name=row["model_name"],
        model_version=row["model_version"],
        model_role=row["model_role"],
        scored_at=row["scored_at"],
        decision_id=decision_id,
    )


def score_posted_trips(
    trips: list[TripIn],
    wheres: list[str],
    models: LoadedModels,
    policy: RolloutPolicy,
    now: datetime,
) -> ScoredBatch:
    """Score trips with the rollout applied; one prediction-log record per trip.

    When a challenger is loaded and the mode is ``canary`` or ``shadow``, both models score
    every trip, so the log pairs both scores whichever model answered.
    """
    champion = models.champion
    decisions: list[RolloutDecision] = [
        decide(policy, t.driver_id or t.vehicle_id, models.challenger is not None) for t in trips
    ]
    other: TripScorer | None = None
    if models.challenger is not None and policy.mode == "canary":
        other = models.challenger
    elif models.shadow is not None and policy.mode == "shadow":
        other = models.shadow
    champion_scores: list[dict[str, Any]]
    other_scores: list[dict[str, Any]] | None = None
    if all(t.features is not None for t in trips):
        # Posted features are already the model's numbers: no frame to build. The scorer is
        # the same (``score_matrix`` is what ``score_trips`` runs); only the wrapping differs.
        identities = [_feature_identity(t) for t in trips]
        champion_scores = _score_identities(champion, identities, now)
        if other is not None:
            other_scores = _score_identities(other, identities, now)
    else:
        champion_rows = _feature_rows(trips, wheres, champion.card, now)
        champion_scores = champion.score_trips(champion_rows, now).to_dicts()
        if other is not None:
            other_rows = (
                champion_rows
                if _same_preparation(champion.card, other.card)
                else _feature_rows(trips, wheres, other.card, now)
            )
            other_scores = other.score_trips(other_rows, now).to_dicts()

    scores: list[TripScore] = []
    records: list[PredictionRecord] = []
    for i, decision in enumerate(decisions):
        decision_id = _decision_id()
        mine = champion_scores[i]
        theirs = other_scores[i] if other_scores is not None else None
        answer = theirs if decision.answered_by == "challenger" and theirs is not None else mine
        scores.append(_to_record(answer, decision_id))
        records.append(
            PredictionRecord(
                decision_id=decision_id,
                logged_at=now,
                trip_id=answer["trip_id"],
                driver_id=answer["driver_id"],
                vehicle_id=answer["vehicle_id"],
                rollout_mode=policy.mode,
                answered_by=decision.answered_by,
                model_name=champion.model_name,
                champion_version=champion.model_version,
                champion_score=mine["score"],
                champion_probability=mine["risk_probability"],
                challenger_version=theirs["model_version"] if theirs else None,
                challenger_score=theirs["score"] if theirs else None,
                challenger_probability=theirs["risk_probability"] if theirs else None,
            )
        )
    return ScoredBatch(scores=scores, records=records)
