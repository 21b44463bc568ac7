"""The built images as their platforms run them: the SageMaker container contract (model
from /opt/ml/model and from the registry), the same scores as `driverscore score`, the
non-root user, writes only where the manifests mount volumes, the stream processor on the
suite's Kafka broker, and the manifests' metric names on the running images' /metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import psutil
import pytest
from confluent_kafka import Consumer
from container_support import (
    ROOT,
    UID,
    Container,
    Images,
    Process,
    Registry,
    adapter_series,
    free_port,
    image_config,
    manifest_mounts,
    stop_process,
    volume,
    wait_http,
)

from driverscore.adapters.kafka.admin import create_topics
from driverscore.adapters.kafka.producer import clock_after, make_producer, replay_pings, send_clock
from driverscore.adapters.registry import CHAMPION, open_registry
from driverscore.domain.prepare import prepare_trips
from driverscore.settings import KafkaConfig, KafkaTopics
from driverscore.simulation import DirtConfig, SimulationConfig, simulate

pytestmark = [pytest.mark.container, pytest.mark.slow]


def _load_lockfile_script() -> Any:
    """scripts/lockfile.py, which the image build runs (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "scripts" / "lockfile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Packages only training needs: in the full image, not in the serving image.
TRAINING = ("sklearn", "skl2onnx", "scipy", "dagster", "onnx")
#: What serving needs, in both.
SERVING = ("fastapi", "uvicorn", "onnxruntime", "polars", "mlflow", "quixstreams", "driverscore")


def test_images_are_configured_as_the_platforms_expect(images: Images) -> None:
    for image in (images.full, images.serving):
        config = image_config(image)
        assert config["Entrypoint"] == ["driverscore"] and config["Cmd"] == ["serve"]
        assert config["User"] == f"{UID}:{UID}"
        assert "8080/tcp" in config["ExposedPorts"]
        env = dict(e.split("=", 1) for e in config["Env"])
        assert env["DRIVERSCORE_SERVICE__PORT"] == "8080"  # SageMaker's port
        assert env["DRIVERSCORE_SERVICE__HOST"] == "0.0.0.0"
        assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    assert "image sizes: full" in images.report and "start-to-ready" in images.report


def _json_printed(container: Container, argv: list[str]) -> dict[str, Any]:
    """What a short command prints as JSON. buildah's chroot runs under load now and then
    return 0 with the child's stdout lost (seen once in a cold CI-like run, never with
    output on a file): an empty answer is asked again, a wrong one is not."""
    for _ in range(3):
        done = container.run(argv)
        assert done.returncode == 0, done.stderr
        if done.stdout.strip():
            return dict(json.loads(done.stdout))
    raise AssertionError(f"{argv[:2]} printed nothing three times; stderr: {done.stderr}")


def _installed(container: Container) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"
    )
    return _json_printed(container, ["python", "-c", script])


def _importable(container: Container, modules: tuple[str, ...]) -> dict[str, bool]:
    script = (
        "import importlib.util as u, json, sys; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in sys.argv[1:]}))"
    )
    return _json_printed(container, ["python", "-c", script, *modules])


def test_images_install_the_lock_and_serving_leaves_training_out(
    full: Container, serving: Container
) -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"] if "version" in p}
    normalize = lambda name: name.replace("_", "-").replace(".", "-")  # noqa: E731
    in_full = {normalize(k): v for k, v in _installed(full).items()}
    in_serving = {normalize(k): v for k, v in _installed(serving).items()}
    # Every installed distribution at the lock's version, and nothing the lock lacks.
    assert {k: v for k, v in in_full.items() if locked.get(k) != v} == {}
    assert {k: v for k, v in in_serving.items() if locked.get(k) != v} == {}
    # The serving image is the full one minus exactly what only training needs.
    excluded = set(_load_lockfile_script().serving_excludes(lock))
    assert set(in_full) - set(in_serving) == excluded & set(in_full)
    assert set(in_serving) <= set(in_full)
    assert _importable(full, TRAINING + SERVING) == dict.fromkeys(TRAINING + SERVING, True)
    assert _importable(serving, TRAINING + SERVING) == {
        **dict.fromkeys(TRAINING, False),
        **dict.fromkeys(SERVING, True),
    }


# -- the SageMaker contract, model in /opt/ml/model, serving image ---------------------------


@dataclass(frozen=True)
class Endpoint:
    url: str
    container: Container
    process: Process
    ready_s: float


def _sagemaker_env(port: int, **extra: str) -> dict[str, str]:
    # SageMaker authenticates callers itself (IAM): the container's own token check is off,
    # as the endpoint's Environment sets it (docs/deployment.md).
    return {
        "DRIVERSCORE_SERVICE__PORT": str(port),
        "DRIVERSCORE_SERVICE__AUTH": "off",
        **extra,
    }


def _start_endpoint(
    container: Container, tmp: Path, env: dict[str, str], model_dir: Path | None
) -> Endpoint:
    # The API Deployment's writable volumes (its root filesystem is read-only).
    volumes = [
        volume(tmp / path.strip("/").replace("/", "-"), path)
        for path in manifest_mounts("driverscore-api")
    ]
    if model_dir is not None:
        volumes.append(volume(model_dir, "/opt/ml/model", read_only=True))
    port = free_port()
    process = container.start(
        container.entrypoint("serve"),  # `docker run <image> serve`
        _sagemaker_env(port, **env),
        volumes,
        tmp / "serve.log",
    )
    url = f"http://127.0.0.1:{port}"
    ready_s = wait_http(f"{url}/ping", process)
    return Endpoint(url, container, process, ready_s)


@pytest.fixture(scope="module")
def sagemaker(
    serving: Container, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Endpoint:
    """The serving image with the champion exported to /opt/ml/model, no registry."""
    return _start_endpoint(
        serving,
        tmp_path_factory.mktemp("sagemaker"),
        {"DRIVERSCORE_SERVICE__MODEL_DIR": "/opt/ml/model"},
        registry.model_dir,
    )


@pytest.fixture(scope="module")
def pings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A day of two vehicles as a canonical CSV ping file."""
    frame = simulate(SimulationConfig(vehicles=2, days=1, seed=21, dirt=DirtConfig.clean())).pings
    path = tmp_path_factory.mktemp("pings") / "pings.csv"
    frame.with_columns(pl.col("ts").dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ")).write_csv(path)
    return path


@pytest.fixture(scope="module")
def batch(registry: Registry, pings: Path, tmp_path_factory: pytest.TempPathFactory) -> Batch:
    """`driverscore score` of the ping file on the host, with the registry the model
    directory was exported from: the records every container answer is compared with."""
    tmp = tmp_path_factory.mktemp("batch")
    out = tmp / "scores.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "driverscore", "score", str(pings), "--out", str(out)],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("DRIVERSCORE_")},
            "DRIVERSCORE_HOME": str(tmp / "home"),
            "DRIVERSCORE_MLFLOW_TRACKING_URI": registry.url,
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    records = {r["trip_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records) >= 2
    return Batch(records, _trip_body(pings, min(records.values(), key=lambda r: r["start_ts"])))


@dataclass(frozen=True)
class Batch:
    records: dict[str, dict[str, Any]]
    #: The first trip as a JSON body of its pings (the file's rows of its vehicle and span).
    first_trip: dict[str, Any]


def _trip_body(pings: Path, record: dict[str, Any]) -> dict[str, Any]:
    frame = pl.read_csv(pings, infer_schema=False)
    start, end = (datetime.fromisoformat(record[k]) for k in ("start_ts", "end_ts"))
    in_trip = frame.filter(pl.col("vehicle_id") == record["vehicle_id"]).filter(
        pl.col("ts").str.to_datetime(time_zone="UTC").is_between(start, end)
    )
    measured = ("lat", "lon", "speed_mps", "heading_deg", "accel_long_mps2", "accel_lat_mps2")
    return {
        "trip_id": record["trip_id"],
        **{k: record[k] for k in ("vehicle_id", "driver_id", "fleet_id", "client_id")},
        "pings": [
            {"ts": row["ts"], **{k: float(row[k]) for k in measured if row[k] not in (None, "")}}
            | ({"speed_limit_mps": float(row["speed_limit_mps"])} if row["speed_limit_mps"] else {})
            for row in in_trip.iter_rows(named=True)
        ],
    }


def test_ping_answers_and_the_service_runs_as_the_non_root_user(sagemaker: Endpoint) -> None:
    response = httpx.get(f"{sagemaker.url}/ping", timeout=5)
    assert response.status_code == 200 and response.json()["ready"] is True
    served = [
        p
        for p in psutil.Process(sagemaker.process.popen.pid).children(recursive=True)
        if "serve" in p.cmdline() and any("driverscore" in a for a in p.cmdline())
    ]
    assert served, "no driverscore serve process under buildah run"
    assert {p.uids().real for p in served} == {UID}
    assert {p.uids().effective for p in served} == {UID}
    print(f"serving image start-to-ready (/opt/ml/model): {sagemaker.ready_s:.1f} s")


def test_invocations_json_and_csv_score_as_driverscore_score(
    sagemaker: Endpoint, batch: Batch, pings: Path
) -> None:
    records = batch.records

    def same(answer: dict[str, Any]) -> None:
        expected = records[answer["trip_id"]]
        for key in ("risk_probability", "score", "risk_band", "reasons", "model_version"):
            assert answer[key] == expected[key], key
        assert answer["model_role"] == CHAMPION
        for name, value in answer["features"].items():
            if isinstance(value, str):  # a word, or a time: the same instant however written
                if value != expected[name]:
                    assert datetime.fromisoformat(value) == datetime.fromisoformat(expected[name])
            else:
                assert value == pytest.approx(expected[name], rel=1e-12, nan_ok=True), name

    # CSV of pings in, JSON out: every trip of the file.
    csv = pings.read_bytes()
    response = httpx.post(
        f"{sagemaker.url}/invocations",
        content=csv,
        headers={"content-type": "text/csv"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    scores = response.json()["scores"]
    assert {s["trip_id"] for s in scores} == set(records)
    for answer in scores:
        same(answer)
    # One trip as JSON, then as a batch.
    body = batch.first_trip
    response = httpx.post(f"{sagemaker.url}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    same(response.json())
    response = httpx.post(f"{sagemaker.url}/invocations", json={"trips": [body]}, timeout=60)
    assert response.status_code == 200, response.text
    same(response.json()["scores"][0])
    # CSV in, CSV out (Accept: text/csv).
    response = httpx.post(
        f"{sagemaker.url}/invocations",
        content=csv,
        headers={"content-type": "text/csv", "accept": "text/csv"},
        timeout=60,
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    table = pl.read_csv(response.content)
    assert sorted(table["trip_id"].to_list()) == sorted(records)
    for row in table.iter_rows(named=True):
        assert row["score"] == pytest.approx(records[row["trip_id"]]["score"], abs=1e-9)


def test_metric_names_of_the_manifests_are_on_the_service_metrics(sagemaker: Endpoint) -> None:
    httpx.get(f"{sagemaker.url}/ping", timeout=5)  # at least one request observed
    text = httpx.get(f"{sagemaker.url}/metrics", timeout=5).text
    series = adapter_series()["driverscore_requests_per_second"]
    assert any(line.startswith(series) for line in text.splitlines()), series


def test_the_service_writes_only_to_the_mounted_volumes(sagemaker: Endpoint) -> None:
    httpx.get(f"{sagemaker.url}/ping", timeout=5)
    sagemaker.container.stop()
    assert sagemaker.container.written_outside(manifest_mounts("driverscore-api")) == []


# -- the registry as the model source, both images --------------------------------------------


@pytest.mark.parametrize("which", ["serving", "full"])
def test_a_model_from_the_registry_uri(
    which: str,
    request: pytest.FixtureRequest,
    registry: Registry,
    batch: Batch,
    tmp_path: Path,
) -> None:
    container: Container = request.getfixturevalue(which)
    endpoint = _start_endpoint(
        container,
        tmp_path,
        {"DRIVERSCORE_MLFLOW_TRACKING_URI": registry.url},
        None,
    )
    response = httpx.post(f"{endpoint.url}/invocations", json=batch.first_trip, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = batch.records[answer["trip_id"]]
    for key in ("risk_probability", "score", "risk_band", "reasons", "model_version"):
        assert answer[key] == expected[key], key
    print(f"{which} image start-to-ready (registry): {endpoint.ready_s:.1f} s")
    stop_process(endpoint.process.popen)


# -- the stream processor, full image, the suite's broker -------------------------------------


@pytest.fixture
def kafka_config(kafka_bootstrap: str) -> KafkaConfig:
    run = os.urandom(4).hex()
    return KafkaConfig(
        bootstrap_servers=kafka_bootstrap,
        topics=KafkaTopics(
            pings=f"pings-{run}",
            dlq=f"pings-dlq-{run}",
            trip_features=f"features-{run}",
            scores=f"scores-{run}",
            alerts=f"alerts-{run}",
            shadow_scores=f"shadow-{run}",
            predictions=f"predictions-{run}",
        ),
        partitions=2,
        consumer_group=f"stream-{run}",
        grace_s=30.0,
        processing_guarantee="exactly-once",
        state_dir=Path("/var/lib/driverscore/stream-state"),
    )


def test_stream_processor_scores_trips_from_the_broker(
    full: Container, registry: Registry, kafka_config: KafkaConfig, tmp_path: Path
) -> None:
    container = full
    # The stream Deployment's writable volumes: the state store goes to the first.
    volumes = [
        volume(tmp_path / path.strip("/").replace("/", "-"), path)
        for path in manifest_mounts("driverscore-stream")
    ]
    create_topics(kafka_config)
    metrics_port = free_port()
    process = container.start(
        container.entrypoint("stream", "--metrics-port", str(metrics_port)),
        {
            "DRIVERSCORE_MLFLOW_TRACKING_URI": registry.url,
            "DRIVERSCORE_KAFKA": kafka_config.model_dump_json(),
        },
        volumes,
        tmp_path / "stream.log",
    )
    frame = simulate(SimulationConfig(vehicles=2, days=1, seed=8, dirt=DirtConfig.clean())).pings
    scorer = open_registry(registry.settings(tmp_path / "home")).load_scorer(CHAMPION)
    card = scorer.card
    now = datetime.now(UTC)
    batch = prepare_trips(frame, card.cleaning_config, card.trip_config, card.feature_config, now)
    expected = scorer.score_trips(batch.features, scored_at=now)
    assert expected.height >= 2

    producer = make_producer(kafka_config.bootstrap_servers)
    result = replay_pings(producer, kafka_config.topics.pings, frame, batch_span_s=20)
    assert result.last_ts is not None
    send_clock(
        producer,
        kafka_config.topics.pings,
        clock_after(result.last_ts, card.trip_config.gap_s, kafka_config.grace_s),
    )
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_config.bootstrap_servers,
            "group.id": f"check-{kafka_config.consumer_group}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([kafka_config.topics.scores])
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 300
    try:
        while len(found) < expected.height and time.monotonic() < deadline:
            assert process.popen.poll() is None, process.tail()
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                record = json.loads(message.value())
                found[record["trip_id"]] = record
    finally:
        consumer.close()
    assert len(found) == expected.height, process.tail()
    for row in expected.iter_rows(named=True):
        record = found[row["trip_id"]]
        assert record["score"] == pytest.approx(row["score"], abs=1e-9)
        assert record["risk_band"] == row["risk_band"]
        assert record["reasons"] == row["reasons"]
        assert record["model_version"] == scorer.model_version
    # Its /metrics carries the series the lag autoscaler example reads.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    series = adapter_series()["driverscore_stream_consumer_lag"]
    assert f"# TYPE {series} gauge" in text
    # The state store is on the mounted volume, where the manifest's state_dir points.
    state = tmp_path / "var-lib-driverscore" / "stream-state"
    assert state.is_dir() and any(state.iterdir())
    container.stop()
    assert container.written_outside(manifest_mounts("driverscore-stream")) == []
