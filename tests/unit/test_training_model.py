"""Training, the decision threshold and the ONNX export's parity with sklearn."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import pytest

from driverscore.adapters.onnx_model import OnnxRiskModel
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.features import MODEL_FEATURES
from driverscore.domain.scoring import ModelCard, feature_matrix
from driverscore.errors import InputDataError
from driverscore.settings import TrainingConfig
from driverscore.training.dataset import label_trips, time_split
from driverscore.training.model import TrainedModel, f1_optimal_threshold, train_model
from driverscore.training.onnx_export import (
    ONNX_ATOL,
    OnnxParityError,
    check_onnx_parity,
    export_onnx,
)
from driverscore.training.synthetic import synthetic_trips

SMALL = TrainingConfig(max_iter=30, min_samples_leaf=40)


@pytest.fixture(scope="module")
def data() -> tuple[pl.DataFrame, pl.DataFrame]:
    features, incidents = synthetic_trips(4000, seed=11)
    labelled = label_trips(features, incidents, datetime(2026, 5, 20, tzinfo=UTC), 7.0)
    return time_split(labelled, 0.25)


@pytest.fixture(scope="module")
def trained(data: tuple[pl.DataFrame, pl.DataFrame]) -> TrainedModel:
    return train_model(data[0], SMALL)


def test_model_uses_the_feature_contract(trained: TrainedModel) -> None:
    assert trained.feature_names == tuple(MODEL_FEATURES)
    assert trained.directions == tuple(MODEL_FEATURES.values())
    booster = trained.estimator.calibrated_classifiers_[0].estimator
    assert list(booster.monotonic_cst) == list(MODEL_FEATURES.values())
    assert 0.0 < trained.decision_threshold < 1.0
    assert set(trained.reference) == set(MODEL_FEATURES)


def test_card_carries_configs_and_training_statistics(trained: TrainedModel) -> None:
    card = trained.model_card(
        cleaning_config=CleaningConfig(),
        trip_config=TripConfig(),
        feature_config=FeatureConfig(hard_brake_mps2=3.5),
        metrics={"holdout.roc_auc": 0.8},
        lineage={"features": "0123456789abcdef"},
    )
    restored = ModelCard.from_json(card.to_json())
    assert restored.feature_config.hard_brake_mps2 == 3.5
    assert restored.metrics["holdout.roc_auc"] == 0.8
    assert "train.positive_rate" in restored.metrics
    assert restored.training_params["max_iter"] == 30
    assert restored.reference["speeding_share"].null_share > 0


def test_onnx_matches_sklearn_including_missing_values(
    trained: TrainedModel, data: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    x = feature_matrix(data[1], trained.feature_names)
    assert np.isnan(x).any()  # speeding_share is missing on some trips
    onnx_bytes = export_onnx(trained, x)
    diff = check_onnx_parity(trained, onnx_bytes, x)
    assert diff <= ONNX_ATOL
    model = OnnxRiskModel(onnx_bytes)
    np.testing.assert_allclose(model.predict_proba(x), trained.predict_proba(x), atol=ONNX_ATOL)
    assert model.predict_proba(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="features"):
        model.predict_proba(x[:, :3])


def test_a_row_scores_the_same_whatever_else_is_in_the_call(
    trained: TrainedModel, data: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    # The stream and the REST service score one trip (plus its reason counterfactuals) per
    # call, batch scores thousands: the probabilities must agree to the bit.
    x = feature_matrix(data[1], trained.feature_names)[:400]
    model = OnnxRiskModel(export_onnx(trained, x))
    whole = model.predict_proba(x)
    for size in (1, 2, 3, 5, 8, 13):
        for start in range(0, 60, size):
            part = model.predict_proba(x[start : start + size])
            assert np.array_equal(part, whole[start : start + size]), (size, start)


def test_onnx_model_is_shared_safely_between_threads(
    trained: TrainedModel, data: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    x = feature_matrix(data[1], trained.feature_names)
    model = OnnxRiskModel(export_onnx(trained, x))
    expected = model.predict_proba(x)
    chunks = np.array_split(np.arange(x.shape[0]), 16)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda rows: model.predict_proba(x[rows]), chunks))
    np.testing.assert_array_equal(np.concatenate(results), expected)


class _Shifted:
    """An estimator whose probabilities drift from the exported model's by 0.001."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        p = self.inner.predict_proba(x)
        return np.asarray(np.clip(p + np.array([-1e-3, 1e-3]), 0.0, 1.0))


def test_parity_check_rejects_a_model_that_scores_differently(
    trained: TrainedModel, data: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    x = feature_matrix(data[1], trained.feature_names)
    onnx_bytes = export_onnx(trained, x)
    drifted = replace(trained, estimator=_Shifted(trained.estimator))
    with pytest.raises(OnnxParityError, match="differ"):
        check_onnx_parity(drifted, onnx_bytes, x)


def test_f1_optimal_threshold() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    assert f1_optimal_threshold(y, p) == pytest.approx(0.7)


def test_training_needs_both_classes(data: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    with pytest.raises(InputDataError, match="each class"):
        train_model(data[0].with_columns(pl.lit(0, dtype=pl.Int8).alias("incident")), SMALL)
    with pytest.raises(InputDataError, match="label column"):
        train_model(data[0].drop("incident"), SMALL)
