"""Scoring service throughput and latency: driverscore vs ``mlflow models serve`` vs bare ASGI.

Usage::

    .venv/bin/python bench/bench_service.py                 # 8 s per cell
    .venv/bin/python bench/bench_service.py --duration 10

One model is trained on synthetic trips and registered in a temporary MLflow registry
(SQLite) with ``ModelRegistry.register``, as the pipeline does. Three servers, one worker
process each, on 127.0.0.1, one after the other:

- driverscore: ``driverscore serve`` (auth on, JSON request log and prediction log on);
- mlflow: ``mlflow models serve -m models:/<name>/<version> --env-manager local -w 1``,
  the same registered version (sklearn flavour, ``predict_proba``), fed the feature vector
  as ``{"inputs": [[...]]}``;
- bare ASGI: uvicorn (same server stack as driverscore) and an ASGI callable that answers a
  fixed JSON body: the ceiling for any Python service on this machine.

Load comes from ``wrk`` (``apt-get install wrk``) in a separate process, 1 thread, with
keep-alive connections; each cell runs ``--duration`` seconds after a 1 s warm-up. Each
cell also reports the CPU time the server's processes spent per request (user + system,
from psutil): unlike req/s, it hardly depends on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil

MODEL_NAME = "bench-trip-risk"
TOKEN = "bench-token"
FEATURES: dict[str, float] = {
    "distance_km": 12.5,
    "avg_speed_kmh": 41.0,
    "p95_speed_kmh": 63.0,
    "speed_std_kmh": 11.0,
    "hard_brake_per_100km": 4.0,
    "harsh_accel_per_100km": 1.0,
    "harsh_corner_per_100km": 0.5,
    "speeding_share": 0.08,
    "night_share": 0.0,
    "idle_share": 0.1,
    "jerk_rms_mps3": 0.7,
}


# -- the registered model ------------------------------------------------------------------


def register_model(root: Path) -> tuple[str, list[str]]:
    """Train on synthetic trips and register one version; returns it and its feature order."""
    from driverscore.adapters.registry import ModelRegistry
    from driverscore.training.synthetic import register_synthetic_model

    registry = ModelRegistry(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        registry_uri=None,
        model_name=MODEL_NAME,
        experiment_name="bench-service",
        artifact_location=str(root / "artifacts"),
    )
    registered, trained = register_synthetic_model(
        registry,
        lineage={"features": "bench"},
        data_versions={"features": "bench"},
        code_version="bench",
    )
    return registered.version, list(trained.feature_names)


# -- request bodies ------------------------------------------------------------------------


def trip_pings(n: int) -> list[dict[str, Any]]:
    """A 1 Hz urban trip heading north-east with speed changes and a few hard brakes."""
    start = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    speed, lat, lon, heading = 12.0, 52.5, 13.4, 40.0
    pings = []
    for i in range(n):
        speed = max(speed - 5.0, 0.0) if i % 60 == 50 else min(speed + 0.3 * ((i % 7) - 2), 30.0)
        speed = max(speed, 1.0)
        if i % 200 < 10:
            heading = (heading + 6.0) % 360.0
        step = speed / 6_371_000.0
        lat += math.degrees(step * math.cos(math.radians(heading)))
        lon += math.degrees(step * math.sin(math.radians(heading)) / math.cos(math.radians(lat)))
        pings.append(
            {
                "ts": (start + timedelta(seconds=i)).isoformat(),
                "lat": lat,
                "lon": lon,
                "speed_mps": speed,
                "heading_deg": heading,
                "speed_limit_mps": 13.9,
            }
        )
    return pings


def feature_trip(i: int) -> dict[str, Any]:
    return {"trip_id": f"t-{i}", "vehicle_id": f"v-{i % 97}", "features": FEATURES}


# -- servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Server:
    base: str
    pid: int


@contextmanager
def server(
    name: str, argv: list[str], env: dict[str, str], port: int, ready: str, log_dir: Path
) -> Iterator[Server]:
    """Start a server in its own process group, wait for ``ready`` to answer 200, stop it."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(base + ready, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield Server(base, process.pid)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


_FIXED = json.dumps({"score": 87.5, "risk_probability": 0.012, "risk_band": "moderate"}).encode()


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ceiling: read the body, answer a fixed JSON document."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_FIXED)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _FIXED})


def run_bare(port: int) -> None:
    import uvicorn

    uvicorn.run(
        bare_app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="off",
    )


# -- load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    #: CPU time of the server's processes per request (user + system), ms: what a request
    #: costs whatever else runs on the machine.
    cpu_ms: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (mlflow serves from a child)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match[1]) * _UNIT_MS[match[2]]


def wrk(
    srv: Server,
    path: str,
    body: bytes,
    headers: dict[str, str],
    connections: int,
    duration: float,
    tmp: Path,
) -> Cell:
    url = srv.base + path
    body_path = tmp / f"body-{abs(hash(body))}.json"
    body_path.write_bytes(body)
    lines = [
        'wrk.method = "POST"',
        f'local f = io.open("{body_path}", "rb")',
        "wrk.body = f:read('*a')",
        "f:close()",
        *(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()),
        # Count non-2xx as errors (wrk prints them too; this keeps them out of "ok").
    ]
    script = tmp / "post.lua"
    script.write_text("\n".join(lines) + "\n")
    base = ["wrk", "-t1", f"-c{connections}", "-s", str(script), "--latency", url]
    subprocess.run([*base[:3], "-d1s", *base[3:]], check=True, capture_output=True)  # warm-up
    cpu_before = cpu_seconds(srv.pid)
    out = subprocess.run(
        [*base[:3], f"-d{duration:g}s", "--timeout", "10s", *base[3:]],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    cpu = cpu_seconds(srv.pid) - cpu_before
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out)[1])  # type: ignore[index]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out)[1])  # type: ignore[index]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors:.*", out)
    errors = int(non_2xx[1]) if non_2xx else 0
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors[0]))
    cell = Cell(
        rps=rps, p50_ms=p50, p99_ms=p99, errors=errors, cpu_ms=cpu * 1000 / max(requests, 1)
    )
    print(f"  {url} c={connections}: {cell}", flush=True)
    return cell


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per cell")
    parser.add_argument("--bare-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_port:
        run_bare(args.bare_port)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")

    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        version, names = register_model(tmp)
        print(f"registered {MODEL_NAME} v{version} in {time.perf_counter() - t0:.1f} s")
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        # mlflow starts ``uvicorn`` by name: the venv's bin must be on PATH.
        path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}

        single = json.dumps(feature_trip(0)).encode()
        pings = json.dumps({"vehicle_id": "v-1", "pings": trip_pings(600)}).encode()
        batch = json.dumps({"trips": [feature_trip(i) for i in range(1000)]}).encode()
        vector = json.dumps({"inputs": [[FEATURES[n] for n in names]]}).encode()
        json_ct = {"Content-Type": "application/json"}
        auth = {**json_ct, "Authorization": f"Bearer {TOKEN}"}
        d = args.duration
        results: dict[tuple[str, str, int], Cell] = {}

        port = free_port()
        ds_env = {
            **env,
            "DRIVERSCORE_HOME": str(tmp / "home"),
            "DRIVERSCORE_MLFLOW_TRACKING_URI": uri,
            "DRIVERSCORE_MODEL_NAME": MODEL_NAME,
            "DRIVERSCORE_SERVICE__AUTH": "on",
            "DRIVERSCORE_SERVICE__TOKENS": json.dumps([TOKEN]),
        }
        argv = [str(bin_dir / "driverscore"), "serve", "--port", str(port)]
        with server("driverscore", argv, ds_env, port, "/ping", tmp) as srv:
            check = httpx.post(srv.base + "/v1/score", content=pings, headers=auth, timeout=30)
            check.raise_for_status()
            for c in (10, 50):
                results["driverscore", "features", c] = wrk(
                    srv, "/v1/score", single, auth, c, d, tmp
                )
                results["driverscore", "pings", c] = wrk(srv, "/v1/score", pings, auth, c, d, tmp)
            results["driverscore", "batch", 2] = wrk(srv, "/v1/score:batch", batch, auth, 2, d, tmp)

        port = free_port()
        argv = [
            str(bin_dir / "mlflow"),
            *("models", "serve", "-m", f"models:/{MODEL_NAME}/{version}"),
            *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"),
        ]
        with server("mlflow", argv, env, port, "/ping", tmp) as srv:
            url = srv.base + "/invocations"
            check = httpx.post(url, content=vector, headers=json_ct, timeout=30)
            check.raise_for_status()
            for c in (10, 50):
                results["mlflow", "features", c] = wrk(
                    srv, "/invocations", vector, json_ct, c, d, tmp
                )

        port = free_port()
        argv = [sys.executable, str(Path(__file__).resolve()), "--bare-port", str(port)]
        with server("bare", argv, env, port, "/", tmp) as srv:
            for c in (10, 50):
                results["bare", "features", c] = wrk(srv, "/", single, json_ct, c, d, tmp)

    report(results, d)


def report(results: dict[tuple[str, str, int], Cell], duration: float) -> None:
    print(f"\nloopback, 1 worker process per server, wrk -t1, {duration:g} s per cell")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    header = f"{'server':<12} {'request':<28} {'conns':>5} {'req/s':>9} {'trips/s':>9}"
    print(f"{header} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'CPU ms/req':>10}")
    labels = {
        "features": "1 trip from features",
        "pings": "1 trip from 600 pings",
        "batch": "1,000 trips from features",
    }
    order = ["driverscore", "mlflow", "bare"], ["features", "pings", "batch"]
    for (who, what, c), cell in sorted(
        results.items(),
        key=lambda kv: (order[0].index(kv[0][0]), order[1].index(kv[0][1]), kv[0][2]),
    ):
        trips = cell.rps * (1000 if what == "batch" else 1)
        print(
            f"{who:<12} {labels[what]:<28} {c:>5} {cell.rps:>9,.0f} {trips:>9,.0f} "
            f"{cell.p50_ms:>8.2f} {cell.p99_ms:>8.2f} {cell.errors:>6} {cell.cpu_ms:>10.3f}"
        )
    ds50 = results["driverscore", "features", 50]
    ds10 = results["driverscore", "features", 10]
    ml50 = results["mlflow", "features", 50]
    bare50 = results["bare", "features", 50]
    ratio = ds50.rps / ml50.rps
    print()
    print(f"driverscore / mlflow throughput at 50 conns: {ratio:.1f}x (target >= 20x)")
    print(f"driverscore p99 at 10 conns: {ds10.p99_ms:.2f} ms (target < 10 ms)")
    print(f"driverscore / bare ASGI throughput at 50 conns: {ds50.rps / bare50.rps:.0%}")
    print(
        "mlflow / driverscore server CPU per request at 50 conns: "
        f"{ml50.cpu_ms / ds50.cpu_ms:.1f}x ({ml50.cpu_ms:.2f} ms / {ds50.cpu_ms:.3f} ms)"
    )


if __name__ == "__main__":
    main()
