"""When the scenarios retrain: the rule that makes the drift's challenger able to learn it.

The scenarios themselves run end to end in tests/integration/test_demo_scenarios.py.
"""

from __future__ import annotations

from driverscore.pipelines.demo_scenarios import ScenarioPlan, _retrain_due
from driverscore.settings import Settings, TrainingConfig


def test_drift_retraining_waits_until_drifted_trips_matured_in_the_training_split() -> None:
    plan = ScenarioPlan("drift", drift_day=14, drifted_days_to_learn=4)
    settings = Settings(training=TrainingConfig(label_maturity_days=7, validation_fraction=0.25))
    assert not _retrain_due(plan, 35, None, settings), "no verdict, no retraining"
    # At the end of day 29, trips to day 23 matured; the oldest 75% reach day 17.25:
    # 3.25 drifted days to learn from. One day later, 4.
    assert not _retrain_due(plan, 29, 21, settings)
    assert _retrain_due(plan, 30, 21, settings)
    # Claims that mature faster let it run sooner.
    quick = Settings(training=TrainingConfig(label_maturity_days=2, validation_fraction=0.25))
    assert _retrain_due(plan, 25, 21, quick)


def test_the_bad_challenger_is_the_first_replayed_days_weekly_retraining() -> None:
    plan = ScenarioPlan("bad-challenger", history_days=21)
    settings = Settings()
    assert _retrain_due(plan, 21, None, settings)
    assert not _retrain_due(plan, 22, None, settings)
    assert plan.total_days == 21 + plan.max_replay_days
