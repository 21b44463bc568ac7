"""Synthetic trip features with a known monotone risk: for tests, demos and benchmarks.

It lets the model, the gate and the registry be exercised without the telemetry simulator.
The true incident log-odds rise with every constrained feature (see ``TRUE_LOG_ODDS``),
so a correct model must rank those trips as riskier.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

import numpy as np
import polars as pl

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.scoring import feature_matrix
from driverscore.settings import GateConfig, TrainingConfig
from driverscore.training.dataset import label_trips, time_split
from driverscore.training.gate import evaluate, run_gate
from driverscore.training.model import TrainedModel, train_model
from driverscore.training.onnx_export import export_onnx

if TYPE_CHECKING:
    from driverscore.adapters.registry import ModelRegistry, RegisteredVersion

__all__ = ["LENIENT_GATE", "TRUE_LOG_ODDS", "register_synthetic_model", "synthetic_trips"]

#: Per-unit effect of each feature on the true incident log-odds (intercept under "const").
TRUE_LOG_ODDS: Final[dict[str, float]] = {
    "const": -4.6,
    "distance_km": 0.006,
    "speed_std_kmh": 0.03,
    "hard_brake_per_100km": 0.22,
    "harsh_accel_per_100km": 0.12,
    "harsh_corner_per_100km": 0.12,
    "speeding_share": 4.0,
    "speeding_moderate_share": 2.0,
    "speeding_severe_share": 3.0,
    "night_share": 1.6,
    "jerk_rms_mps3": 0.6,
}


def synthetic_trips(
    n_trips: int,
    seed: int = 0,
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC),
    days: float = 120.0,
    n_drivers: int = 300,
    n_fleets: int = 3,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(trip features, incidents) in the contracts of ``docs/design.md``.

    Drivers differ in style (a per-driver propensity scales their event rates), trips of a
    vehicle never overlap, and each incident is reported 0-20 days after it happened.
    """
    rng = np.random.default_rng(seed)
    driver = rng.integers(0, n_drivers, n_trips)
    style = rng.gamma(2.0, 0.5, n_drivers)[driver]  # mean 1: some drivers are much harsher
    distance = rng.lognormal(2.5, 0.8, n_trips).clip(0.3, 600.0)
    avg_speed = rng.uniform(20.0, 90.0, n_trips)
    speeding = rng.beta(1.0, 14.0, n_trips) * np.sqrt(style)
    speeding = np.where(rng.random(n_trips) < 0.1, np.nan, speeding.clip(0.0, 1.0))
    night = np.where(rng.random(n_trips) < 0.75, 0.0, rng.uniform(0.05, 1.0, n_trips))
    cols: dict[str, np.ndarray] = {
        "distance_km": distance,
        "avg_speed_kmh": avg_speed,
        "p95_speed_kmh": avg_speed * rng.uniform(1.1, 1.6, n_trips),
        "speed_std_kmh": rng.gamma(2.0, 5.0, n_trips) * np.sqrt(style),
        "hard_brake_per_100km": rng.exponential(1.5, n_trips) * style,
        "harsh_accel_per_100km": rng.exponential(1.0, n_trips) * style,
        "harsh_corner_per_100km": rng.exponential(0.8, n_trips) * style,
        "speeding_share": speeding,
        # Time well over the limit is a part of the time over it.
        "speeding_moderate_share": speeding * rng.uniform(0.2, 0.7, n_trips),
        "night_share": night,
        "idle_share": rng.beta(2.0, 10.0, n_trips),
        "jerk_rms_mps3": rng.gamma(2.0, 0.3, n_trips) * np.sqrt(style),
    }
    cols["speeding_severe_share"] = cols["speeding_moderate_share"] * rng.uniform(0.1, 0.6, n_trips)
    log_odds = np.full(n_trips, TRUE_LOG_ODDS["const"])
    for name, beta in TRUE_LOG_ODDS.items():
        if name != "const":
            log_odds += beta * np.nan_to_num(cols[name], nan=0.0)
    incident = rng.random(n_trips) < 1.0 / (1.0 + np.exp(-log_odds))

    duration_s = distance / avg_speed * 3600.0
    # Trips of one vehicle are laid end to end from random offsets so they never overlap.
    offsets = rng.uniform(0.0, days * 86_400.0, n_trips)
    order = np.lexsort((offsets, driver))
    start_s = np.empty(n_trips)
    last_end: dict[int, float] = {}
    for i in order:
        d = int(driver[i])
        start_s[i] = max(offsets[i], last_end.get(d, -1.0) + 60.0)
        last_end[d] = start_s[i] + duration_s[i]
    start_ts = [start + timedelta(seconds=float(s)) for s in start_s]
    end_ts = [t + timedelta(seconds=float(d)) for t, d in zip(start_ts, duration_s, strict=True)]
    vehicle = [f"V{d:04d}" for d in driver]
    features = pl.DataFrame(
        {
            "trip_id": [f"T{i:07d}" for i in range(n_trips)],
            "vehicle_id": vehicle,
            "driver_id": [f"D{d:04d}" for d in driver],
            "fleet_id": [f"F{d % n_fleets}" for d in driver],
            "client_id": [f"C{d % 2}" for d in driver],
            "start_ts": pl.Series(start_ts, dtype=pl.Datetime("us", "UTC")),
            "end_ts": pl.Series(end_ts, dtype=pl.Datetime("us", "UTC")),
            "duration_s": duration_s,
            **cols,
        }
    ).sort("trip_id")
    hit = np.flatnonzero(incident)
    incident_ts = [
        start_ts[i] + timedelta(seconds=float(rng.uniform(0.0, duration_s[i]))) for i in hit
    ]
    incidents = pl.DataFrame(
        {
            "vehicle_id": [vehicle[i] for i in hit],
            "driver_id": [f"D{driver[i]:04d}" for i in hit],
            "incident_ts": pl.Series(incident_ts, dtype=pl.Datetime("us", "UTC")),
            "reported_at": pl.Series(
                [t + timedelta(days=float(rng.uniform(0.0, 20.0))) for t in incident_ts],
                dtype=pl.Datetime("us", "UTC"),
            ),
            "severity": rng.choice(["minor", "major"], size=hit.size, p=[0.8, 0.2]).tolist(),
        },
        schema_overrides={"severity": pl.String, "vehicle_id": pl.String, "driver_id": pl.String},
    )
    return features, incidents


#: Minimums loose enough that a model of synthetic trips always passes and gets an alias.
LENIENT_GATE: Final = GateConfig(min_roc_auc=0.5, max_brier=0.5, max_calibration_error=0.5)


def register_synthetic_model(
    registry: ModelRegistry,
    *,
    trips: int = 4000,
    seed: int = 5,
    max_iter: int = 60,
    lineage: dict[str, str] | None = None,
    data_versions: dict[str, str] | None = None,
    code_version: str = "synthetic",
    feature_config: FeatureConfig | None = None,
) -> tuple[RegisteredVersion, TrainedModel]:
    """Train on synthetic trips, export, gate leniently and register: a real registry entry
    for tests and benchmarks that need a served model but not the telemetry simulator.

    ``feature_config``: the thresholds the card says the features were computed with
    (what scoring recomputes features with); the defaults when not given.
    """
    features, incidents = synthetic_trips(trips, seed=seed)
    labelled = label_trips(features, incidents, datetime(2026, 5, 20, tzinfo=UTC), 7.0)
    train, holdout = time_split(labelled, 0.25)
    trained = train_model(train, TrainingConfig(max_iter=max_iter, min_samples_leaf=50))
    x = feature_matrix(holdout, trained.feature_names)
    card = trained.model_card(
        cleaning_config=CleaningConfig(),
        trip_config=TripConfig(),
        feature_config=feature_config or FeatureConfig(),
        lineage=lineage or {},
    )
    metrics = evaluate(
        holdout["incident"].to_numpy(),
        trained.predict_proba(x),
        card.decision_threshold,
        holdout["fleet_id"].to_numpy(),
    )
    registered = registry.register(
        trained,
        export_onnx(trained, x),
        card,
        run_gate(metrics, None, LENIENT_GATE),
        params={"max_iter": max_iter, "synthetic_trips": trips, "seed": seed},
        data_versions=dict(data_versions or {}),
        code_version=code_version,
        sample=holdout.head(5),
    )
    return registered, trained
