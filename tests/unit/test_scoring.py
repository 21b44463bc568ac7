"""Score mapping, bands, reason codes and aggregation (pure domain, no trained model)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
import polars as pl
import pytest

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.features import MODEL_FEATURES
from driverscore.domain.scoring import (
    SCORE_RECORD_COLUMNS,
    SOFT_TAIL_POINTS,
    BandLimit,
    FeatureReference,
    ModelCard,
    ModelFeature,
    ScoreMapping,
    TripScorer,
    aggregate_scores,
    band_for_score,
    feature_matrix,
)
from driverscore.errors import InputDataError

NAMES = list(MODEL_FEATURES)
NOW = datetime(2026, 3, 1, tzinfo=UTC)
# A transparent "model": logistic in a few behaviours, monotone like the real one.
WEIGHTS = {"hard_brake_per_100km": 0.4, "speeding_share": 5.0, "night_share": 1.5}


def logistic_model(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    z = np.full(x.shape[0], -4.0)
    for name, w in WEIGHTS.items():
        z += w * np.nan_to_num(x[:, NAMES.index(name)].astype(np.float64), nan=0.0)
    return np.asarray(1.0 / (1.0 + np.exp(-z)), dtype=np.float64)


def trips(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    cols = {name: rng.exponential(1.0, n) for name in NAMES}
    cols["speeding_share"] = rng.beta(1, 15, n)
    cols["night_share"] = np.where(rng.random(n) < 0.8, 0.0, rng.random(n))
    return pl.DataFrame(
        {
            "trip_id": [f"T{i}" for i in range(n)],
            "driver_id": [f"D{i % 7}" for i in range(n)],
            "end_ts": [NOW - timedelta(hours=i) for i in range(n)],
            **cols,
        }
    )


@pytest.fixture(scope="module")
def card() -> ModelCard:
    train = trips(2000)
    x = feature_matrix(train, NAMES)
    return ModelCard(
        created_at=NOW,
        features=[
            ModelFeature.model_validate({"name": n, "direction": d})
            for n, d in MODEL_FEATURES.items()
        ],
        score_mapping=ScoreMapping.fit(logistic_model(x)),
        decision_threshold=0.2,
        reference={n: FeatureReference.from_values(x[:, j]) for j, n in enumerate(NAMES)},
        cleaning_config=CleaningConfig(),
        trip_config=TripConfig(),
        feature_config=FeatureConfig(),
    )


def test_score_mapping_is_monotone_clipped_and_anchored() -> None:
    rng = np.random.default_rng(1)
    train_p = rng.beta(1, 20, 10_000)
    mapping = ScoreMapping.fit(train_p)
    grid = np.linspace(0.0, 1.0, 2001)
    scores = mapping.score(grid)
    assert np.all(np.diff(scores) <= 0)
    assert scores.min() >= 0.0 and scores.max() <= 100.0
    assert scores[0] == 100.0 and scores[-1] == 0.0
    assert mapping.score([np.median(train_p)])[0] == pytest.approx(85.0, abs=1e-6)
    assert mapping.score([np.quantile(train_p, 0.99)])[0] == pytest.approx(45.0, abs=1e-6)


def test_band_cutoffs_match_the_scores() -> None:
    mapping = ScoreMapping.fit(np.random.default_rng(2).beta(1, 20, 5000))
    for band, floor in (("low", 90.0), ("moderate", 75.0), ("elevated", 60.0)):
        cutoff = mapping.band_probability_cutoffs[band]
        assert mapping.score([cutoff])[0] == pytest.approx(floor, abs=1e-6)


def test_degenerate_training_probabilities_still_give_a_mapping() -> None:
    mapping = ScoreMapping.fit(np.full(100, 0.05))
    assert mapping.slope > 0
    assert mapping.score([0.05])[0] == pytest.approx(85.0)


@pytest.mark.parametrize(
    ("score", "band"),
    [
        (100, "low"),
        (90, "low"),
        (89.99, "moderate"),
        (75, "moderate"),
        (74.9, "elevated"),
        (60, "elevated"),
        (59.99, "high"),
        (0, "high"),
    ],
)
def test_bands(score: float, band: str) -> None:
    assert band_for_score(score) == band


def test_score_record_columns_and_bands(card: ModelCard) -> None:
    features = trips(50, seed=5)
    out = TripScorer(logistic_model, card, "m", "3", "champion").score_trips(features, NOW)
    assert out.columns == [*features.columns, *SCORE_RECORD_COLUMNS]
    assert out.schema["reasons"] == pl.List(pl.String)
    assert out.schema["scored_at"] == pl.Datetime("us", "UTC")
    assert out["model_version"].unique().to_list() == ["3"]
    expected = [band_for_score(s) for s in out["score"]]
    assert out["risk_band"].to_list() == expected


def test_reasons_name_hard_braking_for_a_hard_braking_trip(card: ModelCard) -> None:
    base = trips(1, seed=9).with_columns(
        pl.lit(card.reference["hard_brake_per_100km"].median).alias("hard_brake_per_100km"),
        pl.lit(0.0).alias("speeding_share"),
        pl.lit(0.0).alias("night_share"),
    )
    harsh = base.with_columns(pl.lit(9.5).alias("hard_brake_per_100km"))
    scorer = TripScorer(logistic_model, card, "m", "1", "champion")
    out = scorer.score_trips(pl.concat([base, harsh]), NOW)
    assert out["reasons"][0].to_list() == []
    reasons = out["reasons"][1].to_list()
    assert reasons[0].startswith("Hard braking: 9.5 events per 100 km (typical ")
    assert len(reasons) <= 3
    assert out["score"][1] < out["score"][0]


def test_reasons_are_worst_first_and_at_most_three(card: ModelCard) -> None:
    trip = trips(1, seed=4).with_columns(
        pl.lit(3.0).alias("hard_brake_per_100km"),
        pl.lit(0.6).alias("speeding_share"),
        pl.lit(0.9).alias("night_share"),
    )
    reasons = (
        TripScorer(logistic_model, card, "m", "1", "champion")
        .score_trips(trip, NOW)["reasons"][0]
        .to_list()
    )
    assert [r.split(":")[0] for r in reasons] == ["Speeding", "Night driving", "Hard braking"]
    assert reasons[0].startswith("Speeding: 60% of moving time over the limit (typical ")


def test_reasons_use_one_batched_predict_call(card: ModelCard) -> None:
    calls: list[int] = []

    def counting(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        calls.append(x.shape[0])
        return logistic_model(x)

    TripScorer(counting, card, "m", "1", "champion").score_trips(trips(200, seed=6), NOW)
    assert len(calls) == 1 and calls[0] > 200


def test_one_row_path_is_bit_identical_to_the_general_path(
    card: ModelCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = feature_matrix(trips(300, seed=11), NAMES)
    j = NAMES.index("hard_brake_per_100km")
    x[0, j] = np.float32(card.reference["hard_brake_per_100km"].median)  # on the median
    x[1, NAMES.index("speeding_share")] = np.nan  # missing value
    x[2, :] = 0.0  # nothing to blame
    x[3, :] = 50.0  # everything to blame
    fast = TripScorer(logistic_model, card, "m", "1", "champion")
    general = TripScorer(logistic_model, card, "m", "1", "champion")
    monkeypatch.setattr(general, "_score_one", lambda row: None)
    for i in range(x.shape[0]):
        row = x[i : i + 1]
        a, b = fast.score_matrix(row), general.score_matrix(row)
        assert a.probabilities.tobytes() == b.probabilities.tobytes(), i
        assert a.scores.tobytes() == b.scores.tobytes(), i
        assert (a.bands, a.reasons) == (b.bands, b.reasons), i
    # A model answering NaN falls back to the general path (which does not sort NaN).
    nan_scorer = TripScorer(lambda m: np.full(m.shape[0], np.nan), card, "m", "1", "champion")
    assert nan_scorer._score_one(x[:1]) is None
    assert nan_scorer.score_matrix(x[:1]).bands == [None]


def test_a_band_limit_keeps_mostly_speeding_trips_out_of_the_safe_bands(
    card: ModelCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = BandLimit(feature="speeding_moderate_share", at_least=0.5, band="elevated")
    # Most training trips never speed by 10+ km/h: the typical value is 0.
    typical = {**card.reference, "speeding_moderate_share": FeatureReference.from_values([0.0])}
    limited = card.model_copy(update={"band_limits": [rule], "reference": typical})
    frame = trips(400, seed=4).with_columns(pl.lit(0.0).alias("speeding_moderate_share"))
    calm = TripScorer(logistic_model, limited, "m", "1", "champion").score_trips(frame, NOW)
    over = frame.with_columns(pl.lit(0.6).alias("speeding_moderate_share"))
    scorer = TripScorer(logistic_model, limited, "m", "1", "champion")
    speeding = scorer.score_trips(over, NOW)
    # The model ignores this feature, so only the rule moves the scores: every trip is
    # elevated or worse, scaled (not clipped), in the same order and as many distinct scores.
    assert calm["risk_band"].is_in(["low", "moderate"]).any()
    assert speeding["risk_band"].is_in(["elevated", "high"]).all()
    assert speeding["score"].max() < 75.0
    assert np.array_equal(np.argsort(speeding["score"]), np.argsort(calm["score"]))
    assert speeding["score"].n_unique() == calm["score"].n_unique()
    assert (speeding["score"] <= calm["score"]).all()  # more speeding never raises a score
    assert speeding["risk_probability"].equals(calm["risk_probability"])
    # The rule's drop is a reason, and the one-row path applies the rule bit for bit.
    assert any(len(r) and r[0].startswith("Speeding by 10+ km/h") for r in speeding["reasons"])
    x = feature_matrix(over, NAMES)[:20]
    general = TripScorer(logistic_model, limited, "m", "1", "champion")
    monkeypatch.setattr(general, "_score_one", lambda row: None)
    for i in range(x.shape[0]):
        a, b = scorer.score_matrix(x[i : i + 1]), general.score_matrix(x[i : i + 1])
        assert a.scores.tobytes() == b.scores.tobytes() and a.bands == b.bands, i
    # Unknown (null) never triggers the rule; a card without rules is unchanged by it.
    unknown = over.with_columns(pl.lit(None, dtype=pl.Float64).alias("speeding_moderate_share"))
    assert scorer.score_trips(unknown, NOW)["score"].equals(calm["score"])


def test_empty_frame_and_missing_columns(card: ModelCard) -> None:
    scorer = TripScorer(logistic_model, card, "m", "1", "champion")
    empty = scorer.score_trips(trips(3).head(0), NOW)
    assert empty.height == 0 and "score" in empty.columns
    with pytest.raises(InputDataError, match="night_share"):
        scorer.score_trips(trips(3).drop("night_share"), NOW)


def test_rescoring_a_score_record_replaces_its_columns(card: ModelCard) -> None:
    scorer = TripScorer(logistic_model, card, "m", "1", "champion")
    once = scorer.score_trips(trips(5), NOW)
    twice = TripScorer(logistic_model, card, "m", "2", "challenger").score_trips(once, NOW)
    assert twice.columns == once.columns
    assert twice["model_version"].to_list() == ["2"] * 5
    assert twice["score"].to_list() == once["score"].to_list()


def test_feature_matrix_turns_null_into_nan() -> None:
    frame = trips(3).with_columns(pl.Series("speeding_share", [None, 0.1, float("nan")]))
    x = feature_matrix(frame, NAMES)
    j = NAMES.index("speeding_share")
    assert x.dtype == np.float32
    assert np.isnan(x[0, j]) and np.isnan(x[2, j]) and x[1, j] == pytest.approx(0.1)


def test_card_round_trips_through_json(card: ModelCard) -> None:
    assert ModelCard.from_json(card.to_json()) == card


def test_a_card_of_schema_1_keeps_the_rules_it_was_made_with(card: ModelCard) -> None:
    legacy = json.loads(card.to_json())
    legacy["schema_version"] = "1"
    train_p = np.random.default_rng(3).beta(1, 20, 10_000)
    legacy["score_mapping"] = ScoreMapping.fit(train_p, form="clipped_linear").model_dump()
    del legacy["score_mapping"]["form"]
    for name in ("cornering", "corner_window_s", "min_corner_turn_deg", "speed_limit_window_m"):
        del legacy["feature_config"][name]
    old = ModelCard.from_json(json.dumps(legacy))
    assert old.feature_config.cornering == "heading_step"
    assert old.feature_config.speed_limit_window_m == 0.0
    assert old.score_mapping.form == "clipped_linear"
    assert old.score_mapping.score([1e-9])[0] == 100.0  # that mapping saturates
    # A card of the current schema reads back as written.
    assert card.schema_version == "2"
    assert card.feature_config.cornering == "windowed_turn"
    assert card.score_mapping.form == "soft_tails"


def test_the_soft_tailed_score_ranks_every_distinct_risk() -> None:
    mapping = ScoreMapping.fit(np.random.default_rng(3).beta(1, 20, 10_000))
    extremes = np.array([1e-300, 1e-12, 1e-9, 1e-6, 1e-3, 0.5, 0.999, 1 - 1e-9, 1 - 1e-12])
    scores = mapping.score(extremes)
    assert np.all(np.diff(scores) < 0)  # strictly: no two risks meet at an end
    assert np.all((scores > 0.0) & (scores < 100.0))
    assert mapping.score([0.0, 1.0]).tolist() == [100.0, 0.0]
    # The old form saturates on the same probabilities.
    linear = ScoreMapping.fit(np.random.default_rng(3).beta(1, 20, 10_000), form="clipped_linear")
    assert int((linear.score(extremes) == 100.0).sum()) >= 3


def test_soft_tails_are_the_linear_score_between_10_and_90() -> None:
    train_p = np.random.default_rng(4).beta(1, 20, 10_000)
    soft = ScoreMapping.fit(train_p)
    linear = ScoreMapping.fit(train_p, form="clipped_linear")
    grid = np.linspace(1e-4, 1 - 1e-4, 20_001)
    a, b = soft.score(grid), linear.score(grid)
    middle = (b >= SOFT_TAIL_POINTS) & (b <= 100.0 - SOFT_TAIL_POINTS)
    assert middle.sum() > 1000 and np.array_equal(a[middle], b[middle])
    assert soft.band_probability_cutoffs == linear.band_probability_cutoffs
    # Continuous with the linear part at both joins, and with its slope: a step of 1e-4
    # in z either side of a join moves the score by the same step, to second order.
    for edge in (SOFT_TAIL_POINTS, 100.0 - SOFT_TAIL_POINTS):
        z = np.array([edge - 1e-4, edge, edge + 1e-4])
        p_at = 1.0 / (1.0 + np.exp((z - soft.intercept) / soft.slope))
        assert np.abs(soft.score(p_at) - z).max() < 1e-6


def _scores(rows: list[tuple[str, float, float, datetime]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "driver_id": pl.String,
            "score": pl.Float64,
            "distance_km": pl.Float64,
            "end_ts": pl.Datetime("us", "UTC"),
        },
        orient="row",
    )


def test_aggregate_weights_by_distance_and_respects_the_window() -> None:
    scores = _scores(
        [
            ("A", 100.0, 10.0, NOW - timedelta(days=1)),
            ("A", 40.0, 30.0, NOW - timedelta(days=2)),
            ("A", 0.0, 500.0, NOW - timedelta(days=40)),  # outside the window
            ("A", 0.0, 500.0, NOW + timedelta(hours=1)),  # after as_of
            ("B", 70.0, 0.0, NOW - timedelta(days=3)),  # zero distance only: plain mean
            ("B", 90.0, 0.0, NOW - timedelta(days=3)),
        ]
    )
    out = aggregate_scores(scores, "driver", NOW, window_days=30)
    a = out.row(0, named=True)
    assert a["driver_id"] == "A"
    assert a["score"] == pytest.approx((100 * 10 + 40 * 30) / 40)
    assert a["trip_count"] == 2 and a["distance_km"] == pytest.approx(40.0)
    assert a["risk_band"] == "high"
    b = out.row(1, named=True)
    assert b["score"] == pytest.approx(80.0) and b["risk_band"] == "moderate"
    assert out["window_start"][0] == NOW - timedelta(days=30)


def test_aggregate_rejects_unknown_groups() -> None:
    with pytest.raises(ValueError, match="cannot aggregate"):
        aggregate_scores(_scores([]), "trip", NOW, 30)
