"""A registered version exported to a directory (SageMaker's /opt/ml/model) and served
from it: same scores as from the registry, and every wrong directory said in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest

from driverscore.adapters.model_dir import (
    CARD_FILE,
    ONNX_FILE,
    VERSION_FILE,
    ModelDirectory,
    export_model,
)
from driverscore.adapters.registry import CHAMPION, ModelRegistry, open_registry
from driverscore.errors import ConfigError, NoModelError
from driverscore.settings import Settings
from driverscore.training.synthetic import register_synthetic_model, synthetic_trips

if TYPE_CHECKING:
    from conftest import ServeProcess

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export-home")
    register_synthetic_model(
        open_registry(Settings(home=root)), trips=1500, max_iter=30, code_version="test"
    )
    return root


@pytest.fixture(scope="module")
def registry(home: Path) -> ModelRegistry:
    return open_registry(Settings(home=home))


def test_exported_directory_scores_as_the_registry(registry: ModelRegistry, tmp_path: Path) -> None:
    exported = export_model(registry, tmp_path / "model")
    directory = ModelDirectory(tmp_path / "model")
    assert (tmp_path / "model" / ONNX_FILE).is_file() and (tmp_path / "model" / CARD_FILE).is_file()
    assert directory.alias_version(CHAMPION) == exported.version == "1"
    assert directory.alias_version("challenger") is None
    assert directory.version_tags("1")["code_version"] == "test"
    (summary,) = directory.list_versions()
    assert summary.gate_status == registry.list_versions()[0].gate_status
    assert summary.metrics == registry.list_versions()[0].metrics

    features, _ = synthetic_trips(50, seed=3)
    at = datetime(2026, 6, 1, tzinfo=UTC)
    from_dir = directory.load_scorer(CHAMPION).score_trips(features, at)
    from_registry = registry.load_scorer(CHAMPION).score_trips(features, at)
    assert from_dir["model_version"].to_list() == from_registry["model_version"].to_list()
    np.testing.assert_array_equal(
        from_dir["risk_probability"].to_numpy(), from_registry["risk_probability"].to_numpy()
    )


def test_tar_gz_export_unpacks_to_the_same_layout(registry: ModelRegistry, tmp_path: Path) -> None:
    export_model(registry, tmp_path / "model.tar.gz", version="1")
    with tarfile.open(tmp_path / "model.tar.gz") as archive:
        assert sorted(archive.getnames()) == sorted([CARD_FILE, VERSION_FILE, ONNX_FILE])
        archive.extractall(tmp_path / "opt-ml-model", filter="data")
    directory = ModelDirectory(tmp_path / "opt-ml-model")
    assert directory.exported.exported_alias is None
    assert directory.load_scorer(CHAMPION).model_version == "1"


def test_export_refuses_a_non_empty_directory_and_an_unknown_version(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export_model(registry, tmp_path / "busy")
    with pytest.raises(NoModelError, match="no version '9'"):
        export_model(registry, tmp_path / "nine", version="9")
    with pytest.raises(NoModelError, match="no version with alias 'challenger'"):
        export_model(registry, tmp_path / "challenger", alias="challenger")


def test_wrong_directories_are_said_in_one_line(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model directory not found"):
        ModelDirectory(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"version\.json: missing"):
        ModelDirectory(tmp_path / "empty")
    export_model(registry, tmp_path / "model")
    version = json.loads((tmp_path / "model" / VERSION_FILE).read_text())
    (tmp_path / "model" / VERSION_FILE).write_text(json.dumps({**version, "format": 2}))
    with pytest.raises(ConfigError, match="format 2, this driverscore reads 1"):
        ModelDirectory(tmp_path / "model")
    (tmp_path / "model" / VERSION_FILE).write_text(json.dumps(version))
    onnx = tmp_path / "model" / ONNX_FILE
    onnx.write_bytes(onnx.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="does not match the sha256"):
        ModelDirectory(tmp_path / "model").load_scorer(CHAMPION)


def test_cli_exports_and_serve_reads_the_directory(
    home: Path, tmp_path: Path, start_serve: Callable[..., ServeProcess]
) -> None:
    env = {"DRIVERSCORE_HOME": str(home), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "driverscore", "export-model", str(tmp_path / "model")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "exported driverscore-trip-risk v1" in done.stdout
    serve = start_serve(SERVICE__MODEL_DIR=str(tmp_path / "model"), SERVICE__AUTH="off")
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{serve.url}/ping", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, serve.log_text()
        assert serve.process.poll() is None, serve.log_text()
        time.sleep(0.3)
    names = ModelDirectory(tmp_path / "model").load_scorer(CHAMPION).card.feature_names
    row = synthetic_trips(1, seed=4)[0].row(0, named=True)
    trip = {"trip_id": "t-1", "vehicle_id": "v-1", "features": {n: row[n] for n in names}}
    answer = httpx.post(f"{serve.url}/invocations", json=trip, timeout=10).json()
    assert answer["model_version"] == "1" and answer["model_role"] == CHAMPION
    # A registry the service never reads: the model directory was the only source.
    assert not (Path(serve.log.parent) / "mlflow").exists()


def test_serve_with_a_directory_holding_no_export_fails_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "driverscore", "serve", "--port", "1"],
        env={
            "DRIVERSCORE_HOME": str(tmp_path),
            "DRIVERSCORE_SERVICE__MODEL_DIR": str(tmp_path),
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "version.json: missing" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


#: Blocks the packages the serving image leaves out (scripts/lockfile.py TRAINING_ONLY), then
#: loads the champion as `serve` does, from the registry and from an exported directory.
_SERVING_WITHOUT_TRAINING = """
import importlib.abc, sys
from pathlib import Path
LEFT_OUT = {"sklearn", "scipy", "skl2onnx", "onnx", "dagster", "dagster_webserver",
            "matplotlib", "flask", "gunicorn", "graphene", "docker"}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in LEFT_OUT:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the serving image)")
sys.meta_path.insert(0, Absent())
from driverscore.adapters.model_dir import ModelDirectory
from driverscore.adapters.registry import open_registry
from driverscore.services.api.runner import run_service
from driverscore.services.stream import build_stream_application
from driverscore.settings import Settings
home, folder = Path(sys.argv[1]), Path(sys.argv[2])
print(open_registry(Settings(home=home)).load_scorer("champion").model_version)
print(ModelDirectory(folder).load_scorer("champion").model_version)
"""


def test_serving_loads_models_without_the_training_packages(
    registry: ModelRegistry, home: Path, tmp_path: Path
) -> None:
    export_model(registry, tmp_path / "model")
    done = subprocess.run(
        [sys.executable, "-c", _SERVING_WITHOUT_TRAINING, str(home), str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1", "1"]
