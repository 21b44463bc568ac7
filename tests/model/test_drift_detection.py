"""Injected drift is found by one monitor run; undrifted weeks raise no alarm.

Each scenario simulates one fleet for 24 days (small: 40 vehicles, about 2,400 trips):
a model is trained on days 0-10 and its reference profile fitted, as training does; the
week of days 10-17 is undrifted and must pass without an alarm; the drift starts on day
17 (the simulator's start day) and the week of days 17-24 must get verdict ``drift``
naming the features the drift moves. The window is judged as ``driverscore monitor``
judges it: trip records profiled on the reference edges, quarantine counts of the window's
pings, every slice of at least 200 trips. Five fleets (seeds) give five undrifted weeks.

Estimated performance is checked against the realised one on a sixth, undrifted fleet.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.drift import MonitoringConfig
from driverscore.domain.monitoring import DataQualityInput, WindowJudgement, judge_window
from driverscore.domain.performance import estimate_performance
from driverscore.domain.prepare import PreparedTrips, prepare_trips
from driverscore.domain.profiles import TripProfile, profile_trips
from driverscore.domain.scoring import TripScorer
from driverscore.settings import TrainingConfig
from driverscore.simulation.config import DriftConfig, SimulationConfig
from driverscore.simulation.simulator import simulate
from driverscore.training.dataset import LABEL_COLUMN, label_trips
from driverscore.training.model import train_model
from driverscore.training.reference import fit_reference_profile

pytestmark = [pytest.mark.model, pytest.mark.slow]

VEHICLES = 40
TRAIN_DAYS = 10
DRIFT_DAY = 17
DAYS = 24

#: Each drift of the issue, its fleet's seed, and the features it must be named by.
SCENARIOS: dict[str, tuple[int, DriftConfig, set[str]]] = {
    # 10 vehicles join the 40: a fifth of the vehicles, in a new fleet of riskier drivers.
    "riskier fleet joins": (
        31,
        DriftConfig(new_fleet_vehicles=10, new_fleet_start_day=DRIFT_DAY),
        {"fleet_id", "client_id"},
    ),
    "km/h sent as m/s on 10 % of vehicles": (
        32,
        DriftConfig(speed_unit_kmh_share=0.1, speed_unit_kmh_start_day=DRIFT_DAY),
        {"avg_speed_kmh", "p95_speed_kmh", "speed_std_kmh"},
    ),
    # Every device with an accelerometer (imu_share, 30 % of the fleet) turns GPS-only.
    "30 % of devices turn GPS-only": (
        33,
        DriftConfig(gps_only_share=1.0, gps_only_start_day=DRIFT_DAY),
        {"event_source"},
    ),
    "seasonal speed x1.1": (
        34,
        DriftConfig(seasonal_speed_factor=1.1, seasonal_start_day=DRIFT_DAY),
        {"p95_speed_kmh", "speeding_share"},
    ),
    "no drift": (35, DriftConfig(), set()),
}


@dataclass(frozen=True)
class Weeks:
    undrifted: WindowJudgement
    drifted: WindowJudgement


def _prepare(pings: pl.DataFrame, now: datetime) -> PreparedTrips:
    return prepare_trips(pings, CleaningConfig(), TripConfig(), FeatureConfig(), now)


def _trained(config: SimulationConfig) -> tuple[TripScorer, TripProfile, pl.DataFrame, datetime]:
    """The fleet's pings, a model trained on its first days and its reference profile."""
    sim = simulate(config)
    now = config.start + timedelta(days=DAYS + 31)  # every claim is in by then
    cut = config.start + timedelta(days=TRAIN_DAYS)
    training = _prepare(sim.pings.filter(pl.col("ts") < cut), now)
    labelled = label_trips(training.features, sim.incidents, now, 7.0)
    model = train_model(labelled, TrainingConfig(max_iter=40, min_samples_leaf=50))
    card = model.model_card(
        cleaning_config=CleaningConfig(), trip_config=TripConfig(), feature_config=FeatureConfig()
    )
    scorer = model.scorer(card, "fleet", "1", "champion")
    return scorer, fit_reference_profile(training.features, scorer), sim.pings, now


def _judge(
    scorer: TripScorer, reference: TripProfile, pings: pl.DataFrame, now: datetime
) -> WindowJudgement:
    """One monitor run over a week of pings: score, profile, quarantine counts, judge."""
    prepared = _prepare(pings, now)
    records = scorer.score_trips(prepared.features, now)
    quarantine = prepared.quarantine
    per_reason = dict(quarantine.group_by("reason").len().iter_rows()) if quarantine.height else {}
    return judge_window(
        reference,
        profile_trips(records, reference.edges),
        MonitoringConfig(),
        model_columns=scorer.card.feature_names,
        card_metrics={},
        quality=DataQualityInput(
            pings_in=prepared.counts["rows_in"], quarantined_per_reason=per_reason
        ),
    )


@functools.cache
def _weeks(scenario: str) -> Weeks:
    seed, drift, _features = SCENARIOS[scenario]
    config = SimulationConfig(vehicles=VEHICLES, days=DAYS, seed=seed, drift=drift)
    scorer, reference, pings, now = _trained(config)
    undrifted_from = config.start + timedelta(days=TRAIN_DAYS)
    drifted_from = config.start + timedelta(days=DRIFT_DAY)
    before = pings.filter((pl.col("ts") >= undrifted_from) & (pl.col("ts") < drifted_from))
    after = pings.filter(pl.col("ts") >= drifted_from)
    return Weeks(_judge(scorer, reference, before, now), _judge(scorer, reference, after, now))


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if SCENARIOS[s][2]])
def test_injected_drift_is_found_in_one_run_naming_its_features(scenario: str) -> None:
    drifted = _weeks(scenario).drifted
    expected = SCENARIOS[scenario][2]
    assert drifted.verdict == "drift", drifted.summary
    missing = expected - set(drifted.drifted_features)
    assert not missing, f"{scenario}: {sorted(missing)} not named; alarms: {drifted.alarms}"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_undrifted_weeks_raise_no_alarm(scenario: str) -> None:
    week = _weeks(scenario).undrifted
    assert week.trips >= 500
    assert week.alarms == [], week.alarms
    assert week.verdict in ("ok", "warn")
    judged = [s for s in week.slices if s.trips >= MonitoringConfig().min_slice_trips]
    assert judged, "no slice large enough to judge: the test would check nothing"
    assert all(s.drifted == [] for s in judged)


def test_estimated_performance_tracks_the_realised_on_an_undrifted_fleet() -> None:
    config = SimulationConfig(vehicles=80, days=21, seed=36)
    sim = simulate(config)
    now = config.start + timedelta(days=60)
    cut = config.start + timedelta(days=9)
    training = _prepare(sim.pings.filter(pl.col("ts") < cut), now)
    model = train_model(
        label_trips(training.features, sim.incidents, now, 7.0),
        TrainingConfig(max_iter=60, min_samples_leaf=50),
    )
    later = _prepare(sim.pings.filter(pl.col("ts") >= cut), now)
    matured = label_trips(later.features, sim.incidents, now, 7.0)
    assert matured.height >= 2000
    card = model.model_card(
        cleaning_config=CleaningConfig(), trip_config=TripConfig(), feature_config=FeatureConfig()
    )
    records = model.scorer(card, "fleet", "1", "champion").score_trips(matured, now)
    y = matured[LABEL_COLUMN].to_numpy()
    p = records["risk_probability"].to_numpy()
    estimated = estimate_performance(p, card.decision_threshold)
    assert abs(estimated["roc_auc"] - roc_auc_score(y, p)) <= 0.03
    assert abs(estimated["brier"] - brier_score_loss(y, p)) <= 0.01
