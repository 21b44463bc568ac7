"""What the Spark executors score with: the shipped models, their per-worker cache, and the
order scored groups are put back in. No Spark here: these are the pure parts."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from driverscore.adapters.onnx_model import OnnxRiskModel
from driverscore.adapters.spark.jobs import in_scoring_order
from driverscore.adapters.spark.models import ShippedModel, ShippedScoring, executor_scorer
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import ModelCard, TripScorer, feature_matrix
from driverscore.domain.trip_scoring import (
    SET_ASIDE_INVALID,
    SET_ASIDE_NON_FINITE,
    ScoringModels,
    score_trip_features,
)
from driverscore.training.dataset import label_trips, time_split
from driverscore.training.model import TrainingConfig, train_model
from driverscore.training.onnx_export import export_onnx
from driverscore.training.synthetic import synthetic_trips

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def exported() -> tuple[bytes, ModelCard, pl.DataFrame]:
    """A real ONNX export and its card, trained on synthetic trips, and trips to score."""
    features, incidents = synthetic_trips(1500, seed=11)
    labelled = label_trips(features, incidents, datetime(2026, 5, 20, tzinfo=UTC), 7.0)
    train, holdout = time_split(labelled, 0.25)
    trained = train_model(train, TrainingConfig(max_iter=20, min_samples_leaf=50))
    x = feature_matrix(holdout, trained.feature_names)
    card = trained.model_card(
        cleaning_config=CleaningConfig(),
        trip_config=TripConfig(),
        feature_config=FeatureConfig(),
        created_at=NOW,
    )
    return export_onnx(trained, x), card, holdout


def test_a_worker_builds_a_scorer_once_per_model_and_card(
    exported: tuple[bytes, ModelCard, pl.DataFrame],
) -> None:
    onnx, card, _ = exported
    shipped = ShippedModel.of(onnx, card, "m", "1", "champion")
    again = ShippedModel.of(onnx, card, "m", "1", "champion")
    assert executor_scorer(shipped) is executor_scorer(again)


def test_the_same_model_bytes_with_another_card_get_their_own_scorer(
    exported: tuple[bytes, ModelCard, pl.DataFrame],
) -> None:
    """A cache keyed on the model alone once served a stale card."""
    onnx, card, _ = exported
    stricter = card.model_copy(update={"decision_threshold": card.decision_threshold / 2})
    first = executor_scorer(ShippedModel.of(onnx, card, "m", "1", "champion"))
    second = executor_scorer(ShippedModel.of(onnx, stricter, "m", "1", "champion"))
    assert first is not second
    assert first.card.decision_threshold == card.decision_threshold
    assert second.card.decision_threshold == stricter.decision_threshold


def test_shipped_models_score_as_the_driver_scorer_does(
    exported: tuple[bytes, ModelCard, pl.DataFrame],
) -> None:
    """What crosses to an executor (pickled, as a broadcast does) scores every trip the
    same as a scorer built on the driver from the same export and card."""
    onnx, card, trips = exported
    policy = RolloutPolicy(mode="shadow")
    shipped = ShippedScoring(
        champion=ShippedModel.of(onnx, card, "m", "1", "champion"),
        challenger=ShippedModel.of(onnx, card, "m", "2", "challenger"),
        policy_json=policy.model_dump_json(),
    )
    received: ShippedScoring = pickle.loads(pickle.dumps(shipped))
    on_executor = score_trip_features(trips, received.models(), received.policy(), NOW)

    model = OnnxRiskModel(onnx)
    driver = ScoringModels(
        TripScorer(model.predict_proba, card, "m", "1", "champion"),
        TripScorer(model.predict_proba, card, "m", "2", "challenger"),
    )
    expected = score_trip_features(trips, driver, policy, NOW)
    assert len(on_executor) == len(expected) == trips.height
    assert on_executor.records_frame().equals(expected.records_frame())
    assert received.policy() == policy
    assert np.isfinite(on_executor.records_frame()["risk_probability"].to_numpy()).all()


def test_scored_groups_are_put_back_in_the_embedded_order() -> None:
    groups = [
        pl.DataFrame({"trip_id": ["2", "1"], "vehicle_id": ["b", "b"], "x": [1, 2]}),
        pl.DataFrame({"trip_id": ["1", "2"], "vehicle_id": ["a", "a"], "x": [3, 4]}),
    ]
    ordered = in_scoring_order(pl.concat(groups))
    assert ordered.select("trip_id", "vehicle_id").rows() == [
        ("1", "a"),
        ("1", "b"),
        ("2", "a"),
        ("2", "b"),
    ]


def test_set_asides_list_invalid_trips_before_non_finite_outputs() -> None:
    """Embedded scoring sets aside invalid feature rows first, then bad model outputs."""
    set_aside = pl.DataFrame(
        {
            "trip_id": ["1", "3", "2", "4"],
            "vehicle_id": ["a", "a", "b", "a"],
            "reason": [SET_ASIDE_NON_FINITE, *[SET_ASIDE_INVALID] * 3],
        }
    )
    ordered = in_scoring_order(set_aside)
    assert ordered.get_column("trip_id").to_list() == ["2", "3", "4", "1"]
