"""The closed loop against a real MLflow registry: guarded alias moves, the audit log, the
rollout policy in the registry, the decision job and the rollback watch.

Model versions here are registered without training (a run and a version pointing at
it): the decision reads versions, aliases and the logs, never the models. Traffic is
simulated with fixed seeds: each trip has a latent risk, outcomes follow it, and each
model sees it through its own noise, so a less noisy challenger is better on the same
trips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pytest

from driverscore.adapters.prediction_log import ParquetPredictionLog
from driverscore.adapters.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    ModelRegistry,
    open_registry,
    read_audit_store,
)
from driverscore.adapters.storage import DataStore
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.trip_scoring import PredictionRecord
from driverscore.errors import AliasMoveError
from driverscore.pipelines.decision_run import (
    challenger_evidence,
    promote,
    run_decision,
    run_rollback_watch,
)
from driverscore.pipelines.scoring_run import rollout_policy
from driverscore.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import MlflowServer

pytestmark = [pytest.mark.integration]

DAY0 = datetime(2026, 5, 1, tzinfo=UTC)
FLEETS = ("F1", "F2", "F3")


def _settings(home: Path, **env: str) -> Settings:
    fields: dict[str, object] = {"home": home}
    if "tracking" in env:
        fields["mlflow_tracking_uri"] = env["tracking"]
    if "model" in env:
        fields["model_name"] = env["model"]
    # Settle short: the test registry answers in milliseconds.
    return Settings(**fields).model_copy(
        update={
            "decision": Settings().decision.model_copy(
                update={"lease_settle_s": 0.2, "lease_wait_s": 30.0}
            )
        }
    )


def _new_version(registry: ModelRegistry) -> str:
    """A registered version with a run and no model: enough for aliases and decisions."""
    registry._ensure_registered_model()
    run = registry.client.create_run(registry._experiment_id())
    registry.client.set_terminated(run.info.run_id)
    version = registry.client.create_model_version(
        registry.model_name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    return str(version.version)


@dataclass
class Trial:
    settings: Settings
    registry: ModelRegistry
    champion: str
    challenger: str


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def _simulate(
    settings: Settings,
    champion: str,
    challenger: str | None,
    *,
    seed: int,
    trips: int,
    start: datetime,
    challenger_noise: float = 0.4,
    champion_shift: float = 0.0,
    write_labels: bool = True,
) -> None:
    """``trips`` trips over the days from ``start``: the scored trips (``scores`` dataset:
    times, fleet), both models' probabilities in the prediction log, and the claims."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=trips)
    outcome = rng.random(trips) < 1 / (1 + np.exp(-(risk * 1.5 - 2.5)))

    def model(noise: float) -> np.ndarray:
        return 1 / (1 + np.exp(-((risk + rng.normal(scale=noise, size=trips)) * 1.5 - 2.5)))

    p_champion = 1 / (1 + np.exp(-(_logit(model(1.0)) + champion_shift)))
    p_challenger = model(challenger_noise) if challenger else None
    starts = [start + timedelta(minutes=3 * i) for i in range(trips)]
    tag = f"{seed}-{champion}-{challenger}"
    trip_ids = [f"T{tag}-{i}" for i in range(trips)]
    vehicles = [f"V{tag}-{i}" for i in range(trips)]
    store = DataStore(settings.resolved_data_uri, settings.storage_options())
    store.write_dataset(
        "scores",
        pl.DataFrame(
            {
                "vehicle_id": vehicles,
                "trip_id": trip_ids,
                "start_ts": starts,
                "end_ts": [s + timedelta(minutes=20) for s in starts],
                "fleet_id": [FLEETS[i % 3] for i in range(trips)],
                "client_id": ["C1"] * trips,
                "model_version": [champion] * trips,
                "scored_at": [s + timedelta(minutes=21) for s in starts],
            }
        ),
        name="scores",
    )
    log = ParquetPredictionLog(settings.home / "prediction_log")
    log.setup()
    log.add(
        [
            PredictionRecord(
                decision_id=f"d{tag}-{i}",
                logged_at=starts[i] + timedelta(minutes=21),
                trip_id=trip_ids[i],
                driver_id=vehicles[i],
                vehicle_id=vehicles[i],
                rollout_mode="shadow" if challenger else "champion",
                answered_by="champion",
                model_name=settings.model_name,
                champion_version=champion,
                champion_score=None,
                champion_probability=float(p_champion[i]),
                challenger_version=challenger,
                challenger_score=None,
                challenger_probability=(
                    float(p_challenger[i]) if p_challenger is not None else None
                ),
            )
            for i in range(trips)
        ]
    )
    log.flush()
    if write_labels:
        hit = np.flatnonzero(outcome)
        claims = pl.DataFrame(
            {
                "vehicle_id": [vehicles[i] for i in hit],
                "incident_ts": [starts[i] + timedelta(minutes=10) for i in hit],
                "reported_at": [starts[i] + timedelta(days=2) for i in hit],
            }
        )
        previous = store.latest("labels")
        if previous is not None:
            claims = pl.concat([store.read_dataset(previous), claims], how="vertical_relaxed")
        store.write_dataset("labels", claims, name="labels")


def _trial(home: Path, **env: str) -> Trial:
    settings = _settings(home, **env)
    registry = open_registry(settings)
    champion, challenger = _new_version(registry), _new_version(registry)
    registry.move_alias(CHAMPION, champion, action="register", actor="training-job", reason="t")
    registry.move_alias(CHALLENGER, challenger, action="register", actor="training-job", reason="t")
    registry.set_rollout_policy(
        RolloutPolicy(mode="canary", challenger_percent=10), actor="tester", reason="canary"
    )
    return Trial(settings, registry, champion, challenger)


def test_guarded_moves_check_where_the_alias_is_and_audit_every_move(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    registry = trial.registry
    with pytest.raises(AliasMoveError, match="points to 1, not 7"):
        registry.move_alias(CHAMPION, "2", action="promote", actor="x", reason="r", expect_from="7")
    with pytest.raises(AliasMoveError, match="has no version 99"):
        registry.move_alias(CHAMPION, "99", action="promote", actor="x", reason="r")
    assert registry.alias_version(CHAMPION) == trial.champion
    assert registry.rollout_policy() == RolloutPolicy(mode="canary", challenger_percent=10)
    log = registry.audit_log()
    assert [(m.action, m.alias, m.to_version) for m in log] == [
        ("rollout", "rollout", "canary 10%"),
        ("register", CHALLENGER, trial.challenger),
        ("register", CHAMPION, trial.champion),
    ]
    store = DataStore(trial.settings.resolved_data_uri, {})
    assert read_audit_store(store, trial.settings.model_name) == list(reversed(log))
    # The lease is released: nothing is left on the registered model but policy and log.
    tags = registry.client.get_registered_model(registry.model_name).tags
    assert "driverscore.lease" not in tags
    assert registry._read_lease() is None


def test_batch_scoring_splits_traffic_by_the_policy_in_the_registry(tmp_path: Path) -> None:
    trial = _trial(tmp_path)  # stores canary 10%
    assert rollout_policy(trial.settings, None) == RolloutPolicy(
        mode="canary", challenger_percent=10
    )


def test_an_expired_lease_is_taken_and_a_live_one_waited_for(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    registry = trial.registry
    lease = {"owner": "dead-job", "expires_at": 0}
    registry.client.create_registered_model(
        registry.lease_model_name, tags={"driverscore.lease": json.dumps(lease)}
    )
    registry.move_alias(PREVIOUS, trial.champion, action="promote", actor="me", reason="r")
    live = {"owner": "busy-job", "expires_at": 4e9}
    registry.client.create_registered_model(
        registry.lease_model_name, tags={"driverscore.lease": json.dumps(live)}
    )
    impatient = ModelRegistry(
        registry.tracking_uri,
        None,
        registry.model_name,
        registry.experiment_name,
        lease=type(registry.lease)(ttl_s=30, settle_s=0.05, wait_s=0.3),
    )
    with pytest.raises(AliasMoveError, match="held by busy-job"):
        impatient.move_alias(PREVIOUS, None, action="rollback", actor="me", reason="r")
    assert registry.alias_version(PREVIOUS) == trial.champion


def test_a_better_challenger_is_promoted_and_a_worse_one_rejected(tmp_path: Path) -> None:
    now = DAY0 + timedelta(days=20)
    better = _trial(tmp_path / "better")
    _simulate(better.settings, better.champion, better.challenger, seed=11, trips=3000, start=DAY0)
    evidence = challenger_evidence(better.settings, now=now)
    assert evidence.ready and evidence.paired_trips == 3000
    assert evidence.labelled_trips == 3000
    outcome = run_decision(better.settings, now=now)
    assert outcome.action == "promote", outcome.reasons
    registry = better.registry
    assert registry.alias_version(CHAMPION) == better.challenger
    assert registry.alias_version(PREVIOUS) == better.champion
    assert registry.alias_version(CHALLENGER) is None
    assert registry.rollout_policy().mode == "champion"
    moves = registry.audit_log()
    assert [(m.action, m.alias, m.from_version, m.to_version) for m in moves[:4]] == [
        ("rollout", "rollout", "canary 10%", "champion"),
        ("promote", CHALLENGER, better.challenger, None),
        ("promote", PREVIOUS, None, better.champion),
        ("promote", CHAMPION, better.champion, better.challenger),
    ]
    assert moves[3].actor == "decision-job"
    assert moves[3].at == now
    assert moves[3].evidence["roc_auc.lower"] > 0
    assert moves[3].evidence["labelled_trips"] == 3000

    # The same traffic, the same seed; the challenger sees the risk through more noise.
    worse = _trial(tmp_path / "worse")
    _simulate(
        worse.settings,
        worse.champion,
        worse.challenger,
        seed=11,
        trips=3000,
        start=DAY0,
        challenger_noise=1.6,
    )
    outcome = run_decision(worse.settings, now=now)
    assert outcome.action == "reject", outcome.reasons
    assert worse.registry.alias_version(CHAMPION) == worse.champion
    assert worse.registry.alias_version(CHALLENGER) is None
    assert worse.registry.alias_version(PREVIOUS) is None
    rejection = worse.registry.audit_log()[1]
    assert (rejection.action, rejection.alias, rejection.from_version) == (
        "reject",
        CHALLENGER,
        worse.challenger,
    )
    assert rejection.evidence["roc_auc.improvement"] < 0


def test_before_labels_mature_the_decision_collects(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    _simulate(trial.settings, trial.champion, trial.challenger, seed=12, trips=600, start=DAY0)
    # Two days after the trips: their claims are not mature (7 days).
    outcome = run_decision(trial.settings, now=DAY0 + timedelta(days=2))
    assert outcome.action == "collect"
    assert "matured labelled trips" in outcome.reasons[0]
    assert trial.registry.alias_version(CHALLENGER) == trial.challenger


def test_a_promotion_followed_by_a_degradation_rolls_back(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    settings = trial.settings
    _simulate(settings, trial.champion, trial.challenger, seed=13, trips=3000, start=DAY0)
    promoted_at = DAY0 + timedelta(days=20)
    assert run_decision(settings, now=promoted_at).action == "promote"
    # After the promotion the new champion's scores run far higher than its predecessor's.
    _simulate(
        settings,
        trial.challenger,
        None,
        seed=14,
        trips=800,
        start=promoted_at + timedelta(hours=1),
        champion_shift=2.5,
        write_labels=False,
    )
    watch = run_rollback_watch(settings, now=promoted_at + timedelta(days=3))
    assert watch.rolled_back, watch.reasons
    assert "PSI" in watch.reasons[0]
    assert trial.registry.alias_version(CHAMPION) == trial.champion
    assert trial.registry.alias_version(PREVIOUS) is None
    back = trial.registry.audit_log()[1]
    assert (back.action, back.alias, back.actor) == ("rollback", CHAMPION, "rollback-watch")
    assert back.evidence["score_psi"] > settings.decision.max_score_psi
    # Once rolled back there is nothing left to watch.
    assert not run_rollback_watch(settings, now=promoted_at + timedelta(days=4)).rolled_back


def test_a_healthy_promotion_is_not_rolled_back(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    settings = trial.settings
    _simulate(settings, trial.champion, trial.challenger, seed=15, trips=3000, start=DAY0)
    promoted_at = DAY0 + timedelta(days=20)
    assert run_decision(settings, now=promoted_at).action == "promote"
    _simulate(
        settings,
        trial.challenger,
        None,
        seed=16,
        trips=800,
        start=promoted_at + timedelta(hours=1),
        write_labels=False,
    )
    watch = run_rollback_watch(settings, now=promoted_at + timedelta(days=3))
    assert not watch.rolled_back, watch.reasons
    assert trial.registry.alias_version(CHAMPION) == trial.challenger


def test_a_person_cannot_promote_a_version_that_is_not_the_challenger(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    with pytest.raises(AliasMoveError, match=f"version {trial.champion} is not the challenger"):
        promote(trial.registry, trial.champion, actor="alice", reason="looks good")


_DECIDER = textwrap.dedent(
    """
    import json, sys
    from datetime import datetime
    from driverscore.pipelines.decision_run import run_decision
    from driverscore.settings import Settings

    settings = Settings()
    settings = settings.model_copy(update={"decision": settings.decision.model_copy(
        update={"lease_settle_s": 0.3, "lease_wait_s": 60.0})})
    outcome = run_decision(settings, now=datetime.fromisoformat(sys.argv[1]))
    print(json.dumps({"action": outcome.action, "reasons": outcome.reasons}))
    """
)


@pytest.mark.slow
def test_two_decision_jobs_in_separate_processes_move_the_alias_once(
    tmp_path: Path, start_mlflow_server: Callable[[], MlflowServer]
) -> None:
    server = start_mlflow_server()
    trial = _trial(tmp_path / "home", tracking=server.url)
    _simulate(trial.settings, trial.champion, trial.challenger, seed=17, trips=2000, start=DAY0)
    env = {
        **os.environ,
        "DRIVERSCORE_HOME": str(trial.settings.home),
        "DRIVERSCORE_MLFLOW_TRACKING_URI": server.url,
    }
    now = (DAY0 + timedelta(days=20)).isoformat()
    deciders = [
        subprocess.Popen(
            [sys.executable, "-c", _DECIDER, now],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = []
    for decider in deciders:
        out, err = decider.communicate(timeout=300)
        assert decider.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    actions = sorted(r["action"] for r in results)
    assert actions == ["none", "promote"], results
    champion_moves = [
        m for m in trial.registry.audit_log() if m.alias == CHAMPION and m.action == "promote"
    ]
    assert len(champion_moves) == 1
    assert trial.registry.alias_version(CHAMPION) == trial.challenger
    assert trial.registry.alias_version(PREVIOUS) == trial.champion


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    # Wide: the audit table would wrap its reasons in 80 columns.
    env = {**os.environ, "DRIVERSCORE_HOME": str(settings.home), "USER": "alice", "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "driverscore", "models", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )


def test_people_move_aliases_from_the_command_line_guarded_and_audited(tmp_path: Path) -> None:
    trial = _trial(tmp_path)
    wrong = _cli(trial.settings, "reject", trial.champion, "--reason", "oops")
    assert wrong.returncode == 1
    assert "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().splitlines() == [
        f"error: version {trial.champion} is not the challenger (the challenger is "
        f"{trial.challenger}); only the challenger can be rejected"
    ]
    done = _cli(trial.settings, "promote", trial.challenger, "--reason", "canary looked fine")
    assert done.returncode == 0, done.stderr
    assert f"promote champion {trial.champion} -> {trial.challenger} by alice" in done.stdout
    status = _cli(trial.settings, "status", "--now", (DAY0 + timedelta(days=1)).isoformat())
    assert status.returncode == 0, status.stderr
    assert f"champion    {trial.challenger}" in status.stdout
    assert f"previous    {trial.champion}" in status.stdout
    assert "rollout     champion" in status.stdout
    assert "canary looked fine" in status.stdout
    back = _cli(trial.settings, "rollback", trial.challenger, "--reason", "claims spiked")
    assert back.returncode == 0, back.stderr
    assert trial.registry.alias_version(CHAMPION) == trial.champion
    again = _cli(trial.settings, "rollback", trial.champion, "--reason", "twice")
    assert again.returncode == 1
    assert "has no previous champion to roll back to" in again.stderr
    actions = [(m.action, m.alias, m.actor) for m in trial.registry.audit_log()]
    assert actions[:2] == [("rollback", PREVIOUS, "alice"), ("rollback", CHAMPION, "alice")]


@pytest.mark.slow
def test_movers_racing_into_the_guard_at_once_move_the_alias_once(
    tmp_path: Path, start_mlflow_server: Callable[[], MlflowServer]
) -> None:
    """Two registries (no shared in-process lock, a server backend: no database lock file)
    enter the guard at the same moment: only the lease stands between them."""
    server = start_mlflow_server()
    trial = _trial(tmp_path, tracking=server.url, model="race")
    barrier = threading.Barrier(2)
    results: list[str] = []

    def mover() -> None:
        registry = open_registry(trial.settings)
        barrier.wait()
        try:
            promote(registry, trial.challenger, actor="racer", reason="race")
            results.append("moved")
        except AliasMoveError as exc:
            results.append(str(exc))

    racers = [threading.Thread(target=mover) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=120)
    assert sorted(results)[0] == "moved", results
    assert "is not the challenger" in sorted(results)[1], results
    moves = trial.registry.audit_log()
    assert [m.alias for m in moves if m.action == "promote"].count(CHAMPION) == 1


def test_a_trip_keeps_its_fleet_when_a_later_scoring_does_not_carry_it(tmp_path: Path) -> None:
    from driverscore.pipelines.decision_run import _trip_facts

    store = DataStore(str(tmp_path / "data"), {})
    trip = {"vehicle_id": ["V1"], "trip_id": ["T1"], "start_ts": [DAY0]}
    end = DAY0 + timedelta(minutes=20)
    store.write_dataset(
        "scores",
        pl.DataFrame({**trip, "end_ts": [end], "fleet_id": ["F1"], "scored_at": [end]}),
        name="scores",
    )
    # Scored again later by a path that does not record the fleet.
    later = end + timedelta(hours=1)
    store.write_dataset(
        "scores", pl.DataFrame({**trip, "end_ts": [end], "scored_at": [later]}), name="scores"
    )
    facts = _trip_facts(store, [], DAY0 + timedelta(days=1))
    assert facts.select("vehicle_id", "trip_id", "fleet_id").rows() == [("V1", "T1", "F1")]
