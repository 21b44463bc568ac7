"""What the image build reads from uv.lock (scripts/lockfile.py): the serving image's
exclusions and the locked uv wheel."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _lockfile() -> Any:
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "scripts" / "lockfile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lockfile = _lockfile()


def test_serving_leaves_out_training_and_keeps_what_serving_imports() -> None:
    excluded = set(lockfile.serving_excludes(lockfile.read_lock()))
    assert {"scikit-learn", "scipy", "skl2onnx", "onnx", "dagster", "dagster-webserver"} <= excluded
    kept = {
        "fastapi",
        "uvicorn",
        "uvloop",
        "onnxruntime",
        "numpy",
        "polars",
        "pyarrow",
        "pandas",
        "mlflow",
        "mlflow-skinny",
        "sqlalchemy",
        "quixstreams",
        "confluent-kafka",
        "s3fs",
        "prometheus-client",
        "httpx",
    }
    assert kept.isdisjoint(excluded)


def _package(name: str, *deps: str, **extras: list[str]) -> dict[str, Any]:
    package: dict[str, Any] = {"name": name, "dependencies": [{"name": d} for d in deps]}
    if extras:
        package["optional-dependencies"] = {
            extra: [{"name": d} for d in names] for extra, names in extras.items()
        }
    return package


def test_a_package_serving_also_reaches_is_kept() -> None:
    lock = {
        "package": [
            _package(lockfile.PROJECT, "scikit-learn", "web"),
            _package("scikit-learn", "scipy", "numpy"),
            _package("scipy", "numpy"),
            _package("numpy"),
            # web[fast] pulls in a package only through an extra.
            {
                **_package("web", "numpy"),
                "optional-dependencies": {"fast": [{"name": "speedups"}]},
            },
            _package("speedups"),
        ]
    }
    lock["package"][0]["dependencies"][1]["extra"] = ["fast"]
    assert lockfile.serving_excludes(lock) == ["scikit-learn", "scipy"]


def _wheels(*names: str) -> list[dict[str, Any]]:
    return [{"url": f"https://files.example/{n}", "hash": "sha256:00"} for n in names]


def test_the_glibc_wheel_of_the_machine_is_chosen() -> None:
    wheels = _wheels(
        "uv-1.0-py3-none-musllinux_1_1_x86_64.whl",
        "uv-1.0-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64.whl",
        "uv-1.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    )
    assert lockfile._wheel_for_machine(wheels, "x86_64")["url"].endswith("manylinux2014_x86_64.whl")
    assert "aarch64" in lockfile._wheel_for_machine(wheels, "aarch64")["url"]
    with pytest.raises(SystemExit, match="no manylinux wheel of uv for riscv64"):
        lockfile._wheel_for_machine(wheels, "riscv64")


def _wheel_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("uv-1.0.data/scripts/uv", b"#!uv binary")
    return buffer.getvalue()


class _Response(io.BytesIO):
    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@pytest.mark.parametrize("tampered", [False, True])
def test_uv_is_written_only_when_its_hash_matches_the_lock(
    tampered: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _wheel_bytes()
    digest = hashlib.sha256(data + (b"x" if tampered else b"")).hexdigest()
    name = "uv-1.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    lock = {
        "package": [
            {
                "name": "uv",
                "version": "1.0",
                "wheels": [{"url": f"https://files.example/{name}", "hash": f"sha256:{digest}"}],
            }
        ]
    }
    monkeypatch.setattr(lockfile.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(lockfile.urllib.request, "urlopen", lambda *a, **k: _Response(data))
    dest = tmp_path / "uv"
    if tampered:
        with pytest.raises(SystemExit, match=r"does not match the hash in uv\.lock"):
            lockfile.install_uv(lock, dest)
        assert not dest.exists()
    else:
        lockfile.install_uv(lock, dest)
        assert dest.read_bytes() == b"#!uv binary" and dest.stat().st_mode & 0o111
