"""The images of the Dockerfile, built by ``scripts/container.sh`` and run with buildah.

The session builds both images once (layers cached in the machine's container storage, so
a second session reuses them) and runs them as their platforms do: SageMaker's
``docker run <image> serve`` is the image's entrypoint followed by ``serve``, as its
configured user, with the volumes the Kubernetes manifests mount. ``buildah run
--isolation chroot`` shares the host's network, so each container listens on a free port
of its own (``DRIVERSCORE_SERVICE__PORT``; the image's default, 8080, is checked in its
configuration) and reaches the suite's MLflow server and Kafka broker on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from container_support import ROOT, Container, Images, Registry, free_port, storage_driver

from driverscore.adapters.model_dir import export_model
from driverscore.adapters.registry import CHAMPION, open_registry
from driverscore.settings import Settings
from driverscore.training.synthetic import register_synthetic_model


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """Both images, built (or found current in the layer cache) by the one build script."""
    if os.geteuid() != 0:
        # The build and the runs need root (buildah with chroot isolation, vfs storage);
        # CI runs as root. Elsewhere: sudo make test, or pytest -m "not container".
        pytest.skip("the container tests build images with buildah as root; not root here")
    log = tmp_path_factory.mktemp("image-build") / "build.log"
    full = os.environ.get("IMAGE", "localhost/driverscore:test")
    serving = os.environ.get("SERVING_IMAGE", "localhost/driverscore-serving:test")
    env = {
        **os.environ,
        "IMAGE": full,
        "SERVING_IMAGE": serving,
        "STORAGE_DRIVER": storage_driver(),
    }
    start = time.monotonic()
    with log.open("wb") as out:
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "container.sh"), "build"],
            stdout=subprocess.PIPE,
            stderr=out,
            env=env,
            timeout=3600,
            check=False,
        )
    if done.returncode != 0:
        pytest.fail(f"scripts/container.sh build failed:\n{log.read_text()[-4000:]}")
    report = done.stdout.decode()
    # Shown in the run's summary (-rA) and kept with the session's temporary files.
    sys.stderr.write(report)
    return Images(full, serving, report, time.monotonic() - start)


@pytest.fixture(scope="session")
def full(images: Images) -> Iterator[Container]:
    """The session's working container of the full image."""
    container = Container(images.full)
    yield container
    container.remove()


@pytest.fixture(scope="session")
def serving(images: Images) -> Iterator[Container]:
    """The session's working container of the serving image."""
    container = Container(images.serving)
    yield container
    container.remove()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("container-registry")
    port = free_port()
    log = root / "mlflow.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        settings = Settings(home=root / "home", mlflow_tracking_uri=url)
        registered, _ = register_synthetic_model(
            open_registry(settings), trips=2000, max_iter=40, code_version="container-test"
        )
        assert registered.alias == CHAMPION
        model_dir = root / "opt-ml-model"
        export_model(open_registry(settings), model_dir)
        yield Registry(url, model_dir)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
