"""The one scoring path: trips and models in, trip score records and decisions out.

Every path that scores calls this module: ``driverscore score`` (batch), the REST service
(every route and content type), the Kafka stream processor (in process, and through the
service) and the embedded runner. It holds the rules that must never differ between them:

- which trips are valid input (the feature contract, ``domain/feature_contract.py``);
- which model answers a trip and which one scores it alongside (``domain/rollout.py``):
  in ``canary`` and ``shadow`` mode both models score every trip, the one that does not
  answer under role ``shadow``, so the prediction log pairs both scores on the same trips
  whichever path scored them;
- what a trip score record holds (:data:`TRIP_RECORD_SCHEMA`);
- when a trip alerts: its risk probability reaches the answering model card's decision
  threshold (the score that threshold maps to is shown beside it);
- what is set aside instead of scored, with a reason: feature rows that break the
  contract, and model outputs that are not a finite probability (never a band).

Pure: no I/O; the caller brings the clock (``now``) and writes the results.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import polars as pl

from driverscore.domain.feature_contract import FEATURE_CONTRACT, feature_problem
from driverscore.domain.features import FEATURE_SCHEMA, trip_features
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.rollout import RolloutPolicy, decide
from driverscore.domain.scoring import SCORE_RECORD_COLUMNS, ModelCard, TripScorer

__all__ = [
    "ALERT_COLUMN",
    "SET_ASIDE_NON_FINITE",
    "SET_ASIDE_SCHEMA",
    "TRIP_RECORD_SCHEMA",
    "PingScoring",
    "PredictionRecord",
    "PreparedPings",
    "ScoredTrips",
    "ScoringModels",
    "SetAsideTrip",
    "alert_text",
    "new_decision_id",
    "prepare_for_models",
    "score_trip_features",
    "score_trip_pings",
]

_UTC_US: Final = pl.Datetime("us", "UTC")

#: The trip score record: the feature row, then what the scoring model adds.
TRIP_RECORD_SCHEMA: Final[dict[str, pl.DataType]] = {
    **FEATURE_SCHEMA,
    "risk_probability": pl.Float64(),
    "score": pl.Float64(),
    "risk_band": pl.String(),
    "reasons": pl.List(pl.String()),
    "model_name": pl.String(),
    "model_version": pl.String(),
    "model_role": pl.String(),
    "scored_at": _UTC_US,
}
assert tuple(TRIP_RECORD_SCHEMA)[len(FEATURE_SCHEMA) :] == SCORE_RECORD_COLUMNS

#: The alert record is the score record plus this text column.
ALERT_COLUMN: Final = "alert"

#: Reason codes of trips set aside by scoring (pings set aside by cleaning keep theirs).
SET_ASIDE_INVALID: Final = "invalid_features"
SET_ASIDE_NON_FINITE: Final = "non_finite_output"

SET_ASIDE_SCHEMA: Final[dict[str, pl.DataType]] = {
    "vehicle_id": pl.String(),
    "trip_id": pl.String(),
    "reason": pl.String(),
    "detail": pl.String(),
    "model_version": pl.String(),
    "model_role": pl.String(),
}

#: Up to this many rows, validation runs in plain Python.
_SMALL: Final = 8
_FEATURE_NAMES: Final = tuple(FEATURE_SCHEMA)

Columns = dict[str, list[Any]]


@dataclass(frozen=True)
class ScoringModels:
    """The models a trip may be scored with: the champion, and the challenger when set."""

    champion: TripScorer
    challenger: TripScorer | None = None


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """One rollout decision for the prediction log; challenger fields are ``None`` when the
    challenger did not score the trip."""

    decision_id: str
    logged_at: datetime
    trip_id: str | None
    driver_id: str | None
    vehicle_id: str | None
    rollout_mode: str
    answered_by: str
    model_name: str
    champion_version: str | None
    champion_score: float | None
    champion_probability: float | None
    challenger_version: str | None
    challenger_score: float | None
    challenger_probability: float | None


@dataclass(frozen=True, slots=True)
class SetAsideTrip:
    """A trip that was not scored (or, with role ``shadow``, not scored by that model)."""

    row: int
    vehicle_id: str | None
    trip_id: str | None
    reason: str
    detail: str
    model_version: str | None = None
    model_role: str | None = None


def new_decision_id() -> str:
    """``uuid.uuid4().hex`` without the ``UUID`` object: 16 random bytes, version 4 bits."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


def alert_text(probability: float, card: ModelCard) -> str:
    """Why a trip alerts, in words: its risk against the model's decision threshold."""
    threshold = card.decision_threshold
    at = float(card.score_mapping.score([threshold])[0])
    return (
        f"risk {probability:.3f} at or above the model's alert threshold {threshold:.3f} "
        f"(score {at:.1f} or below)"
    )


@dataclass
class ScoredTrips:
    """What scoring a set of trips gives, column-wise so one trip costs little.

    ``records``: one answer record per scored trip (role ``champion`` or ``challenger``),
    in input order, columns of :data:`TRIP_RECORD_SCHEMA`. ``shadow``: the other model's
    records for the same trips when it scored them (role ``shadow``). ``alerts``: answer
    records whose risk reached the threshold, plus an ``alert`` text. ``decisions``: one
    prediction-log record per scored trip, aligned with ``records``. ``rows``: the input
    row of each record. ``set_aside``: trips not scored, with the reason.
    """

    records: Columns
    shadow: Columns
    alerts: Columns
    decisions: list[PredictionRecord]
    rows: list[int]
    set_aside: list[SetAsideTrip] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def records_frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.records, schema=TRIP_RECORD_SCHEMA)

    def shadow_frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.shadow, schema=TRIP_RECORD_SCHEMA)

    def alerts_frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.alerts, schema={**TRIP_RECORD_SCHEMA, ALERT_COLUMN: pl.String()})

    def features_frame(self) -> pl.DataFrame:
        """The feature rows of the scored trips, as the answering model saw them."""
        return pl.DataFrame({k: self.records[k] for k in FEATURE_SCHEMA}, schema=FEATURE_SCHEMA)

    def set_aside_frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            {name: [getattr(s, name) for s in self.set_aside] for name in SET_ASIDE_SCHEMA},
            schema=SET_ASIDE_SCHEMA,
        )

    def record_rows(self) -> Iterator[dict[str, Any]]:
        names = list(self.records)
        for values in zip(*(self.records[n] for n in names), strict=True):
            yield dict(zip(names, values, strict=True))


def _columns(features: pl.DataFrame | Mapping[str, Sequence[Any]]) -> Columns:
    """Feature rows as columns of every :data:`FEATURE_SCHEMA` name (absent ones null)."""
    if isinstance(features, pl.DataFrame):
        height = features.height
        present = features.select(c for c in _FEATURE_NAMES if c in features.columns)
        data: Columns = present.to_dict(as_series=False)
    elif type(features) is dict and tuple(features) == _FEATURE_NAMES:
        # Already whole columns in schema order (what the REST path builds): no copy.
        return features
    else:
        lengths = {len(v) for v in features.values()}
        if len(lengths) > 1:
            raise ValueError("feature columns differ in length")
        height = lengths.pop() if lengths else 0
        data = {k: list(v) for k, v in features.items() if k in FEATURE_SCHEMA}
    for name in _FEATURE_NAMES:
        if name not in data:
            data[name] = [None] * height
    return {name: data[name] for name in _FEATURE_NAMES}


def _height(columns: Columns) -> int:
    return len(columns["vehicle_id"])


def _matrix(columns: Columns, names: Sequence[str]) -> npt.NDArray[np.float64]:
    n = _height(columns)
    if not names:
        return np.empty((n, 0), dtype=np.float64)
    # ``None`` becomes NaN under a float dtype.
    return np.array([columns[name] for name in names], dtype=np.float64).T.reshape(n, len(names))


def _invalid_rows(
    columns: Columns, x: npt.NDArray[np.float64], names: Sequence[str]
) -> dict[int, str]:
    """Rows that break the feature contract (or lack a vehicle), with what is wrong."""
    problems: dict[int, str] = {}
    for i, vehicle in enumerate(columns["vehicle_id"]):
        if vehicle is None or vehicle == "":
            problems[i] = "vehicle_id: missing"
    if x.shape[0] <= _SMALL:
        # A few rows (one REST trip): plain Python costs less than numpy's per-call overhead.
        specs = [FEATURE_CONTRACT.get(name) for name in names]
        for i, row in enumerate(x.tolist()):
            for spec, value in zip(specs, row, strict=True):
                if spec is None or spec.minimum <= value <= spec.maximum:
                    continue  # valid (NaN and infinity fail the comparison, checked below)
                message = feature_problem(spec, value)
                if message is not None and i not in problems:
                    problems[i] = f"{spec.name}: {message}"
        return problems
    for j, name in enumerate(names):
        spec = FEATURE_CONTRACT.get(name)
        if spec is None:
            continue
        column = x[:, j]
        with np.errstate(invalid="ignore"):
            bad = ~(np.isnan(column) | ((column >= spec.minimum) & (column <= spec.maximum)))
        if not spec.nullable:
            bad |= np.isnan(column)
        for i in np.flatnonzero(bad).tolist():
            message = feature_problem(spec, float(column[i]))
            if message is not None and i not in problems:
                problems[i] = f"{name}: {message}"
    return problems


@dataclass(frozen=True)
class _ModelScores:
    probabilities: list[float]
    scores: list[float]
    bands: list[str | None]
    reasons: list[list[str]]


def _score_model(scorer: TripScorer, x: npt.NDArray[np.float64]) -> _ModelScores:
    scored = scorer.score_matrix(np.ascontiguousarray(x.astype(np.float32)))
    return _ModelScores(
        scored.probabilities.tolist(),
        scored.scores.tolist(),
        list(scored.bands),
        scored.reasons,
    )


def _finite_probability(p: float) -> bool:
    return math.isfinite(p) and 0.0 <= p <= 1.0


def score_trip_features(
    features: pl.DataFrame | Mapping[str, Sequence[Any]],
    models: ScoringModels,
    policy: RolloutPolicy,
    now: datetime,
    *,
    challenger_features: pl.DataFrame | Mapping[str, Sequence[Any]] | None = None,
) -> ScoredTrips:
    """Score trip feature rows with the rollout applied: records, decisions, set-asides.

    ``features``: trip feature rows (a frame or columns of :data:`FEATURE_SCHEMA` names;
    identity columns and the model inputs are required, other columns may be absent).
    ``challenger_features``: the same trips, row for row, as the challenger's feature
    configuration computes them, when it differs from the champion's.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    now = now.astimezone(UTC)
    columns = _columns(features)
    n = _height(columns)
    champion, challenger = models.champion, models.challenger
    other_columns = _columns(challenger_features) if challenger_features is not None else columns
    if _height(other_columns) != n:
        raise ValueError("challenger features must hold the same trips as the features")

    decisions = [decide(policy, _driver(columns, i), challenger is not None) for i in range(n)]
    x_champion = _matrix(columns, champion.card.feature_names)
    invalid = _invalid_rows(columns, x_champion, champion.card.feature_names)
    x_challenger: npt.NDArray[np.float64] | None = None
    if challenger is not None and any(d.shadow or d.answered_by == "challenger" for d in decisions):
        x_challenger = _matrix(other_columns, challenger.card.feature_names)
        for i, message in _invalid_rows(
            other_columns, x_challenger, challenger.card.feature_names
        ).items():
            invalid.setdefault(i, message)

    keep = [i for i in range(n) if i not in invalid]
    set_aside = [
        SetAsideTrip(
            i, columns["vehicle_id"][i], columns["trip_id"][i], SET_ASIDE_INVALID, invalid[i]
        )
        for i in sorted(invalid)
    ]
    # Each model scores the rows it answers or shadows, in one batched call.
    champion_rows = [
        i for i in keep if decisions[i].answered_by == "champion" or decisions[i].shadow
    ]
    challenger_rows = [
        i for i in keep if decisions[i].answered_by == "challenger" or decisions[i].shadow
    ]
    by_model: dict[str, dict[int, tuple[float, float, str | None, list[str]]]] = {}
    for role, scorer, x, rows in (
        ("champion", champion, x_champion, champion_rows),
        ("challenger", challenger, x_challenger, challenger_rows),
    ):
        if scorer is None or x is None or not rows:
            by_model[role] = {}
            continue
        scored = _score_model(scorer, x[rows] if len(rows) != n else x)
        by_model[role] = {
            i: (scored.probabilities[k], scored.scores[k], scored.bands[k], scored.reasons[k])
            for k, i in enumerate(rows)
        }

    records = _empty_columns()
    shadow = _empty_columns()
    alerts: Columns = {**_empty_columns(), ALERT_COLUMN: []}
    out_rows: list[int] = []
    logged: list[PredictionRecord] = []
    for i in keep:
        decision = decisions[i]
        answer_role = decision.answered_by
        answer_scorer = champion if answer_role == "champion" else challenger
        assert answer_scorer is not None
        answer = by_model[answer_role].get(i)
        if answer is None or not _finite_probability(answer[0]):
            set_aside.append(
                SetAsideTrip(
                    i,
                    columns["vehicle_id"][i],
                    columns["trip_id"][i],
                    SET_ASIDE_NON_FINITE,
                    f"the model gave risk {answer[0] if answer else None!r}, not a probability",
                    answer_scorer.model_version,
                    decision.role,
                )
            )
            continue
        source = columns if answer_role == "champion" else other_columns
        _append_record(records, source, i, answer, answer_scorer, decision.role, now)
        if answer[0] >= answer_scorer.card.decision_threshold:
            _append_record(alerts, source, i, answer, answer_scorer, decision.role, now)
            alerts[ALERT_COLUMN].append(alert_text(answer[0], answer_scorer.card))
        other_score: tuple[float, float, str | None, list[str]] | None = None
        if decision.shadow:
            other_role = "challenger" if answer_role == "champion" else "champion"
            other_scorer = challenger if other_role == "challenger" else champion
            assert other_scorer is not None
            other_score = by_model[other_role].get(i)
            if other_score is not None and _finite_probability(other_score[0]):
                other_source = columns if other_role == "champion" else other_columns
                _append_record(shadow, other_source, i, other_score, other_scorer, "shadow", now)
            else:
                set_aside.append(
                    SetAsideTrip(
                        i,
                        columns["vehicle_id"][i],
                        columns["trip_id"][i],
                        SET_ASIDE_NON_FINITE,
                        "the shadow model gave no probability; the trip is logged without it",
                        other_scorer.model_version,
                        "shadow",
                    )
                )
                other_score = None
        champion_score = answer if answer_role == "champion" else other_score
        challenger_score = answer if answer_role == "challenger" else other_score
        logged.append(
            PredictionRecord(
                decision_id=new_decision_id(),
                logged_at=now,
                trip_id=columns["trip_id"][i],
                driver_id=columns["driver_id"][i],
                vehicle_id=columns["vehicle_id"][i],
                rollout_mode=policy.mode,
                answered_by=answer_role,
                model_name=champion.model_name,
                champion_version=champion.model_version,
                champion_score=champion_score[1] if champion_score else None,
                champion_probability=champion_score[0] if champion_score else None,
                challenger_version=(
                    challenger.model_version
                    if challenger is not None and challenger_score is not None
                    else None
                ),
                challenger_score=challenger_score[1] if challenger_score else None,
                challenger_probability=challenger_score[0] if challenger_score else None,
            )
        )
        out_rows.append(i)
    return ScoredTrips(records, shadow, alerts, logged, out_rows, set_aside)


def _driver(columns: Columns, i: int) -> str:
    driver = columns["driver_id"][i]
    return str(driver if driver is not None else columns["vehicle_id"][i])


def _empty_columns() -> Columns:
    return {name: [] for name in TRIP_RECORD_SCHEMA}


def _append_record(
    out: Columns,
    source: Columns,
    i: int,
    scored: tuple[float, float, str | None, list[str]],
    scorer: TripScorer,
    role: str,
    now: datetime,
) -> None:
    for name in _FEATURE_NAMES:
        out[name].append(source[name][i])
    probability, score, band, reasons = scored
    out["risk_probability"].append(probability)
    out["score"].append(score)
    out["risk_band"].append(band)
    out["reasons"].append(reasons)
    out["model_name"].append(scorer.model_name)
    out["model_version"].append(scorer.model_version)
    out["model_role"].append(role)
    out["scored_at"].append(now)


@dataclass(frozen=True)
class PreparedPings:
    """Pings made into trips for scoring: what :func:`prepare_for_models` returns."""

    #: Trip feature rows as the champion's configuration computes them (every kept trip).
    features: pl.DataFrame
    #: The same trips, row for row, with the challenger's feature configuration, when it
    #: differs from the champion's and the challenger may score; else ``None``.
    challenger_features: pl.DataFrame | None
    #: Pings set aside by cleaning and trip cutting, with ``reason`` and ``stage``.
    quarantine: pl.DataFrame
    #: Preparation counts (``rows_in``, ``kept``, ``quarantined``, one per reason, ``trips``).
    counts: dict[str, int]
    #: The kept (cleaned) pings with their ``trip_id``: where the trips' routes come from.
    pings: pl.DataFrame = field(default_factory=pl.DataFrame)


def prepare_for_models(
    pings: pl.DataFrame,
    models: ScoringModels,
    policy: RolloutPolicy,
    now: datetime,
    *,
    events: bool = False,
) -> PreparedPings:
    """Clean, cut and featurise canonical pings for the models of a rollout (``events``:
    the kept pings carry the champion configuration's event flags, for routes).

    Trips are cut once, with the champion card's cleaning and trip configurations, so both
    models of a rollout score the same trips and the prediction log pairs them; each model
    gets the features its own card's feature configuration computes from those trips.
    """
    card = models.champion.card
    prepared = prepare_trips(
        pings, card.cleaning_config, card.trip_config, card.feature_config, now, events=events
    )
    challenger_features: pl.DataFrame | None = None
    challenger = models.challenger
    if (
        challenger is not None
        and policy.mode != "champion"
        and challenger.card.feature_config != card.feature_config
        and prepared.features.height
    ):
        other = trip_features(prepared.pings, challenger.card.feature_config)
        challenger_features = prepared.features.select("vehicle_id", "trip_id").join(
            other, on=["vehicle_id", "trip_id"], how="left", maintain_order="left"
        )
    return PreparedPings(
        prepared.features,
        challenger_features,
        prepared.quarantine,
        prepared.counts,
        prepared.pings,
    )


@dataclass(frozen=True)
class PingScoring:
    """Pings scored: the trips' results plus what preparation set aside."""

    scored: ScoredTrips
    #: Trip feature rows as the champion's configuration computes them (every kept trip).
    features: pl.DataFrame
    #: Pings set aside by cleaning and trip cutting, with ``reason`` and ``stage``.
    quarantine: pl.DataFrame
    #: Preparation counts (``rows_in``, ``kept``, ``quarantined``, one per reason, ``trips``).
    counts: dict[str, int]
    #: The kept (cleaned) pings with their ``trip_id`` and event flags
    #: (``features.EVENT_COLUMNS``): where the trips' routes come from.
    pings: pl.DataFrame = field(default_factory=pl.DataFrame)


def score_trip_pings(
    pings: pl.DataFrame, models: ScoringModels, policy: RolloutPolicy, now: datetime
) -> PingScoring:
    """:func:`prepare_for_models` (with the event flags its routes are drawn with), then
    :func:`score_trip_features` on its trips."""
    prepared = prepare_for_models(pings, models, policy, now, events=True)
    scored = score_trip_features(
        prepared.features,
        models,
        policy,
        now,
        challenger_features=prepared.challenger_features,
    )
    return PingScoring(
        scored, prepared.features, prepared.quarantine, prepared.counts, prepared.pings
    )
