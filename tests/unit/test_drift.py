"""Drift statistics from profiles, the noise floor, and the window verdict."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.spatial.distance import jensenshannon

from driverscore.domain.drift import (
    PSI_EPSILON,
    DriftThresholds,
    MonitoringConfig,
    compare_categorical,
    compare_numeric,
    jensen_shannon,
    psi,
)
from driverscore.domain.monitoring import DataQualityInput, judge_window
from driverscore.domain.profiles import CategoricalProfile, ProfileEdges, profile_trips

MODEL = ("distance_km", "hard_brake_per_100km", "speeding_share")
CARD_METRICS = {"holdout.roc_auc": 0.80, "holdout.brier": 0.05}


def _trips(
    rng: np.random.Generator, n: int, *, brakes: float = 5.0, fleets: tuple[str, ...] = ("a", "b")
) -> pl.DataFrame:
    fleet = rng.choice(list(fleets), n)
    return pl.DataFrame(
        {
            "distance_km": rng.lognormal(2.0, 0.8, n),
            "hard_brake_per_100km": np.where(rng.random(n) < 0.6, 0.0, rng.exponential(brakes, n)),
            "speeding_share": np.where(rng.random(n) < 0.1, np.nan, rng.beta(1, 8, n)),
            "risk_probability": rng.beta(1, 20, n),
            "score": rng.normal(85, 8, n),
            "fleet_id": fleet.tolist(),
            "client_id": [f"{f}-client" for f in fleet],
            "event_source": rng.choice(["imu", "gps"], n, p=[0.3, 0.7]).tolist(),
            "risk_band": rng.choice(["low", "moderate", "high"], n).tolist(),
        }
    )


@pytest.fixture(scope="module")
def reference_trips() -> pl.DataFrame:
    return _trips(np.random.default_rng(0), 20_000)


@pytest.fixture(scope="module")
def edges(reference_trips: pl.DataFrame) -> ProfileEdges:
    return ProfileEdges.fit(reference_trips, [*MODEL, "risk_probability", "score"])


def test_psi_equals_a_numpy_reference_on_the_same_bins(
    reference_trips: pl.DataFrame, edges: ProfileEdges
) -> None:
    current = _trips(np.random.default_rng(1), 5_000, brakes=7.0)
    column = edges.numeric["hard_brake_per_100km"]
    ref = profile_trips(reference_trips, edges).overall.numeric[column.name]
    cur = profile_trips(current, edges).overall.numeric[column.name]
    got = compare_numeric(column.name, ref, cur, column, MonitoringConfig())
    # The coarse bins as plain edges: below the minimum, the groups, above the maximum.
    bounds = [column.edges[k - 1] for k in column.coarse] + [column.edges[-1]]
    cuts = np.concatenate([[-np.inf], bounds, [np.inf]])

    def shares(values: np.ndarray) -> np.ndarray:
        counts = np.histogram(values[np.isfinite(values)], bins=cuts)[0]
        return np.maximum(counts / counts.sum(), PSI_EPSILON)

    p = shares(reference_trips[column.name].to_numpy())
    q = shares(current[column.name].to_numpy())
    assert got.statistics["psi"] == pytest.approx(float(np.sum((q - p) * np.log(q / p))), abs=1e-9)


def test_jensen_shannon_is_scipys_distance_in_bits() -> None:
    p, q = np.array([10, 20, 30, 0]), np.array([5, 25, 20, 10])
    assert jensen_shannon(p, q) == pytest.approx(jensenshannon(p, q, base=2), abs=1e-12)
    assert jensen_shannon(p, p) == 0.0
    assert psi(p, p) == 0.0


def test_a_new_category_is_named_and_drifts() -> None:
    reference = CategoricalProfile({"fleet-a": 600, "fleet-b": 400})
    current = CategoricalProfile({"fleet-a": 480, "fleet-b": 320, "fleet-new": 200})
    drift = compare_categorical("fleet_id", reference, current, MonitoringConfig())
    assert drift.new_values == {"fleet-new": 200}
    assert drift.status == "drift"


@pytest.mark.parametrize("statistic", ["psi", "ks", "wasserstein", "js"])
def test_undrifted_slices_of_200_trips_never_alarm(
    reference_trips: pl.DataFrame, edges: ProfileEdges, statistic: str
) -> None:
    config = MonitoringConfig(decide_by=statistic)  # type: ignore[arg-type]
    reference = profile_trips(reference_trips, edges).overall
    for seed in range(40):
        window = profile_trips(_trips(np.random.default_rng(100 + seed), 200), edges).overall
        for name, column in edges.numeric.items():
            drift = compare_numeric(
                name, reference.numeric[name], window.numeric[name], column, config
            )
            assert drift.status != "drift", (seed, name, drift)


@pytest.mark.parametrize("statistic", ["psi", "ks", "wasserstein", "js"])
def test_each_statistic_can_decide_and_catches_a_shift(
    reference_trips: pl.DataFrame, edges: ProfileEdges, statistic: str
) -> None:
    config = MonitoringConfig(decide_by=statistic)  # type: ignore[arg-type]
    reference = profile_trips(reference_trips, edges).overall
    shifted = _trips(np.random.default_rng(5), 3_000).with_columns(pl.col("distance_km") * 2.0)
    window = profile_trips(shifted, edges).overall
    column = edges.numeric["distance_km"]
    drift = compare_numeric(
        "distance_km",
        reference.numeric["distance_km"],
        window.numeric["distance_km"],
        column,
        config,
    )
    assert (drift.decided_by, drift.status) == (statistic, "drift")


def test_per_feature_thresholds_replace_the_default(
    reference_trips: pl.DataFrame, edges: ProfileEdges
) -> None:
    reference = profile_trips(reference_trips, edges)
    shifted = _trips(np.random.default_rng(5), 3_000).with_columns(pl.col("distance_km") * 2.0)
    window = profile_trips(shifted, edges)
    strict = judge_window(
        reference, window, MonitoringConfig(), model_columns=MODEL, card_metrics={}
    )
    assert strict.drifted_features == ["distance_km"]
    lenient = MonitoringConfig(feature_thresholds={"distance_km": DriftThresholds(psi=5.0)})
    loose = judge_window(reference, window, lenient, model_columns=MODEL, card_metrics={})
    assert "distance_km" not in loose.drifted_features


def test_an_undrifted_window_is_ok(reference_trips: pl.DataFrame, edges: ProfileEdges) -> None:
    reference = profile_trips(reference_trips, edges)
    window = profile_trips(_trips(np.random.default_rng(7), 4_000), edges)
    judged = judge_window(
        reference, window, MonitoringConfig(), model_columns=MODEL, card_metrics=CARD_METRICS
    )
    assert judged.verdict == "ok", judged.alarms
    assert {(s.column, s.value) for s in judged.slices} == {
        ("fleet_id", "a"),
        ("fleet_id", "b"),
        ("client_id", "a-client"),
        ("client_id", "b-client"),
    }


def test_a_riskier_new_fleet_drifts_in_its_slice_and_overall(
    reference_trips: pl.DataFrame, edges: ProfileEdges
) -> None:
    reference = profile_trips(reference_trips, edges)
    rng = np.random.default_rng(8)
    window = pl.concat([_trips(rng, 3_200), _trips(rng, 800, brakes=15.0, fleets=("new",))])
    judged = judge_window(
        reference,
        profile_trips(window, edges),
        MonitoringConfig(),
        model_columns=MODEL,
        card_metrics=CARD_METRICS,
    )
    assert judged.verdict == "drift"
    assert "fleet_id" in judged.drifted_features
    new = next(s for s in judged.slices if (s.column, s.value) == ("fleet_id", "new"))
    assert new.compared_with == "overall"
    assert "hard_brake_per_100km" in new.drifted
    assert judged.data_quality["new_categories"]["fleet_id"] == {"new": 800}


def test_small_slices_are_not_judged(reference_trips: pl.DataFrame, edges: ProfileEdges) -> None:
    reference = profile_trips(reference_trips, edges)
    rng = np.random.default_rng(9)
    window = pl.concat([_trips(rng, 3_000), _trips(rng, 150, brakes=40.0, fleets=("tiny",))])
    judged = judge_window(
        reference,
        profile_trips(window, edges),
        MonitoringConfig(),
        model_columns=MODEL,
        card_metrics={},
    )
    assert ("fleet_id", "tiny") not in {(s.column, s.value) for s in judged.slices}
    assert judged.skipped_slices["fleet_id"] == 1


def test_missing_values_and_quarantine_are_data_quality_alarms(
    reference_trips: pl.DataFrame, edges: ProfileEdges
) -> None:
    reference = profile_trips(reference_trips, edges)
    window = _trips(np.random.default_rng(10), 3_000)
    window = window.with_columns(
        pl.when(pl.int_range(pl.len()) % 4 == 0)
        .then(None)
        .otherwise(pl.col("distance_km"))
        .alias("distance_km")
    )
    judged = judge_window(
        reference,
        profile_trips(window, edges),
        MonitoringConfig(),
        model_columns=MODEL,
        card_metrics={},
        quality=DataQualityInput(
            pings_in=100_000,
            quarantined_per_reason={"impossible_speed": 9_000, "duplicate": 200},
            contract_violations={"distance_km": 100},
            trips_set_aside=100,
        ),
    )
    assert judged.verdict == "drift"
    text = " | ".join(judged.alarms)
    assert "distance_km: missing in 25.0% of trips" in text
    assert "9.0% of pings quarantined as impossible_speed" in text
    assert "breaking the feature contract" in text
    assert judged.data_quality["quarantine_share_per_reason"]["duplicate"] == pytest.approx(0.002)


def test_performance_below_the_card_is_degraded(
    reference_trips: pl.DataFrame, edges: ProfileEdges
) -> None:
    reference = profile_trips(reference_trips, edges)
    window = profile_trips(_trips(np.random.default_rng(11), 3_000), edges)
    performance = {
        "realised": {"n": 2_500, "roc_auc": 0.70, "brier": 0.05},
        "estimated": {"n": 3_000, "roc_auc": 0.80, "brier": 0.05},
    }
    judged = judge_window(
        reference,
        window,
        MonitoringConfig(),
        model_columns=MODEL,
        card_metrics=CARD_METRICS,
        performance=performance,
    )
    assert judged.verdict == "degraded"
    assert judged.summary.startswith("degraded: realised ROC-AUC 0.700")
    # Too few matured trips: the estimate is judged instead, and it is fine.
    performance["realised"]["n"] = 100
    judged = judge_window(
        reference,
        window,
        MonitoringConfig(),
        model_columns=MODEL,
        card_metrics=CARD_METRICS,
        performance=performance,
    )
    assert judged.verdict == "ok"
