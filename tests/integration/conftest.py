"""Real servers for the suite: moto's S3 API server, ``mlflow server`` and ``driverscore
serve`` processes, each on a free localhost port.

Clients talk to them exactly as to the real deployments (signed HTTP requests through
botocore / s3fs to S3; the MLflow REST API; the service's HTTP API), so the code under test
takes the same path it takes against AWS, MinIO, a tracking server or a container.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_REGION = "us-east-1"
#: Dummy credentials: moto accepts any, and botocore refuses to sign without some.
_ACCESS_KEY = "driverscore-test"
_SECRET_KEY = "driverscore-test-secret"


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 API listens and a bucket created for the session."""

    endpoint_url: str
    bucket: str
    region: str = _REGION

    def storage_options(self) -> dict[str, object]:
        """fsspec/s3fs options, shaped like ``Settings.storage_options()``."""
        return {
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
            "key": _ACCESS_KEY,
            "secret": _SECRET_KEY,
        }

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def fresh_prefix(self, name: str) -> str:
        """A URI under a prefix no other test uses (the server lives for the session)."""
        return self.uri(f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """Start moto's S3 API server on 127.0.0.1 and a free port; stop it after the session.

    Credentials and region are set in the environment for the session (and restored
    after), so boto3 clients and s3fs built without explicit keys also reach it.
    """
    from moto.server import ThreadedMotoServer

    from driverscore.adapters.storage import filesystem

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", _ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", _SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", _REGION)
        # A developer's own profile or session token must not leak into the tests.
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        try:
            host, port = server.get_host_and_port()
            s3 = S3Server(endpoint_url=f"http://{host}:{port}", bucket="driverscore-test")
            fs, _ = filesystem(s3.uri(), s3.storage_options())
            # Not fs.mkdir: s3fs would send LocationConstraint=us-east-1, which S3 refuses.
            fs.call_s3("create_bucket", Bucket=s3.bucket)
            yield s3
        finally:
            server.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class ServeProcess:
    """A ``driverscore serve`` process, where it listens, its log, and when it was spawned."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    spawned_at: float

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start ``driverscore serve`` processes on free ports, configured by ``DRIVERSCORE_*``
    variables (given without the prefix: ``SERVICE__POLL_INTERVAL_S="1"``); all are stopped
    after the test."""
    started: list[ServeProcess] = []

    def start(**settings: str) -> ServeProcess:
        home = tmp_path / f"serve-{len(started)}"
        home.mkdir()
        port = free_port()
        env = {
            **os.environ,
            "DRIVERSCORE_HOME": str(home),
            **{f"DRIVERSCORE_{k}": v for k, v in settings.items()},
        }
        log = home / "serve.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "driverscore", "serve", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        serve = ServeProcess(process, f"http://127.0.0.1:{port}", log, time.monotonic())
        started.append(serve)
        return serve

    try:
        yield start
    finally:
        for serve in started:
            _stop(serve.process)


@dataclass(frozen=True)
class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, proxied artifacts) that a test may kill."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def freeze(self) -> None:
        """Stopped (SIGSTOP): connections are accepted by the kernel but never answered, as
        with a hung server or a network that drops packets."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def kill(self) -> None:
        """Gone at once, as when its host dies: no graceful shutdown. The whole process
        group: ``mlflow server`` serves from child processes (uvicorn, job runners)."""
        _stop_group(self.process, signal.SIGKILL)


def _stop_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group ``process`` leads (started with ``start_new_session``)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    # Whatever of the group outlived its leader (workers, job consumers) goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def start_mlflow_server(tmp_path: Path) -> Iterator[Callable[[], MlflowServer]]:
    """Start ``mlflow server`` processes on free localhost ports; all stopped after the test."""
    started: list[MlflowServer] = []

    def start() -> MlflowServer:
        root = tmp_path / f"mlflow-server-{len(started)}"
        root.mkdir()
        port = free_port()
        log = root / "server.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
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
        server = MlflowServer(process, f"http://127.0.0.1:{port}", log)
        started.append(server)
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log.read_text()}")
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return server
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not up: {log.read_text()}")
            time.sleep(0.5)

    try:
        yield start
    finally:
        for server in started:
            _stop_group(server.process, signal.SIGTERM)


@pytest.fixture(scope="session")
def spark_settings(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Settings of the Spark tests: local mode on 2 cores, few shuffle partitions."""
    from driverscore.settings import Settings

    return Settings(
        home=tmp_path_factory.mktemp("spark-home"),
        spark={"master": "local[2]", "shuffle_partitions": 4, "pings_per_group": 2_000},
    )


@pytest.fixture(scope="session")
def spark(spark_settings: object) -> Iterator[object]:
    """The one SparkSession of the test session (start-up costs tens of seconds)."""
    from driverscore.adapters.spark.session import spark_session
    from driverscore.settings import Settings

    assert isinstance(spark_settings, Settings)
    session = spark_session(spark_settings)
    # Small input splits: the tests' few files still arrive in several Spark partitions.
    session.conf.set("spark.sql.files.maxPartitionBytes", "65536")
    yield session
    session.stop()
