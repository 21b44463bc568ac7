"""The one scoring path (``domain/trip_scoring.py``): rollout, records, alerts, set-asides."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
import polars as pl
import pytest

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.features import MODEL_FEATURES
from driverscore.domain.rollout import RolloutPolicy, canary_bucket
from driverscore.domain.scoring import (
    FeatureReference,
    ModelCard,
    ModelFeature,
    ScoreMapping,
    TripScorer,
    feature_matrix,
)
from driverscore.domain.trip_scoring import (
    SET_ASIDE_NON_FINITE,
    TRIP_RECORD_SCHEMA,
    ScoringModels,
    score_trip_features,
)

NAMES = list(MODEL_FEATURES)
NOW = datetime(2026, 3, 1, tzinfo=UTC)


def logistic(weight: float) -> object:
    def model(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        z = -4.0 + weight * np.nan_to_num(x[:, NAMES.index("hard_brake_per_100km")], nan=0.0)
        return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)

    return model


def trips(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    cols: dict[str, object] = {name: rng.exponential(1.0, n) for name in NAMES}
    cols["speeding_share"] = rng.beta(1, 15, n)
    cols["speeding_moderate_share"] = cols["speeding_share"] * rng.random(n)
    cols["speeding_severe_share"] = cols["speeding_moderate_share"] * rng.random(n)
    cols["night_share"] = rng.beta(1, 5, n)
    cols["idle_share"] = rng.beta(1, 5, n)
    return pl.DataFrame(
        {
            "trip_id": [f"T{i}" for i in range(n)],
            "vehicle_id": [f"V{i % 5}" for i in range(n)],
            "driver_id": [f"D{i}" for i in range(n)],
            "start_ts": [NOW - timedelta(hours=i + 1) for i in range(n)],
            "end_ts": [NOW - timedelta(hours=i) for i in range(n)],
            **cols,
        }
    )


def card(weight: float, threshold: float = 0.2) -> ModelCard:
    x = feature_matrix(trips(500), NAMES)
    model = logistic(weight)
    return ModelCard(
        created_at=NOW,
        features=[ModelFeature(name=n, direction=d) for n, d in MODEL_FEATURES.items()],  # type: ignore[arg-type]
        score_mapping=ScoreMapping.fit(model(x)),  # type: ignore[operator]
        decision_threshold=threshold,
        reference={n: FeatureReference.from_values(x[:, j]) for j, n in enumerate(NAMES)},
        cleaning_config=CleaningConfig(),
        trip_config=TripConfig(),
        feature_config=FeatureConfig(),
    )


def scorer(weight: float, version: str, threshold: float = 0.2) -> TripScorer:
    return TripScorer(logistic(weight), card(weight, threshold), "m", version, "champion")  # type: ignore[arg-type]


CHAMPION = scorer(0.8, "1")
CHALLENGER = scorer(1.6, "2")


def test_champion_only_answers_every_trip_with_the_champion() -> None:
    scored = score_trip_features(
        trips(20), ScoringModels(CHAMPION, CHALLENGER), RolloutPolicy(), NOW
    )
    frame = scored.records_frame()
    assert frame.schema == pl.Schema(TRIP_RECORD_SCHEMA)
    assert frame["model_role"].unique().to_list() == ["champion"]
    assert frame["model_version"].unique().to_list() == ["1"]
    assert scored.shadow_frame().height == 0
    assert [d.challenger_version for d in scored.decisions] == [None] * 20
    assert frame["trip_id"].to_list() == [f"T{i}" for i in range(20)]


def test_canary_answers_by_driver_bucket_and_shadows_the_other_model() -> None:
    policy = RolloutPolicy(mode="canary", challenger_percent=50, salt="s")
    frame = trips(40)
    scored = score_trip_features(frame, ScoringModels(CHAMPION, CHALLENGER), policy, NOW)
    records, shadow = scored.records_frame(), scored.shadow_frame()
    assert records.height == shadow.height == 40
    for rec, sh, decision in zip(
        records.iter_rows(named=True), shadow.iter_rows(named=True), scored.decisions, strict=True
    ):
        on_canary = canary_bucket(rec["driver_id"], "s") < 5000
        assert rec["model_role"] == ("challenger" if on_canary else "champion")
        assert rec["model_version"] == ("2" if on_canary else "1")
        assert sh["model_role"] == "shadow"
        assert sh["model_version"] == ("1" if on_canary else "2")
        assert sh["trip_id"] == rec["trip_id"]
        # The decision pairs both models' scores whichever answered.
        assert decision.answered_by == ("challenger" if on_canary else "champion")
        assert decision.champion_version == "1" and decision.challenger_version == "2"
        champion_score = rec["score"] if not on_canary else sh["score"]
        challenger_score = sh["score"] if not on_canary else rec["score"]
        assert decision.champion_score == champion_score
        assert decision.challenger_score == challenger_score
        assert champion_score != challenger_score  # two models that differ
    assert 0 < records["model_role"].eq("challenger").sum() < 40


def test_shadow_mode_champion_answers_and_challenger_is_shadow() -> None:
    scored = score_trip_features(
        trips(10), ScoringModels(CHAMPION, CHALLENGER), RolloutPolicy(mode="shadow"), NOW
    )
    assert set(scored.records_frame()["model_version"]) == {"1"}
    assert set(scored.shadow_frame()["model_role"]) == {"shadow"}
    assert set(scored.shadow_frame()["model_version"]) == {"2"}


def test_alerts_follow_the_answering_card_threshold() -> None:
    frame = trips(60, seed=3)
    scored = score_trip_features(frame, ScoringModels(CHAMPION), RolloutPolicy(), NOW)
    records, alerts = scored.records_frame(), scored.alerts_frame()
    expected = records.filter(pl.col("risk_probability") >= 0.2)["trip_id"].to_list()
    assert 0 < len(expected) < 60
    assert alerts["trip_id"].to_list() == expected
    at = float(CHAMPION.card.score_mapping.score([0.2])[0])
    assert all(f"threshold 0.200 (score {at:.1f} or below)" in a for a in alerts["alert"])


def test_a_model_output_that_is_not_a_number_is_set_aside_never_banded() -> None:
    def broken(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        p = np.full(x.shape[0], 0.05)
        p[1] = np.nan
        return p

    nan_scorer = TripScorer(broken, CHAMPION.card, "m", "9", "champion")
    scored = score_trip_features(trips(3), ScoringModels(nan_scorer), RolloutPolicy(), NOW)
    assert scored.records_frame()["trip_id"].to_list() == ["T0", "T2"]
    (aside,) = scored.set_aside
    assert (aside.trip_id, aside.reason, aside.model_version) == ("T1", SET_ASIDE_NON_FINITE, "9")
    assert len(scored.decisions) == 2


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("distance_km", -5.0, "distance_km: -5 is below 0"),
        ("night_share", 7.0, "night_share: 7 is above 1"),
        ("distance_km", None, "distance_km: missing"),
        ("hard_brake_per_100km", float("inf"), "not a finite number"),
    ],
)
def test_rows_that_break_the_feature_contract_are_set_aside(
    column: str, value: float | None, message: str
) -> None:
    frame = trips(3).with_columns(
        pl.when(pl.col("trip_id") == "T1")
        .then(pl.lit(value, dtype=pl.Float64))
        .otherwise(pl.col(column))
        .alias(column)
    )
    scored = score_trip_features(frame, ScoringModels(CHAMPION), RolloutPolicy(), NOW)
    assert scored.records_frame()["trip_id"].to_list() == ["T0", "T2"]
    (aside,) = scored.set_aside
    assert aside.trip_id == "T1" and aside.reason == "invalid_features"
    assert message in aside.detail


def test_one_row_and_many_rows_validate_the_same() -> None:
    frame = trips(12).with_columns(
        pl.when(pl.col("trip_id") == "T5")
        .then(-1.0)
        .otherwise(pl.col("distance_km"))
        .alias("distance_km")
    )
    many = score_trip_features(frame, ScoringModels(CHAMPION), RolloutPolicy(), NOW)
    singles = [
        score_trip_features(frame.slice(i, 1), ScoringModels(CHAMPION), RolloutPolicy(), NOW)
        for i in range(12)
    ]
    assert [s.set_aside[0].detail for s in singles if s.set_aside] == [many.set_aside[0].detail]
    joined = pl.concat([s.records_frame() for s in singles])
    assert joined.drop("scored_at").equals(many.records_frame().drop("scored_at"))
