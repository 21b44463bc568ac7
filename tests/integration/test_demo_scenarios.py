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

#: The issue's budget for one scenario is 10 minutes on the 2-core machine (about 1.5-2
#: minutes of CPU each); the guard is wider so a machine busy with other jobs does not
#: fail the test, and the story prints the time it took.
BUDGET_S = 1200


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


def test_an_unknown_scenario_is_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "DRIVERSCORE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "driverscore", "demo", "--scenario", "drfit"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error:") and "'drfit'" in line and "drift, bad-challenger" in line
    assert not (tmp_path / "demo").exists(), "nothing was simulated"
