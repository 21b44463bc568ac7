"""From a calibrated risk probability to the Driver Score, its risk band and reason codes.

Everything here is pure (numpy, polars, pydantic): the batch scorer, the stream processor
and the REST service all call :class:`TripScorer` with whatever ``predict_proba`` their
engine provides (an onnxruntime session on the serving path, the sklearn estimator in
training). What training learned - the score mapping, band cutoffs, decision threshold and
reference statistics - travels in the :class:`ModelCard`, never recomputed online.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from driverscore.domain.config import (
    LEGACY_FEATURE_RULES,
    CleaningConfig,
    FeatureConfig,
    TripConfig,
)
from driverscore.errors import InputDataError

__all__ = [
    "BAND_FLOORS",
    "CARD_SCHEMA_VERSION",
    "DEFAULT_BAND_LIMITS",
    "REASON_TEMPLATES",
    "SCORE_RECORD_COLUMNS",
    "SOFT_TAIL_POINTS",
    "BandLimit",
    "FeatureReference",
    "MatrixScores",
    "ModelCard",
    "ModelFeature",
    "ReasonTemplate",
    "RiskBand",
    "ScoreForm",
    "ScoreMapping",
    "TripScorer",
    "aggregate_scores",
    "band_for_score",
    "feature_matrix",
]

#: Schema 2 added the rule choices of ``FeatureConfig`` (cornering, limit window) and the
#: form of the score mapping; a card of schema 1 is read with the rules it was made with.
CARD_SCHEMA_VERSION: Final = "2"

RiskBand = Literal["low", "moderate", "elevated", "high"]

#: Lowest score of each band, best band first; anything below the last floor is ``high``.
BAND_FLOORS: Final[tuple[tuple[RiskBand, float], ...]] = (
    ("low", 90.0),
    ("moderate", 75.0),
    ("elevated", 60.0),
)

#: Columns a scorer appends to the trip feature row, in order.
SCORE_RECORD_COLUMNS: Final = (
    "risk_probability",
    "score",
    "risk_band",
    "reasons",
    "model_name",
    "model_version",
    "model_role",
    "scored_at",
)

# Probabilities are clipped away from 0 and 1 so the log-odds stay finite.
_PROB_EPS: Final = 1e-6
_QUANTILE_LEVELS: Final = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)


class ReasonTemplate(BaseModel):
    """How a behaviour is named in a reason code."""

    model_config = ConfigDict(frozen=True)

    label: str
    unit: str
    #: Multiplier from the feature's unit to the displayed unit (100 for shares shown in %).
    scale: float = 1.0
    decimals: int = 1

    def render(self, value: float, typical: float) -> str:
        fmt = f"{{:.{self.decimals}f}}"
        shown = fmt.format(value * self.scale)
        usual = fmt.format(typical * self.scale)
        sep = "" if self.unit.startswith("%") else " "
        typical_unit = "%" if self.unit.startswith("%") else ""
        return f"{self.label}: {shown}{sep}{self.unit} (typical {usual}{typical_unit})"


#: Behaviours that may appear as reasons. Exposure (``distance_km``) raises risk too but is
#: not a behaviour a driver can change on a trip, so it never becomes a reason.
REASON_TEMPLATES: Final[dict[str, ReasonTemplate]] = {
    "hard_brake_per_100km": ReasonTemplate(label="Hard braking", unit="events per 100 km"),
    "harsh_accel_per_100km": ReasonTemplate(label="Harsh acceleration", unit="events per 100 km"),
    "harsh_corner_per_100km": ReasonTemplate(label="Harsh cornering", unit="events per 100 km"),
    "speeding_share": ReasonTemplate(
        label="Speeding", unit="% of moving time over the limit", scale=100.0, decimals=0
    ),
    "speeding_moderate_share": ReasonTemplate(
        label="Speeding by 10+ km/h", unit="% of moving time", scale=100.0, decimals=0
    ),
    "speeding_severe_share": ReasonTemplate(
        label="Speeding by 20+ km/h", unit="% of moving time", scale=100.0, decimals=0
    ),
    "night_share": ReasonTemplate(
        label="Night driving", unit="% of trip time", scale=100.0, decimals=0
    ),
    "speed_std_kmh": ReasonTemplate(label="Speed variability", unit="km/h standard deviation"),
    "jerk_rms_mps3": ReasonTemplate(label="Jerky driving", unit="m/s³ RMS jerk", decimals=2),
}


def band_for_score(score: float) -> RiskBand:
    """Risk band: ``low`` ≥ 90, ``moderate`` ≥ 75, ``elevated`` ≥ 60, else ``high``."""
    for band, floor in BAND_FLOORS:
        if score >= floor:
            return band
    return "high"


_FLOORS_ASCENDING: Final = np.array([floor for _band, floor in reversed(BAND_FLOORS)])
_BANDS_ASCENDING: Final = np.array(["high", *(band for band, _floor in reversed(BAND_FLOORS))])
_FLOORS_LIST: Final[list[float]] = _FLOORS_ASCENDING.tolist()
_BANDS_LIST: Final[list[RiskBand]] = ["high", *(band for band, _floor in reversed(BAND_FLOORS))]


def _band_expr(score: pl.Expr) -> pl.Expr:
    expr: Any = pl.when(score >= BAND_FLOORS[0][1]).then(pl.lit(BAND_FLOORS[0][0]))
    for band, floor in BAND_FLOORS[1:]:
        expr = expr.when(score >= floor).then(pl.lit(band))
    result: pl.Expr = expr.otherwise(pl.lit("high"))
    return result


def _logit(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    q = np.clip(np.asarray(p, dtype=np.float64), _PROB_EPS, 1.0 - _PROB_EPS)
    return np.asarray(np.log(q) - np.log1p(-q), dtype=np.float64)


ScoreForm = Literal["soft_tails", "clipped_linear"]

#: Points at each end of the scale where a ``soft_tails`` mapping bends: the score is the
#: linear map between 10 and 90, so every band floor (60, 75, 90) lies on the linear part.
SOFT_TAIL_POINTS: Final = 10.0


class ScoreMapping(BaseModel):
    """Monotone decreasing map from risk probability to a 0-100 score (higher is safer).

    ``z = intercept - slope * logit(p)`` with ``slope > 0`` is the linear score: one
    log-odds unit of risk is worth the same number of points everywhere.

    - ``soft_tails`` (cards of schema 2): the score is ``z`` between ``g`` and ``100 - g``
      (``g`` = :data:`SOFT_TAIL_POINTS`), and beyond them it approaches the ends without
      reaching them: ``100 - g² / (z - 100 + 2g)`` above, ``g² / (2g - z)`` below
      (continuous with the linear part, and with its slope). Bounded without clipping, so
      distinct risks get distinct scores and the safest trips keep their ranking instead
      of meeting at 100; bands are those of the linear score.
    - ``clipped_linear`` (cards of schema 1): ``score = clip(z, 0, 100)``, with probabilities
      clipped to [1e-6, 1 - 1e-6]; the ends saturate.

    Either is fitted so that the median training trip scores ``anchor_median_score`` and the
    trip at ``anchor_tail_quantile`` of training risk scores ``anchor_tail_score``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    form: ScoreForm = "soft_tails"
    intercept: float
    slope: float = Field(gt=0)
    anchor_median_score: float = 85.0
    anchor_tail_score: float = 45.0
    anchor_tail_quantile: float = 0.99
    #: Probability at which the score reaches each band floor (risk above it falls below).
    band_probability_cutoffs: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        probabilities: npt.ArrayLike,
        median_score: float = 85.0,
        tail_score: float = 45.0,
        tail_quantile: float = 0.99,
        form: ScoreForm = "soft_tails",
    ) -> ScoreMapping:
        """Anchor the mapping on training-set probabilities."""
        p = np.asarray(probabilities, dtype=np.float64)
        p = p[np.isfinite(p)]
        if p.size == 0:
            raise ValueError("cannot fit a score mapping without probabilities")
        if not median_score > tail_score:
            raise ValueError("the median trip must score higher than the risky tail")
        lo, hi = _logit(np.quantile(p, [0.5, tail_quantile]))
        spread = float(hi - lo)
        # A model that gives (nearly) every trip the same risk has no tail to anchor on;
        # fall back to a fixed spread of one log-odds unit rather than an infinite slope.
        if spread < 1e-3:
            spread = 1.0
        slope = (median_score - tail_score) / spread
        intercept = median_score + slope * float(lo)
        cutoffs: dict[str, float] = {
            band: float(1.0 / (1.0 + math.exp(-(intercept - floor) / slope)))
            for band, floor in BAND_FLOORS
        }
        return cls(
            form=form,
            intercept=intercept,
            slope=slope,
            anchor_median_score=median_score,
            anchor_tail_score=tail_score,
            anchor_tail_quantile=tail_quantile,
            band_probability_cutoffs=cutoffs,
        )

    def score(self, probabilities: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Scores 0-100 for an array of probabilities."""
        if self.form == "soft_tails":
            z = self.intercept - self.slope * _logit_unclipped(probabilities)
            return _soft_tails(z)
        raw = self.intercept - self.slope * _logit(probabilities)
        return np.clip(raw, 0.0, 100.0)


def _soft_tails(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    g = SOFT_TAIL_POINTS
    score = np.array(z, dtype=np.float64)
    high = z > 100.0 - g  # NaN compares false and stays NaN
    low = z < g
    # Hyperbolic, not exponential: the gap to the end shrinks as 1 / z, so even a trip a
    # hundred log-odds units safer than another still scores below 100 and above it.
    score[high] = 100.0 - g * g / (z[high] - (100.0 - g) + g)
    score[low] = g * g / (2.0 * g - z[low])
    return score


def _logit_unclipped(p: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """log(p / (1 - p)), ±inf at 0 and 1: the soft tails take those to 100 and 0."""
    q = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.asarray(np.log(q) - np.log1p(-q), dtype=np.float64)


class ModelFeature(BaseModel):
    """One model input: its column name and monotone direction (+1: risk never falls)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    direction: Literal[-1, 0, 1]


class FeatureReference(BaseModel):
    """Training distribution of one feature: median for reason codes, the rest for drift."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    count: int
    null_share: float
    mean: float | None
    std: float | None
    median: float | None
    quantiles: dict[str, float] = Field(
        default_factory=dict, description="Quantile level (as text, e.g. '0.95') to value."
    )
    #: Histogram over training values: ``len(bin_edges) == len(bin_shares) + 1``; the outer
    #: edges are the observed min and max (drift monitoring treats them as open).
    bin_edges: list[float] = Field(default_factory=list)
    bin_shares: list[float] = Field(default_factory=list)

    @classmethod
    def from_values(cls, values: npt.ArrayLike, bins: int = 10) -> FeatureReference:
        x = np.asarray(values, dtype=np.float64)
        n = int(x.size)
        finite = x[np.isfinite(x)]
        null_share = float(1.0 - finite.size / n) if n else 0.0
        if finite.size == 0:
            return cls(count=n, null_share=null_share, mean=None, std=None, median=None)
        quantiles = {
            f"{q:g}": float(v)
            for q, v in zip(_QUANTILE_LEVELS, np.quantile(finite, _QUANTILE_LEVELS), strict=True)
        }
        # Quantile edges keep every bin populated on skewed, zero-heavy features (event rates).
        edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)))
        if edges.size < 2:
            edges = np.array([edges[0], edges[0]])
            shares = np.array([1.0])
        else:
            counts, _ = np.histogram(finite, bins=edges)
            shares = counts / counts.sum()
        return cls(
            count=n,
            null_share=null_share,
            mean=float(finite.mean()),
            std=float(finite.std()),
            median=float(np.median(finite)),
            quantiles=quantiles,
            bin_edges=[float(e) for e in edges],
            bin_shares=[float(s) for s in shares],
        )


class BandLimit(BaseModel):
    """A product rule that travels with the model: a trip whose ``feature`` is at least
    ``at_least`` scores in ``band`` or worse, whatever the model's probability.

    The score is scaled by ``floor / 100`` (just under the floor of the band above), not
    clipped to it: trips under the rule keep their order and distinct scores, more of the
    behaviour still never raises a score, and reasons see the drop (their counterfactual,
    the behaviour at its typical value, escapes the rule). ``risk_probability`` stays the
    model's, and alerts follow it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    feature: str
    at_least: float
    band: RiskBand

    @property
    def scale(self) -> float:
        """Largest factor keeping a score of 100 below the floor of the band above."""
        floors = dict(BAND_FLOORS)
        order = [band for band, _floor in BAND_FLOORS] + ["high"]
        above = order.index(self.band) - 1
        if above < 0:
            return 1.0
        return float(np.nextafter(floors[order[above]] / 100.0, 0.0))


#: Rules every model trained today carries (see docs/model.md, "Band limits"). Map limits
#: are judged with the limit window, so a short wrong limit cannot trigger this.
DEFAULT_BAND_LIMITS: Final = (
    BandLimit(feature="speeding_moderate_share", at_least=0.5, band="elevated"),
)


class ModelCard(BaseModel):
    """Everything a model version needs besides its weights, stored as ``model_card.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: str = CARD_SCHEMA_VERSION
    created_at: datetime
    features: list[ModelFeature]
    score_mapping: ScoreMapping
    decision_threshold: float = Field(
        ge=0,
        le=1,
        description=(
            "Probability maximising F1 on the training data; trips at or above it count as "
            "positive for F1 and raise alerts."
        ),
    )
    reference: dict[str, FeatureReference]
    cleaning_config: CleaningConfig
    trip_config: TripConfig
    feature_config: FeatureConfig
    training_params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    lineage: dict[str, str] = Field(default_factory=dict)
    reason_min_points: float = Field(
        default=1.0, description="A reason must cost at least this many points."
    )
    band_limits: list[BandLimit] = Field(
        default_factory=list,
        description="Product rules on top of the model: a behaviour that caps the band.",
    )
    max_reasons: int = 3
    reference_profile_sha256: str | None = Field(
        default=None,
        description=(
            "sha256 of the drift reference profile stored beside the card "
            "(reference_profile.json); None for versions registered before profiles."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _read_schema_1(cls, data: Any) -> Any:
        """A card of schema 1 predates the rule choices: it keeps the rules it was made with
        (1-s heading-step cornering, the fix's own limit, the clipped linear mapping)."""
        if not isinstance(data, dict) or data.get("schema_version") != "1":
            return data
        upgraded = dict(data)
        features = upgraded.get("feature_config")
        if isinstance(features, dict):
            upgraded["feature_config"] = {**LEGACY_FEATURE_RULES, **features}
        mapping = upgraded.get("score_mapping")
        if isinstance(mapping, dict):
            upgraded["score_mapping"] = {"form": "clipped_linear", **mapping}
        return upgraded

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        return cls.model_validate_json(text)


def feature_matrix(features: pl.DataFrame, names: Sequence[str]) -> npt.NDArray[np.float32]:
    """Model input matrix (float32, the ONNX input type) in ``names`` order; null becomes NaN."""
    missing = [n for n in names if n not in features.columns]
    if missing:
        raise InputDataError(f"trip features lack model input column(s): {', '.join(missing)}")
    if features.height == 0:
        return np.empty((0, len(names)), dtype=np.float32)
    block = features.select(
        pl.col(n).cast(pl.Float64).fill_nan(None).fill_null(float("nan")) for n in names
    )
    return np.ascontiguousarray(block.to_numpy().astype(np.float32))


@dataclass(frozen=True)
class MatrixScores:
    """What :meth:`TripScorer.score_matrix` returns: one entry per input row."""

    probabilities: npt.NDArray[np.float64]
    scores: npt.NDArray[np.float64]
    #: ``None`` where the model gave no finite probability: such a trip has no score.
    bands: list[RiskBand | None]
    reasons: list[list[str]]


ProbabilityFn = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.floating[Any]]]


class TripScorer:
    """Scores trip feature rows with one model version.

    ``predict_proba`` takes a float32 matrix in ``card.feature_names`` order and returns
    P(incident) per row. The scorer adds the trip score record columns of ``docs/design.md``.
    """

    def __init__(
        self,
        predict_proba: ProbabilityFn,
        card: ModelCard,
        model_name: str,
        model_version: str,
        model_role: str,
    ) -> None:
        self.predict_proba = predict_proba
        self.card = card
        self.model_name = model_name
        self.model_version = model_version
        self.model_role = model_role
        names = card.feature_names
        # Reason-eligible features: a named behaviour whose rise never lowers risk, with a
        # training median to compare against.
        self._reason_cols: list[tuple[int, str, float]] = []
        for j, feat in enumerate(card.features):
            ref = card.reference.get(feat.name)
            if (
                feat.direction == 1
                and feat.name in REASON_TEMPLATES
                and ref
                and ref.median is not None
            ):
                self._reason_cols.append((j, feat.name, ref.median))
        # The medians as the float32 the model compares and counterfactuals hold.
        self._reason_cols32: list[tuple[int, float]] = [
            (j, float(np.float32(median))) for j, _name, median in self._reason_cols
        ]
        self._names = names
        # Band limits on features this model reads (a rule on another input is inert).
        self._limits: list[tuple[int, float, float]] = [
            (names.index(rule.feature), float(np.float32(rule.at_least)), rule.scale)
            for rule in card.band_limits
            if rule.feature in names
        ]

    def _map(
        self, probabilities: npt.NDArray[np.float64], x: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float64]:
        """Scores of model input rows: the card's mapping, then its band limits."""
        scores = self.card.score_mapping.score(probabilities)
        for j, at_least, scale in self._limits:
            limited = x[:, j] >= at_least  # NaN (unknown) never triggers a rule
            scores = np.where(limited, scores * scale, scores)
        return scores

    def score_trips(self, features: pl.DataFrame, scored_at: datetime) -> pl.DataFrame:
        """Trip score records: the feature rows plus probability, score, band and reasons."""
        if scored_at.tzinfo is None:
            raise ValueError("scored_at must be timezone-aware (UTC)")
        # Re-scoring a score record replaces its score columns instead of duplicating them.
        features = features.drop([c for c in SCORE_RECORD_COLUMNS if c in features.columns])
        scored = self.score_matrix(feature_matrix(features, self._names))
        return features.with_columns(
            pl.Series("risk_probability", scored.probabilities, dtype=pl.Float64),
            pl.Series("score", scored.scores, dtype=pl.Float64),
            pl.Series("risk_band", scored.bands, dtype=pl.String),
            pl.Series("reasons", scored.reasons, dtype=pl.List(pl.String)),
            pl.lit(self.model_name, dtype=pl.String).alias("model_name"),
            pl.lit(self.model_version, dtype=pl.String).alias("model_version"),
            pl.lit(self.model_role, dtype=pl.String).alias("model_role"),
            pl.lit(scored_at, dtype=pl.Datetime("us", "UTC")).alias("scored_at"),
        ).select(*features.columns, *SCORE_RECORD_COLUMNS)

    def score_matrix(self, x: npt.NDArray[np.float32]) -> MatrixScores:
        """Probability, score, band and reasons per row of a model input matrix.

        ``x`` is what :func:`feature_matrix` builds (float32, ``card.feature_names`` order,
        NaN for missing). :meth:`score_trips` is this plus the frame around it; a caller that
        already holds the numbers (the REST service, one trip at a time) calls it directly.
        """
        n = x.shape[0]
        if n == 1:
            one = self._score_one(x)
            if one is not None:
                return one
        blocks = [x]
        cf_index: list[tuple[int, npt.NDArray[np.int64]]] = []
        for k, (j, _name, median) in enumerate(self._reason_cols):
            # Only trips above the typical value can be "blamed" for this behaviour.
            rows = np.flatnonzero(x[:, j] > np.float32(median))
            if rows.size:
                block = x[rows].copy()
                block[:, j] = np.float32(median)
                blocks.append(block)
                cf_index.append((k, rows))
        stacked = np.concatenate(blocks) if len(blocks) > 1 else x
        # One batched call: the trips themselves and every counterfactual together.
        probs_all = (
            np.asarray(self.predict_proba(stacked), dtype=np.float64).reshape(-1)
            if stacked.shape[0]
            else np.empty(0, dtype=np.float64)
        )
        probs = probs_all[:n]
        # One mapping call for trips and counterfactuals: per-call overhead dominates small n.
        scores_all = self._map(probs_all, stacked)
        scores = scores_all[:n]
        # Floors ascending; a score on a floor belongs to the band above it.
        bands: list[RiskBand | None] = _BANDS_ASCENDING[
            np.searchsorted(_FLOORS_ASCENDING, scores, side="right")
        ].tolist()
        # A score that is not a number has no band (searchsorted would put it in the safest).
        for i in np.flatnonzero(~np.isfinite(scores)).tolist():
            bands[i] = None
        return MatrixScores(
            probabilities=probs,
            scores=scores,
            bands=bands,
            reasons=self._reasons(x, scores, scores_all[n:], cf_index),
        )

    def _score_one(self, x: npt.NDArray[np.float32]) -> MatrixScores | None:
        """:meth:`score_matrix` of one row with plain Python around the model call.

        The REST service scores one trip per request, where numpy's per-call overhead on
        arrays of one row cost more than the model itself. Same rows, same model call, same
        score mapping, same tie-breaking: the result is bit-identical to the general path
        (tests compare both). Returns ``None`` when a score is not a number, which the
        general path handles.
        """
        row: list[float] = x[0].tolist()
        # Counterfactual rows, in reason-column order, as the general path stacks them.
        blamed = [
            (k, j, median) for k, (j, median) in enumerate(self._reason_cols32) if row[j] > median
        ]
        stacked = np.empty((1 + len(blamed), x.shape[1]), dtype=np.float32)
        stacked[:] = x[0]
        for r, (_k, j, median) in enumerate(blamed, start=1):
            stacked[r, j] = median
        probs_all = np.asarray(self.predict_proba(stacked), dtype=np.float64).reshape(-1)
        scores_all = self._map(probs_all, stacked)
        values: list[float] = scores_all.tolist()
        score = values[0]
        if any(math.isnan(v) for v in values):
            return None
        gains = [0.0] * len(self._reason_cols)
        for r, (k, _j, _median) in enumerate(blamed, start=1):
            gains[k] = values[r] - score
        reasons: list[str] = []
        min_points = self.card.reason_min_points
        if any(g >= min_points for g in gains):
            # Stable sort on negated gains, as the general path's argsort.
            order = sorted(range(len(gains)), key=lambda k: -gains[k])
            for k in order[: self.card.max_reasons]:
                if gains[k] < min_points:
                    break
                j, name, median = self._reason_cols[k]
                reasons.append(REASON_TEMPLATES[name].render(row[j], median))
        one_band: RiskBand = _BANDS_LIST[bisect.bisect_right(_FLOORS_LIST, score)]
        return MatrixScores(
            probabilities=probs_all[:1],
            scores=scores_all[:1],
            bands=[one_band],
            reasons=[reasons],
        )

    def _reasons(
        self,
        x: npt.NDArray[np.float32],
        scores: npt.NDArray[np.float64],
        cf_scores: npt.NDArray[np.float64],
        cf_index: list[tuple[int, npt.NDArray[np.int64]]],
    ) -> list[list[str]]:
        n = x.shape[0]
        gains = np.zeros((n, len(self._reason_cols)), dtype=np.float64)
        offset = 0
        for k, rows in cf_index:
            gains[rows, k] = cf_scores[offset : offset + rows.size] - scores[rows]
            offset += rows.size
        out: list[list[str]] = [[] for _ in range(n)]
        if not self._reason_cols:
            return out
        min_points = self.card.reason_min_points
        for i in np.flatnonzero((gains >= min_points).any(axis=1)):
            # Stable sort on negated gains: worst first, model order breaks ties.
            order = np.argsort(-gains[i], kind="stable")[: self.card.max_reasons]
            for k in order:
                if gains[i, k] < min_points:
                    break
                j, name, median = self._reason_cols[k]
                out[i].append(REASON_TEMPLATES[name].render(float(x[i, j]), median))
        return out


_GROUP_COLUMNS: Final = {
    "driver": "driver_id",
    "vehicle": "vehicle_id",
    "fleet": "fleet_id",
    "client": "client_id",
}


def aggregate_scores(
    scores: pl.DataFrame, by: str, as_of: datetime, window_days: float
) -> pl.DataFrame:
    """Distance-weighted mean trip score per ``by`` over the window ending at ``as_of``.

    ``by`` is ``driver``, ``vehicle``, ``fleet`` or ``client`` (or the column name itself).
    A trip belongs to the window when ``as_of - window_days < end_ts <= as_of``. Trips of zero
    distance carry no weight; a group whose trips all have zero distance gets their plain mean.
    Returns one row per group: the group column, ``score``, ``risk_band``, ``trip_count``,
    ``distance_km``, ``window_start``, ``window_end``, sorted by the group column.
    """
    column = _GROUP_COLUMNS.get(by, by)
    if column not in _GROUP_COLUMNS.values():
        raise ValueError(f"cannot aggregate by {by!r}; use one of {', '.join(_GROUP_COLUMNS)}")
    if as_of.tzinfo is None:
        raise ValueError("as_of must be timezone-aware (UTC)")
    if window_days <= 0:
        raise ValueError("window_days must be positive")
    start = as_of - timedelta(days=window_days)
    end_ts = pl.col("end_ts").dt.convert_time_zone("UTC")
    weight = pl.col("distance_km").fill_null(0.0).clip(lower_bound=0.0)
    in_window = scores.filter((end_ts > start) & (end_ts <= as_of) & pl.col("score").is_not_null())
    total = weight.sum()
    return (
        in_window.group_by(column)
        .agg(
            pl.when(total > 0)
            .then((pl.col("score") * weight).sum() / total)
            .otherwise(pl.col("score").mean())
            .alias("score"),
            pl.len().cast(pl.Int64).alias("trip_count"),
            pl.col("distance_km").fill_null(0.0).sum().alias("distance_km"),
        )
        .with_columns(
            _band_expr(pl.col("score")).alias("risk_band"),
            pl.lit(start, dtype=pl.Datetime("us", "UTC")).alias("window_start"),
            pl.lit(as_of, dtype=pl.Datetime("us", "UTC")).alias("window_end"),
        )
        .select(
            column,
            "score",
            "risk_band",
            "trip_count",
            "distance_km",
            "window_start",
            "window_end",
        )
        .sort(column)
    )
