"""Behaviour of a trained model, through the ONNX serving path.

The model is trained on synthetic trips whose true risk rises with every constrained
feature, so these tests check the model learned what it should and keeps its promises:
more of a risky behaviour never makes a trip look safer, and it ranks unseen (newer)
trips well.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from driverscore.adapters.onnx_model import OnnxRiskModel
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.scoring import TripScorer, feature_matrix
from driverscore.settings import TrainingConfig
from driverscore.training.dataset import label_trips, time_split
from driverscore.training.model import train_model
from driverscore.training.onnx_export import export_onnx
from driverscore.training.synthetic import synthetic_trips

pytestmark = [pytest.mark.model, pytest.mark.slow]

SCORED_AT = datetime(2026, 6, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Served:
    scorer: TripScorer
    holdout: pl.DataFrame


@pytest.fixture(scope="module")
def served() -> Served:
    features, incidents = synthetic_trips(16_000, seed=21)
    labelled = label_trips(features, incidents, datetime(2026, 5, 20, tzinfo=UTC), 7.0)
    train, holdout = time_split(labelled, 0.25)
    trained = train_model(train, TrainingConfig(max_iter=100))
    x = feature_matrix(holdout, trained.feature_names)
    onnx_model = OnnxRiskModel(export_onnx(trained, x))
    card = trained.model_card(
        cleaning_config=CleaningConfig(), trip_config=TripConfig(), feature_config=FeatureConfig()
    )
    return Served(TripScorer(onnx_model.predict_proba, card, "behaviour", "1", "champion"), holdout)


def test_ranks_newer_trips_well(served: Served) -> None:
    scored = served.scorer.score_trips(served.holdout, SCORED_AT)
    auc = roc_auc_score(served.holdout["incident"].to_numpy(), scored["risk_probability"])
    assert auc >= 0.75


@pytest.mark.parametrize(
    ("feature", "top"),
    [("hard_brake_per_100km", 30.0), ("speeding_share", 1.0), ("night_share", 1.0)],
)
def test_more_of_a_risky_behaviour_never_raises_the_score(
    served: Served, feature: str, top: float
) -> None:
    bases = served.holdout.sample(300, seed=5)
    grid = np.linspace(0.0, top, 41)
    # Every base trip repeated along the grid, all else equal.
    sweep = (
        bases.with_row_index("base")
        .join(pl.DataFrame({"step": np.arange(grid.size), feature: grid}), how="cross", suffix="_")
        .drop(feature)
        .rename({f"{feature}_": feature})
        .sort("base", "step")
    )
    scores = served.scorer.score_trips(sweep, SCORED_AT)["score"].to_numpy().reshape(-1, grid.size)
    steps = np.diff(scores, axis=1)
    assert steps.max() <= 1e-9, f"score rose by {steps.max():.3g} when {feature} increased"
    # And the behaviour matters: across the sweep most trips lose points.
    assert float(np.mean(scores[:, 0] - scores[:, -1] > 1.0)) > 0.5


def test_reasons_blame_the_behaviour_that_was_raised(served: Served) -> None:
    calm = served.holdout.sample(100, seed=9).with_columns(
        pl.lit(0.0).alias("hard_brake_per_100km"),
        pl.lit(0.0).alias("speeding_share"),
        pl.lit(0.0).alias("night_share"),
    )
    harsh = calm.with_columns(pl.lit(25.0).alias("hard_brake_per_100km"))
    reasons = served.scorer.score_trips(harsh, SCORED_AT)["reasons"].to_list()
    first = [r[0].split(":")[0] if r else None for r in reasons]
    assert first.count("Hard braking") >= 90
