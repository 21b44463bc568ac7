"""`driverscore demo --scenario drift|bad-challenger` from the command line, end to end.

Each scenario runs in a fresh home on embedded defaults (SQLite MLflow, local data store,
DuckDB score store), as from a fresh clone; the registry and its audit log are then read
back to check the story's ending happened, not only that it was printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from driverscore.adapters.registry import CHALLENGER, CHAMPION, PREVIOUS, open_registry
from driverscore.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The issue's budget for one scenario on this machine.
BUDGET_S = 600


def _scenario(home: Path, name: str) -> str:
    env = {**os.environ, "DRIVERSCORE_HOME": str(home), "COLUMNS": "150"}
    done = subprocess.run(
        [sys.executable, "-m", "driverscore", "demo", "--scenario", name],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=BUDGET_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_drift_scenario_ends_in_a_promotion(tmp_path: Path) -> None:
    output = _scenario(tmp_path, "drift")

    assert "retraining requested (trigger monitor_drift)" in output
    assert "decision          promote" in output
    registry = open_registry(Settings(home=tmp_path))
    [move] = [m for m in registry.audit_log() if m.action == "promote" and m.alias == CHAMPION]
    assert move.actor == "decision-job"
    assert registry.alias_version(CHAMPION) == move.to_version == "2"
    assert registry.alias_version(PREVIOUS) == "1"
    assert registry.alias_version(CHALLENGER) is None
    assert move.evidence, "the promotion keeps the numbers it was decided on"


def test_bad_challenger_scenario_ends_in_a_rejection(tmp_path: Path) -> None:
    output = _scenario(tmp_path, "bad-challenger")

    assert "decision          reject" in output
    registry = open_registry(Settings(home=tmp_path))
    [move] = [m for m in registry.audit_log() if m.action == "reject"]
    assert move.actor == "decision-job"
    assert move.from_version == "2"
    # The champion is untouched.
    assert registry.alias_version(CHAMPION) == "1"
    assert registry.alias_version(CHALLENGER) is None
    assert not [m for m in registry.audit_log() if m.action == "promote"]
