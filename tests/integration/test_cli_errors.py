"""The real command line on things that go wrong: one clear line, the documented exit code.

Every case runs ``python -m driverscore`` in a subprocess, as a user or a scheduler would,
and checks the exit code (1 error, 2 wrong option/setting/mapping, 3 gate failed), that
stderr is a single ``error:`` line naming what and where, and that no traceback shows.
A small simulated fleet, trained once for the module with a gate it passes, serves the
commands that need a champion.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pytest

from driverscore.adapters.registry import open_registry
from driverscore.pipelines.simulation_run import SimulationOutput, write_simulation
from driverscore.settings import Settings
from driverscore.simulation import SimulationConfig

if TYPE_CHECKING:
    from conftest import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI = [sys.executable, "-m", "driverscore"]
FLEET = SimulationConfig(vehicles=20, days=10, seed=3, start=datetime(2026, 1, 1, tzinfo=UTC))
REFERENCE_TIME = (FLEET.start + timedelta(days=FLEET.days)).isoformat()
#: A gate this small fleet passes (its holdout is a few dozen trips): the module's champion.
PASSING_GATE = {
    "DRIVERSCORE_GATE__MIN_ROC_AUC": "0",
    "DRIVERSCORE_GATE__MIN_PR_AUC_LIFT": "0",
    "DRIVERSCORE_GATE__MAX_BRIER": "1",
    "DRIVERSCORE_GATE__MAX_CALIBRATION_ERROR": "1",
}
#: ...and one no model passes: a Brier score is never 0 on real data.
FAILING_GATE = {**PASSING_GATE, "DRIVERSCORE_GATE__MAX_BRIER": "0"}
#: Credentials for the dead-endpoint cases: without them botocore would stop earlier.
S3_KEYS = {
    "DRIVERSCORE_AWS_ACCESS_KEY_ID": "driverscore-test",
    "DRIVERSCORE_AWS_SECRET_ACCESS_KEY": "driverscore-test-secret",
}


def _env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without driverscore settings and AWS credentials."""
    base = {
        k: v for k, v in os.environ.items() if not k.upper().startswith(("DRIVERSCORE_", "AWS_"))
    }
    # No profile, no credentials file, no instance metadata: "no credentials" stays so,
    # and is found at once.
    base.update(
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
        AWS_CONFIG_FILE=str(home / "no-aws-config"),
        AWS_EC2_METADATA_DISABLED="true",
        DRIVERSCORE_HOME=str(home),
        COLUMNS="200",
    )
    return {**base, **(extra or {})}


def _cli(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env=_env(home, env),
        check=False,
        timeout=600,
    )


def _one_error_line(done: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """The single stderr line of a failed command, after checking the promises."""
    output = done.stdout + done.stderr
    assert done.returncode == exit_code, output
    assert "Traceback" not in output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed again: connections are refused


@dataclass(frozen=True)
class Trained:
    fleet: SimulationOutput
    home: Path
    pings_csv: Path
    header_only_csv: Path
    train_output: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("cli")
    fleet = write_simulation(FLEET, str(root / "fleet"), {})
    pings = pl.scan_parquet(f"{fleet.pings_uri}/*.parquet").collect()
    two_vehicles = pings["vehicle_id"].unique().sort().head(2).implode()
    pings_csv = root / "two-vehicles.csv"
    pings.filter(pl.col("vehicle_id").is_in(two_vehicles)).write_csv(pings_csv)
    header_only = root / "header-only.csv"
    header_only.write_text("ts,vehicle_id,lat,lon,speed_mps\n", encoding="utf-8")
    home = root / "home"
    done = _cli(
        home,
        "train",
        "--pings",
        fleet.pings_uri,
        "--labels",
        fleet.incidents_uri,
        "--reference-time",
        REFERENCE_TIME,
        env=PASSING_GATE,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return Trained(fleet, home, pings_csv, header_only, done.stdout)


# -- exit codes of training and scoring ------------------------------------------------


def test_training_says_where_the_quarantine_went(trained: Trained) -> None:
    quarantine = next(
        line for line in trained.train_output.splitlines() if line.startswith("quarantine: ")
    )
    folder = Path(quarantine.removeprefix("quarantine: ").split(" (")[0])
    assert folder.is_dir() and folder.is_relative_to(trained.home)
    assert "rows, each with its reason" in quarantine


def test_scoring_says_where_the_quarantine_went(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    done = _cli(trained.home, "score", str(trained.pings_csv), "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert pl.read_csv(out).height > 0
    assert any(line.startswith("quarantine: /") for line in done.stdout.splitlines())


def test_a_failed_gate_exits_3_with_the_version_recorded(trained: Trained, tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = _cli(
        home,
        "train",
        "--pings",
        trained.fleet.pings_uri,
        "--labels",
        trained.fleet.incidents_uri,
        "--reference-time",
        REFERENCE_TIME,
        env=FAILING_GATE,
    )
    line = _one_error_line(done, 3)
    assert "v1 failed the validation gate" in line
    assert "gate failed" in done.stdout and "Brier" in done.stdout
    registry = open_registry(Settings(home=home))
    assert registry.version_tags("1")["gate_status"] == "failed"
    assert registry.alias_version("champion") is None


def test_two_trainings_started_at_once_on_a_fresh_home_both_register(
    trained: Trained, tmp_path: Path
) -> None:
    home = tmp_path / "fresh-home"
    args = [
        "train",
        "--pings",
        trained.fleet.pings_uri,
        "--labels",
        trained.fleet.incidents_uri,
        "--reference-time",
        REFERENCE_TIME,
    ]
    runs = [
        subprocess.Popen(
            [*CLI, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(home, PASSING_GATE),
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stdout + stderr
        assert "already exists" not in stderr
    registry = open_registry(Settings(home=home))
    # Promotion is serialised too: one became champion, the other challenger.
    assert {registry.alias_version("champion"), registry.alias_version("challenger")} == {
        "1",
        "2",
    }


# -- one clear line ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["import", "train", "score"])
def test_a_header_only_file_is_one_line(trained: Trained, tmp_path: Path, command: str) -> None:
    source = str(trained.header_only_csv)
    args = {
        "import": ["import", source, "--out", str(tmp_path / "pings.parquet")],
        "train": ["train", "--pings", source, "--labels", trained.fleet.incidents_uri],
        "score": ["score", source, "--out", str(tmp_path / "scores.csv")],
    }[command]
    line = _one_error_line(_cli(trained.home, *args), 1)
    assert line == f"error: no pings in {source}: the file has a header and no rows"
    assert not (tmp_path / "scores.csv").exists()


@pytest.mark.parametrize("command", ["import", "import --out", "train", "score", "score --out"])
def test_a_dead_s3_endpoint_is_one_line(trained: Trained, tmp_path: Path, command: str) -> None:
    port = _closed_port()
    local = str(trained.pings_csv)
    args = {
        "import": ["import", "s3://bucket/pings.csv", "--out", str(tmp_path / "p.parquet")],
        "import --out": ["import", local, "--out", "s3://bucket/out/pings.parquet"],
        "train": ["train", "--pings", "s3://bucket/pings", "--labels", "s3://bucket/l.csv"],
        "score": ["score", "s3://bucket/pings.csv", "--out", str(tmp_path / "s.csv")],
        "score --out": ["score", local, "--out", "s3://bucket/out/scores.csv"],
    }[command]
    env = {**S3_KEYS, "DRIVERSCORE_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    line = _one_error_line(_cli(trained.home, *args, env=env), 1)
    assert f"cannot connect to the S3 endpoint http://127.0.0.1:{port} — " in line
    assert "s3://bucket/" in line


@pytest.mark.parametrize("command", ["import", "score --out"])
def test_s3_without_credentials_is_one_line(
    trained: Trained, s3_server: S3Server, tmp_path: Path, command: str
) -> None:
    uri = s3_server.fresh_prefix("no-credentials")
    args = {
        "import": ["import", f"{uri}/pings.csv", "--out", str(tmp_path / "p.parquet")],
        "score --out": ["score", str(trained.pings_csv), "--out", f"{uri}/scores.csv"],
    }[command]
    env = {"DRIVERSCORE_S3_ENDPOINT_URL": s3_server.endpoint_url}
    line = _one_error_line(_cli(trained.home, *args, env=env), 1)
    assert f"error: {uri}/" in line
    assert "no S3 credentials found — set DRIVERSCORE_AWS_ACCESS_KEY_ID" in line


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DRIVERSCORE_SERVICE__TOKENS", "plaintext", "setting DRIVERSCORE_SERVICE__TOKENS: "),
        ("DRIVERSCORE_FEATURES", "{bad", "setting DRIVERSCORE_FEATURES: not valid JSON"),
        ("DRIVERSCORE_MLFLOW_TRACKING_URI", "bogus://x", "DRIVERSCORE_MLFLOW_TRACKING_URI="),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    line = _one_error_line(_cli(tmp_path / "home", "models", env={variable: value}), 2)
    assert expected in line


def test_a_corrupt_registry_database_is_one_line_naming_the_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    database = home / "mlflow" / "mlflow.db"
    database.parent.mkdir(parents=True)
    database.write_bytes(os.urandom(4096))
    line = _one_error_line(_cli(home, "models"), 1)
    assert f"error: {database.resolve()}: not an SQLite database" in line
    assert database.read_bytes() != b"", "the file is left for the user to inspect"


def test_a_mapping_file_that_is_not_utf8_is_one_line(trained: Trained, tmp_path: Path) -> None:
    mapping = tmp_path / "latin1.yaml"
    mapping.write_bytes("columns:\n  ts: heure_détection\n".encode("latin-1"))
    done = _cli(
        trained.home,
        "import",
        str(trained.pings_csv),
        "--mapping",
        str(mapping),
        "--out",
        str(tmp_path / "p.parquet"),
    )
    line = _one_error_line(done, 2)
    assert f"{mapping}: the mapping file is not UTF-8 text" in line


def test_an_unknown_engine_is_one_line_naming_the_choices(tmp_path: Path) -> None:
    done = _cli(
        tmp_path / "home", "score", "pings.parquet", "--out", "x.parquet", "--engine", "dask"
    )
    line = _one_error_line(done, 2)
    assert "--engine: 'dask' is neither embedded nor spark" in line
