"""`driverscore superset` without a Superset running: the bundle's zips, and what goes wrong
is one line with the documented exit code."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from driverscore.adapters.superset.local import LocalSuperset, SupersetError

CLI = [sys.executable, "-m", "driverscore"]


def _run(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DRIVERSCORE_")}
    return subprocess.run(
        [*CLI, "superset", *args],
        env={**base, "DRIVERSCORE_HOME": str(home), **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_bundle_writes_one_importable_zip_per_engine(tmp_path: Path) -> None:
    done = _run(
        tmp_path / "home",
        "bundle",
        "--out",
        str(tmp_path / "out"),
        DRIVERSCORE_STORE__DRUID__URL="http://127.0.0.1:8082",
    )
    assert done.returncode == 0, done.stderr
    zips = sorted(Path(line) for line in done.stdout.split())
    assert [z.name for z in zips] == [
        "driverscore_superset_druid.zip",
        "driverscore_superset_duckdb.zip",
    ]
    with zipfile.ZipFile(zips[1]) as archive:
        names = archive.namelist()
    assert any(n.endswith("dashboards/driverscore-duckdb.yaml") for n in names)
    assert not any("druid" in n for n in names)


def test_a_wrong_engine_is_one_line_exit_2(tmp_path: Path) -> None:
    done = _run(tmp_path, "up", "--engine", "grafana")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --engine 'grafana': use auto, duckdb, druid or both"
    ]


def test_status_of_a_home_without_superset_exits_1(tmp_path: Path) -> None:
    done = _run(tmp_path, "status")
    assert done.returncode == 1
    assert "superset: not running at http://127.0.0.1:8088" in done.stdout
    assert "Traceback" not in done.stderr


def test_down_without_superset_says_so(tmp_path: Path) -> None:
    done = _run(tmp_path, "down")
    assert done.returncode == 0
    assert done.stdout.strip() == "Superset was not running"


def test_start_on_a_taken_port_names_the_port_and_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        local = LocalSuperset(tmp_path, tmp_path / "venv", port=port)
        with pytest.raises(SupersetError, match=rf"port {port} .* DRIVERSCORE_SUPERSET__PORT"):
            local.start()
