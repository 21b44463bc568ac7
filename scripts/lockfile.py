"""What the image build reads from ``uv.lock``, with the standard library only (it runs on a
bare base image, before any package is installed).

    python3 scripts/lockfile.py uv DEST            install the locked uv wheel's binary at DEST
    python3 scripts/lockfile.py serving-excludes   uv sync options that leave out the
                                                   packages only training needs

``uv``: the wheel is the one the lock pins for this machine (URL and sha256 from the lock,
the hash checked before anything is written), so the Debian-made base, which has no pip,
and the public python base get the same uv the same way.

``serving-excludes``: the serving image is the full install minus the packages reachable
only through :data:`TRAINING_ONLY` (computed over the lock's dependency graph, so a package
that serving also needs stays).
"""

from __future__ import annotations

import hashlib
import io
import platform
import sys
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

LOCK = Path(__file__).resolve().parents[1] / "uv.lock"
PROJECT = "driverscore"

#: Roots of what only training, the pipeline orchestrator and the MLflow server need: fitting
#: and converting models (scikit-learn, skl2onnx, onnx), Dagster, and the packages MLflow
#: pulls in for its server and plots. The service reads the registry with MLflow's client,
#: which imports none of them (tests/unit/test_container_build.py checks it).
TRAINING_ONLY = frozenset(
    {
        "scikit-learn",
        "scipy",
        "skl2onnx",
        "onnx",
        "dagster",
        "dagster-webserver",
        "matplotlib",
        "flask",
        "gunicorn",
        "graphene",
        "docker",
    }
)


def read_lock(path: Path = LOCK) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _packages(lock: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in lock["package"]}


def _edges(package: Mapping[str, Any], extras: Iterable[str] = ()) -> set[tuple[str, str]]:
    """(dependency, extra) pairs of ``package`` with the optional groups ``extras``."""
    deps = list(package.get("dependencies", []))
    for extra in extras:
        deps += package.get("optional-dependencies", {}).get(extra, [])
    edges: set[tuple[str, str]] = set()
    for dep in deps:
        edges.add((dep["name"], ""))
        edges.update((dep["name"], e) for e in dep.get("extra", []))
    return edges


def runtime_closure(lock: Mapping[str, Any], stop: frozenset[str] = frozenset()) -> set[str]:
    """Every package the project's runtime dependencies (no extras) reach, not walking
    into ``stop``. Conservative: every marker is taken as true."""
    packages = _packages(lock)
    seen: set[tuple[str, str]] = set()
    todo = [e for e in _edges(packages[PROJECT]) if e[0] not in stop]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        package = packages[name]
        todo += [
            e
            for e in _edges(package, [extra] if extra else [])
            if e[0] not in stop and e not in seen
        ]
    return {name for name, _ in seen}


def serving_excludes(lock: Mapping[str, Any]) -> list[str]:
    """Packages of the full install that the serving image leaves out, sorted."""
    return sorted(runtime_closure(lock) - runtime_closure(lock, TRAINING_ONLY))


def _wheel_for_machine(wheels: list[dict[str, Any]], machine: str) -> dict[str, Any]:
    """The glibc Linux wheel for ``machine`` (x86_64, aarch64...)."""
    for wheel in wheels:
        name = wheel["url"].rsplit("/", 1)[-1]
        tags = name.removesuffix(".whl").split("-")[-1].split(".")
        if any(t.startswith("manylinux") and t.endswith(f"_{machine}") for t in tags):
            return wheel
    raise SystemExit(f"lockfile: uv.lock has no manylinux wheel of uv for {machine}")


def install_uv(lock: Mapping[str, Any], dest: Path) -> None:
    """Download the locked uv wheel for this machine, check its hash, write its binary."""
    uv = _packages(lock)["uv"]
    wheel = _wheel_for_machine(uv["wheels"], platform.machine())
    with urllib.request.urlopen(wheel["url"], timeout=120) as response:
        data = response.read()
    algorithm, expected = wheel["hash"].split(":", 1)
    if hashlib.new(algorithm, data).hexdigest() != expected:
        raise SystemExit(f"lockfile: {wheel['url']} does not match the hash in uv.lock")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        binary = next(n for n in archive.namelist() if n.endswith(".data/scripts/uv"))
        dest.write_bytes(archive.read(binary))
    dest.chmod(0o755)
    print(f"uv {uv['version']} from uv.lock → {dest}")


def main(argv: list[str]) -> None:
    if argv[:1] == ["uv"] and len(argv) == 2:
        install_uv(read_lock(), Path(argv[1]))
    elif argv == ["serving-excludes"]:
        print(" ".join(f"--no-install-package {name}" for name in serving_excludes(read_lock())))
    else:
        raise SystemExit("usage: lockfile.py uv DEST | lockfile.py serving-excludes")


if __name__ == "__main__":
    main(sys.argv[1:])
