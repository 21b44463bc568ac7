"""Running the built images with buildah: working containers, their volumes and processes,
what they wrote, and the manifests' view of them (tests/container)."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from driverscore.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def storage_driver() -> str:
    """The storage the build script writes the images to: $STORAGE_DRIVER, else the one
    the script picks on this machine (overlay where it mounts, vfs otherwise)."""
    chosen = (
        os.environ.get("STORAGE_DRIVER")
        or subprocess.run(
            ["bash", str(ROOT / "scripts" / "container.sh"), "driver"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.strip()
    )
    assert chosen in {"overlay", "vfs"}, chosen
    return chosen


#: The non-root user of the images and of the manifests' securityContext.
UID = 10001


def buildah(*args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        ["buildah", "--storage-driver", storage_driver(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Images:
    full: str
    serving: str
    #: What the build script printed (sizes, start-to-ready time, build times).
    report: str
    build_s: float


@dataclass(frozen=True)
class Registry:
    """An MLflow server (SQLite, proxied artifacts) holding a champion, and that champion
    exported to a model directory."""

    url: str
    model_dir: Path

    def settings(self, home: Path) -> Settings:
        return Settings(home=home, mlflow_tracking_uri=self.url)


def image_config(image: str) -> dict[str, Any]:
    """The image's Docker configuration (entrypoint, command, user, env, healthcheck)."""
    config: dict[str, Any] = json.loads(buildah("inspect", "--type", "image", image))["Docker"][
        "config"
    ]
    return config


def manifest_mounts(name: str) -> list[str]:
    """Writable mount paths of the Deployment ``name`` in deploy/k8s: where the image may
    write (its root filesystem is read-only there)."""
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and (document["kind"], document["metadata"]["name"]) == (
                "Deployment",
                name,
            ):
                (container,) = document["spec"]["template"]["spec"]["containers"]
                mounts = container["volumeMounts"]
                return [m["mountPath"] for m in mounts if not m.get("readOnly")]
    raise LookupError(name)


#: What buildah itself writes into a container's root filesystem to run it.
_RUNTIME_FILES = ("/run", "/etc/hosts", "/etc/resolv.conf", "/etc/hostname")


def volume(host: Path, path: str, *, read_only: bool = False) -> str:
    """A bind mount of ``host`` at ``path``: created, and owned by the image's user when
    writable (as Kubernetes' fsGroup makes an emptyDir writable)."""
    host.mkdir(parents=True, exist_ok=True)
    if not read_only:
        os.chown(host, UID, UID)
    return f"{host}:{path}" + (":ro" if read_only else "")


class Container:
    """A working container of an image: commands run in it with buildah's chroot isolation,
    as the image's user, each with its own environment and bind-mounted volumes. One per
    image for the session (with vfs storage, making one copies the whole image)."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.name = buildah("from", "--pull-never", image).strip()
        self.config = image_config(image)
        self.mount_points: set[str] = set()
        self.created = time.time()
        self.processes: list[subprocess.Popen[bytes]] = []

    def entrypoint(self, *args: str) -> list[str]:
        """The command the platform runs: the image's entrypoint, then ``args``."""
        return [*self.config["Entrypoint"], *args]

    def _argv(
        self, argv: Sequence[str], env: Mapping[str, str], volumes: Sequence[str]
    ) -> list[str]:
        options = ["--isolation", "chroot"]
        for key, value in env.items():
            options += ["-e", f"{key}={value}"]
        for spec in volumes:
            options += ["-v", spec]
            self.mount_points.add(spec.split(":")[1])
        return [
            "buildah",
            "--storage-driver",
            storage_driver(),
            "run",
            *options,
            self.name,
            "--",
            *argv,
        ]

    def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        volumes: Sequence[str] = (),
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._argv(argv, env or {}, volumes),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(
        self, argv: Sequence[str], env: Mapping[str, str], volumes: Sequence[str], log: Path
    ) -> Process:
        with log.open("wb") as out:
            process = subprocess.Popen(
                self._argv(argv, env, volumes), stdout=out, stderr=subprocess.STDOUT
            )
        self.processes.append(process)
        return Process(process, log, time.monotonic())

    def written_outside(self, allowed: Sequence[str]) -> list[str]:
        """Paths of the root filesystem created or changed since the container was made,
        outside ``allowed`` and the volumes (mount points and their parents are created by
        buildah, as are its files under /run and /etc)."""
        root = Path(buildah("mount", self.name).strip())
        try:
            keep = set(_RUNTIME_FILES)
            for path in [*allowed, *self.mount_points]:
                keep.update(str(p) for p in [Path(path), *Path(path).parents])
            found = subprocess.run(
                ["find", str(root), "-xdev", "-newermt", f"@{self.created}"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            changed = ["/" + str(Path(f).relative_to(root)) for f in found if f != str(root)]
            inside = (*allowed, *self.mount_points, "/run")
            return [
                c
                for c in changed
                if c not in keep and not any(c.startswith(f"{k}/") for k in inside)
            ]
        finally:
            buildah("umount", self.name)

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process)

    def remove(self) -> None:
        self.stop()
        buildah("rm", self.name)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (buildah passes it to the command), then SIGKILL after 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Process:
    popen: subprocess.Popen[bytes]
    log: Path
    spawned_at: float

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def wait_http(url: str, process: Process, timeout_s: float = 180) -> float:
    """Seconds from the process's spawn to the first 200 from ``url``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            pytest.fail(f"container exited ({process.popen.returncode}): {process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - process.spawned_at
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not ready in {timeout_s:.0f} s: {process.tail()}")


def adapter_series() -> dict[str, str]:
    """Autoscaling metric name → the series prometheus-adapter reads (the examples' rules):
    what the running images must expose on /metrics."""
    path = ROOT / "deploy" / "k8s" / "examples" / "prometheus-adapter-rules.yaml"
    (config,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    rules = yaml.safe_load(config["data"]["config.yaml"])
    return {
        rule["name"]["as"]: rule["seriesQuery"].split("{")[0].strip("'\" ")
        for rule in rules["rules"] + rules["externalRules"]
    }
