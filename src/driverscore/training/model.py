"""The trip risk model: monotone gradient boosting with sigmoid-calibrated probabilities."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import precision_recall_curve

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.features import MODEL_FEATURES
from driverscore.domain.scoring import (
    DEFAULT_BAND_LIMITS,
    FeatureReference,
    ModelCard,
    ModelFeature,
    ScoreForm,
    ScoreMapping,
    TripScorer,
    feature_matrix,
)
from driverscore.errors import InputDataError
from driverscore.settings import TrainingConfig
from driverscore.training.dataset import LABEL_COLUMN

__all__ = ["TrainedModel", "f1_optimal_threshold", "train_model"]


@dataclass(frozen=True)
class TrainedModel:
    """A fitted estimator and what training learned about it (the model card pieces)."""

    estimator: CalibratedClassifierCV
    feature_names: tuple[str, ...]
    directions: tuple[int, ...]
    score_mapping: ScoreMapping
    decision_threshold: float
    reference: dict[str, FeatureReference]
    training_params: dict[str, Any]
    train_metrics: dict[str, float] = field(default_factory=dict)

    def predict_proba(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """P(incident) per row of a float32 matrix in ``feature_names`` order."""
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        return np.asarray(self.estimator.predict_proba(x)[:, 1], dtype=np.float64)

    def model_card(
        self,
        *,
        cleaning_config: CleaningConfig,
        trip_config: TripConfig,
        feature_config: FeatureConfig,
        metrics: dict[str, float] | None = None,
        lineage: dict[str, str] | None = None,
        created_at: datetime | None = None,
    ) -> ModelCard:
        """The card stored with the model version: configs, holdout metrics and lineage added."""
        return ModelCard(
            created_at=created_at or datetime.now(UTC),
            features=[
                ModelFeature.model_validate({"name": n, "direction": d})
                for n, d in zip(self.feature_names, self.directions, strict=True)
            ],
            score_mapping=self.score_mapping,
            decision_threshold=self.decision_threshold,
            reference=self.reference,
            cleaning_config=cleaning_config,
            trip_config=trip_config,
            feature_config=feature_config,
            training_params=self.training_params,
            band_limits=[r for r in DEFAULT_BAND_LIMITS if r.feature in self.feature_names],
            metrics={**{f"train.{k}": v for k, v in self.train_metrics.items()}, **(metrics or {})},
            lineage=lineage or {},
        )

    def scorer(
        self, card: ModelCard, model_name: str, model_version: str, model_role: str
    ) -> TripScorer:
        """In-process scorer on the sklearn estimator (training and tests; serving uses ONNX)."""
        return TripScorer(self.predict_proba, card, model_name, model_version, model_role)


def f1_optimal_threshold(y_true: npt.ArrayLike, probability: npt.ArrayLike) -> float:
    """The probability threshold (``p >= t`` is positive) that maximises F1."""
    y = np.asarray(y_true).astype(np.int_)
    p = np.asarray(probability, dtype=np.float64)
    if np.unique(y).size < 2:
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y, p)
    # The last precision/recall pair has no threshold (recall 0 by convention).
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])


def train_model(
    train: pl.DataFrame,
    config: TrainingConfig,
    *,
    features: Mapping[str, int] = MODEL_FEATURES,
    score_form: ScoreForm = "soft_tails",
) -> TrainedModel:
    """Fit the calibrated monotone model on labelled trips (``incident`` column, 0/1).

    ``HistGradientBoostingClassifier`` handles missing values (``speeding_share`` without a
    known limit) natively and enforces each feature's monotone direction, so more hard
    braking can never lower a trip's risk. ``class_weight="balanced"`` keeps the rare
    positives from being ignored; the resulting skewed scores are then recalibrated with a
    sigmoid (Platt) fit on held-out folds (``cv=3``), which the calibrator fits *without*
    class weights, so the output is a real probability. Sigmoid rather than isotonic: it
    stays strictly monotone and exports to ONNX exactly.

    ``features`` (name → monotone direction) and ``score_form`` default to today's model;
    other values rebuild an earlier model's inputs and mapping for a like-for-like comparison.
    """
    if LABEL_COLUMN not in train.columns:
        raise InputDataError(f"training trips lack the label column {LABEL_COLUMN!r}")
    names = tuple(features)
    directions = tuple(features[n] for n in names)
    x = feature_matrix(train, names)
    y = train[LABEL_COLUMN].cast(pl.Int64).to_numpy()
    positives = int(y.sum())
    if positives < 3 or positives > y.size - 3:
        raise InputDataError(
            f"training needs at least 3 trips of each class; "
            f"got {positives} incidents in {y.size} trips"
        )
    booster = HistGradientBoostingClassifier(
        max_iter=config.max_iter,
        learning_rate=config.learning_rate,
        max_leaf_nodes=config.max_leaf_nodes,
        min_samples_leaf=config.min_samples_leaf,
        monotonic_cst=list(directions),
        class_weight="balanced",
        # Fixed iterations instead of early stopping: its random validation split would make
        # the model depend on more than the seed and the data.
        early_stopping=False,
        random_state=config.random_seed,
    )
    estimator = CalibratedClassifierCV(booster, method="sigmoid", cv=3)
    estimator.fit(x, y)
    probs = np.asarray(estimator.predict_proba(x)[:, 1], dtype=np.float64)
    threshold = f1_optimal_threshold(y, probs)
    reference = {n: FeatureReference.from_values(x[:, j]) for j, n in enumerate(names)}
    return TrainedModel(
        estimator=estimator,
        feature_names=names,
        directions=directions,
        score_mapping=ScoreMapping.fit(probs, form=score_form),
        decision_threshold=threshold,
        reference=reference,
        training_params={**config.model_dump(), "calibration": "sigmoid", "calibration_cv": 3},
        train_metrics={
            "n": float(y.size),
            "positive_rate": float(y.mean()),
            "mean_probability": float(probs.mean()),
        },
    )
