"""Every scoring path × every rollout mode, on one dirty input, against a real registry.

Paths: batch (``run_scoring``), REST JSON of pings (``/v1/score``), REST fast path (one
feature trip on ``/v1/score``), ``/invocations`` JSON (a batch of feature trips),
``/invocations`` CSV of pings and of features, the stream in process (``TripScoringStep``
through the embedded runner) and the stream through the service. Modes: champion only,
canary, shadow. Two registered models that differ serve as champion and challenger.

Every path must give the same records (identity, probability, score, band, reasons, model
version and role) and the same prediction-log decisions. Independent expectations: the
trips are the ones the input was built with (ids repeat across vehicles; a too-short trip
is set aside by every path), the answering model follows the canary bucket computed here,
and each trip's distance is within a few percent of the path the generator drove. The
batch routes' event points are the trips' event counts, and every stream path draws the
batch's routes.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from httpx import Client
from test_service import serving

from driverscore.adapters.kafka.messages import CLOCK_KEY, encode_batch, encode_clock
from driverscore.adapters.prediction_log import (
    MemoryPredictionLog,
    ParquetPredictionLog,
)
from driverscore.adapters.registry import CHALLENGER, CHAMPION, ModelRegistry
from driverscore.adapters.score_store.duckdb_store import DuckDBScoreStore
from driverscore.adapters.score_store.records import decode_lines
from driverscore.domain.features import MODEL_FEATURES
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.routes import ROUTE_SCHEMA
from driverscore.domain.sessions import MemoryScope, SessionRules, TripAssembler
from driverscore.domain.trip_scoring import TRIP_RECORD_SCHEMA
from driverscore.pipelines.scoring_run import run_scoring
from driverscore.services.api.holder import ModelHolder
from driverscore.services.stream import PingProcessor, PolledModels, StreamMetrics, TripScoringStep
from driverscore.services.stream.remote import RemoteScoring, ScoringClient
from driverscore.services.stream_embedded import MemoryScoreSink, run_embedded_stream
from driverscore.settings import KafkaTopics, ServiceConfig, Settings
from driverscore.training.synthetic import register_synthetic_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
VEHICLES = [f"veh-{i}" for i in range(6)]
SALT = "parity"
POLICIES = {
    "champion": RolloutPolicy(),
    "canary": RolloutPolicy(mode="canary", challenger_percent=50, salt=SALT),
    "shadow": RolloutPolicy(mode="shadow"),
}
#: Columns every path fills the same way (posted features carry no counts).
COMPARED = (
    "vehicle_id",
    "trip_id",
    "driver_id",
    "risk_probability",
    "score",
    "risk_band",
    "reasons",
    "model_version",
    "model_role",
)
DECISION_COLUMNS = (
    "trip_id",
    "vehicle_id",
    "driver_id",
    "rollout_mode",
    "answered_by",
    "champion_version",
    "champion_score",
    "challenger_version",
    "challenger_score",
)


@dataclass(frozen=True)
class Input:
    pings: pl.DataFrame
    #: (vehicle, trip id) → the generator's path length, km (trips long enough to score).
    driven_km: dict[tuple[str, str], float]
    short: tuple[str, str]


def _driver(vehicle: str) -> str:
    return vehicle.replace("veh", "drv")


def dirty_input() -> Input:
    """Two trips per vehicle, ids "1" and "2" on every vehicle; duplicates, a teleport and
    a speed spike inside trips; one trip too short to score."""
    rng = np.random.default_rng(11)
    rows: list[dict[str, Any]] = []
    driven: dict[tuple[str, str], float] = {}
    short = (VEHICLES[-1], "2")
    for v, vehicle in enumerate(VEHICLES):
        for t, trip in enumerate(("1", "2")):
            n = 25 if (vehicle, trip) == short else 300 + 40 * v
            start = START + timedelta(hours=3 * t, minutes=7 * v)
            lat, lon, heading, speed = 48.1 + 0.05 * v, 11.5 + 0.02 * t, 30.0 * v, 8.0
            metres = 0.0
            for i in range(n):
                speed = float(np.clip(speed + rng.normal(0.2, 1.0 + 0.4 * v), 0.0, 33.0))
                if i % 70 == 60:
                    speed = max(speed - 4.0 - v, 0.0)  # braking that grows with the vehicle
                if 120 <= i < 130:
                    heading = (heading + 4.0 + v) % 360.0
                step = speed / 6_371_000.0
                lat += math.degrees(step * math.cos(math.radians(heading)))
                lon += math.degrees(
                    step * math.sin(math.radians(heading)) / math.cos(math.radians(lat))
                )
                metres += speed if i else 0.0
                ping = {
                    "ts": start + timedelta(seconds=i),
                    "vehicle_id": vehicle,
                    "driver_id": _driver(vehicle),
                    "trip_id": trip,
                    "fleet_id": "fleet-a" if v < 3 else "fleet-b",
                    "lat": lat,
                    "lon": lon,
                    "speed_mps": speed,
                    "heading_deg": heading,
                    "speed_limit_mps": 13.9 if v % 2 else None,
                }
                rows.append(ping)
                if i == 40:
                    rows.append(dict(ping))  # duplicate fix
                if i == 80:
                    rows.append(
                        {**ping, "ts": ping["ts"] + timedelta(milliseconds=500), "lat": lat + 0.4}
                    )
                if i == 90:
                    rows.append(
                        {**ping, "ts": ping["ts"] + timedelta(milliseconds=500), "speed_mps": 95.0}
                    )
            if (vehicle, trip) != short:
                driven[(vehicle, trip)] = metres / 1000.0
    frame = pl.DataFrame(
        rows, schema_overrides={"ts": pl.Datetime("us", "UTC")}, infer_schema_length=None
    )
    return Input(frame, driven, short)


def _compared(records: pl.DataFrame) -> pl.DataFrame:
    return records.select(COMPARED).sort("vehicle_id", "trip_id")


def _decisions(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(DECISION_COLUMNS).sort("vehicle_id", "trip_id")


def _records_from_json(scores: list[dict[str, Any]]) -> pl.DataFrame:
    rows = [{k: s[k] for k in COMPARED} for s in scores]
    return pl.DataFrame(rows, schema_overrides={"reasons": pl.List(pl.String)})


@dataclass(frozen=True)
class Backend:
    root: Path
    model_name: str

    def registry(self) -> ModelRegistry:
        return ModelRegistry(
            tracking_uri=f"sqlite:///{self.root / 'mlflow.db'}",
            registry_uri=None,
            model_name=self.model_name,
            experiment_name="parity",
            artifact_location=str(self.root / "artifacts"),
        )

    def settings(self, home: Path, **service: Any) -> Settings:
        return Settings(
            home=home,
            mlflow_tracking_uri=f"sqlite:///{self.root / 'mlflow.db'}",
            model_name=self.model_name,
            experiment_name="parity",
            service=ServiceConfig(**service),
        )


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    backend = Backend(tmp_path_factory.mktemp("parity-mlflow"), "trip-risk-parity")
    registry = backend.registry()
    for seed, max_iter in ((5, 30), (9, 80)):  # two models that differ
        register_synthetic_model(registry, seed=seed, max_iter=max_iter, code_version="test")
    assert registry.alias_version(CHAMPION) == "1"
    assert registry.alias_version(CHALLENGER) == "2"
    return backend


@pytest.fixture(scope="module")
def data() -> Input:
    return dirty_input()


def _bucket(driver: str) -> int:
    digest = hashlib.sha256(f"{SALT}\x00{driver}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000


def _expected_role(mode: str, driver: str) -> str:
    if mode == "canary" and _bucket(driver) < 5_000:
        return "challenger"
    return "champion"


@dataclass
class PathResult:
    records: pl.DataFrame
    decisions: pl.DataFrame
    #: The trips' routes (``ROUTE_SCHEMA``), on the paths that draw them.
    routes: pl.DataFrame | None = None


def _batch(backend: Backend, data: Input, tmp: Path, policy: RolloutPolicy) -> PathResult:
    settings = backend.settings(tmp / "home")
    source = tmp / "pings.parquet"
    data.pings.write_parquet(source)
    result = run_scoring(
        settings,
        pings_uri=str(source),
        out_uri=str(tmp / "scores.parquet"),
        reference_time=datetime(2026, 3, 3, tzinfo=UTC),
        policy=policy,
    )
    log = ParquetPredictionLog(settings.home / "prediction_log").read()
    routes = DuckDBScoreStore(settings.store_path).sql(
        f"SELECT {', '.join(ROUTE_SCHEMA)} FROM trip_routes"
    )
    return PathResult(result.scores, log, routes)


@pytest.fixture(scope="module")
def service(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Client, Path]]:
    home = tmp_path_factory.mktemp("parity-service")
    settings = backend.settings(home, max_pings=2_000)
    with serving(settings, backend.registry) as client:
        yield client, home / "prediction_log"


def _logged_since(log_dir: Path, before: int, expected: int) -> pl.DataFrame:
    """The ``expected`` decisions the service logged after ``before`` rows.

    The service flushes its log once a second on its own thread, so a request's decisions
    may reach the files in more than one part: wait for all of them (or time out, and let
    the comparison show what is missing).
    """
    deadline = time.monotonic() + 15
    while True:
        frame = ParquetPredictionLog(log_dir).read() if log_dir.exists() else pl.DataFrame()
        if frame.height >= before + expected or time.monotonic() > deadline:
            return frame.slice(before) if frame.height else frame
        time.sleep(0.1)


def _ping_bodies(data: Input) -> list[dict[str, Any]]:
    bodies = []
    for (vehicle, trip), group in data.pings.group_by(
        ["vehicle_id", "trip_id"], maintain_order=True
    ):
        pings = group.sort("ts").select(
            pl.col("ts").dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ"),
            "lat",
            "lon",
            "speed_mps",
            "heading_deg",
            "speed_limit_mps",
        )
        bodies.append(
            {
                "trip_id": trip,
                "vehicle_id": vehicle,
                "driver_id": _driver(str(vehicle)),
                "fleet_id": group["fleet_id"][0],
                "pings": [{k: v for k, v in p.items() if v is not None} for p in pings.to_dicts()],
            }
        )
    return bodies


FEATURE_INPUTS = tuple(MODEL_FEATURES)


def _feature_bodies(features: pl.DataFrame) -> list[dict[str, Any]]:
    return [
        {
            "trip_id": row["trip_id"],
            "vehicle_id": row["vehicle_id"],
            "driver_id": row["driver_id"],
            "fleet_id": row["fleet_id"],
            "features": {k: row[k] for k in FEATURE_INPUTS},
        }
        for row in features.iter_rows(named=True)
    ]


def _rest_paths(
    client: Client, log_dir: Path, data: Input, features: pl.DataFrame, policy: RolloutPolicy
) -> dict[str, PathResult]:
    assert client.put("/v1/rollout", json=policy.model_dump()).status_code == 200
    results: dict[str, PathResult] = {}

    def run(name: str, post: Any) -> None:
        before = ParquetPredictionLog(log_dir).read().height if log_dir.exists() else 0
        scores = post()
        results[name] = PathResult(
            _records_from_json(scores), _logged_since(log_dir, before, len(scores))
        )

    def rest_json() -> list[dict[str, Any]]:
        out = []
        for body in _ping_bodies(data):
            response = client.post("/v1/score", json=body)
            if (body["vehicle_id"], body["trip_id"]) == data.short:
                assert response.status_code == 422, response.text
                assert "no trip left to score" in response.text
                continue
            assert response.status_code == 200, response.text
            out.append(response.json())
        return out

    def fast_path() -> list[dict[str, Any]]:
        out = []
        for body in _feature_bodies(features):
            response = client.post("/v1/score", json=body)
            assert response.status_code == 200, response.text
            out.append(response.json())
        return out

    def invocations_json() -> list[dict[str, Any]]:
        response = client.post("/invocations", json={"trips": _feature_bodies(features)})
        assert response.status_code == 200, response.text
        scores: list[dict[str, Any]] = response.json()["scores"]
        return scores

    def invocations_csv_pings() -> list[dict[str, Any]]:
        csv = data.pings.with_columns(
            pl.col("ts").dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ")
        ).write_csv()
        response = client.post("/invocations", content=csv, headers={"content-type": "text/csv"})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["pings_set_aside"], "dirty pings are counted, per reason"
        scores: list[dict[str, Any]] = answer["scores"]
        return scores

    def invocations_csv_features() -> list[dict[str, Any]]:
        csv = features.select(
            "trip_id", "vehicle_id", "driver_id", "fleet_id", *FEATURE_INPUTS
        ).write_csv()
        response = client.post("/invocations", content=csv, headers={"content-type": "text/csv"})
        assert response.status_code == 200, response.text
        scores: list[dict[str, Any]] = response.json()["scores"]
        return scores

    run("rest_json", rest_json)
    run("rest_fast_path", fast_path)
    run("invocations_json", invocations_json)
    run("invocations_csv_pings", invocations_csv_pings)
    run("invocations_csv_features", invocations_csv_features)
    return results


GRACE_S = 30.0


def _stream_step(backend: Backend, policy: RolloutPolicy, **scoring: Any) -> TripScoringStep:
    models = PolledModels(ModelHolder(backend.registry), poll_interval_s=3600.0)
    return TripScoringStep(models, StreamMetrics(), policy=policy, **scoring)


def _in_time_order(data: Input) -> pl.DataFrame:
    return data.pings.sort("ts", "vehicle_id", maintain_order=True)


def _embedded(backend: Backend, data: Input, policy: RolloutPolicy) -> PathResult:
    """The embedded runner: the file replayed through the stream's trip closing."""
    sink, log = MemoryScoreSink(), MemoryPredictionLog()
    step = _stream_step(backend, policy)
    run_embedded_stream(_in_time_order(data), step, sink, grace_s=GRACE_S, prediction_log=log)
    return PathResult(sink.scores, log.read(), _sink_routes(sink))


def _sink_routes(sink: MemoryScoreSink) -> pl.DataFrame:
    return pl.concat([s.routes for s in sink.sessions])


def _processor(backend: Backend, data: Input, policy: RolloutPolicy) -> PathResult:
    """The Kafka processor in process: ping messages in, score and decision messages out."""
    topics = KafkaTopics()
    step = _stream_step(backend, policy)
    card = step.scorer.card
    processor = PingProcessor(
        step,
        TripAssembler(SessionRules.of(card.trip_config.gap_s, GRACE_S), defer=True),
        topics,
        step.metrics,
    )
    scope = MemoryScope()
    out = []
    ordered = _in_time_order(data)
    for offset, start in enumerate(range(0, ordered.height, 25)):
        chunk = ordered.slice(start, 25)
        for (vehicle,), rows in chunk.group_by(["vehicle_id"], maintain_order=True):
            ts_ms = int(rows["ts"].max().timestamp() * 1000)  # type: ignore[union-attr]
            message = encode_batch(str(vehicle), rows.to_dicts())
            out += processor.process(message, str(vehicle), ts_ms, [], scope, f"p/0/{offset}")
    end = ordered["ts"].max() + timedelta(days=1)  # type: ignore[operator]
    out += processor.process(encode_clock(end), CLOCK_KEY, 0, [], scope, "p/0/end")
    out += processor.process(
        encode_clock(end + timedelta(seconds=1)), CLOCK_KEY, 0, [], scope, "p/0/end2"
    )
    scores = [m.value for m in out if m.topic == topics.scores]
    decisions = [m.value for m in out if m.topic == topics.predictions]
    records = pl.read_ndjson(io.BytesIO(b"\n".join(scores)), schema=TRIP_RECORD_SCHEMA)
    logged = pl.read_ndjson(io.BytesIO(b"\n".join(decisions)))
    # Routes as the score sink reads their messages.
    routes, rejects = decode_lines(
        [("routes", m.value) for m in out if m.topic == topics.routes], ROUTE_SCHEMA
    )
    assert rejects.height == 0
    return PathResult(records, logged, routes)


def _through_service(
    backend: Backend, data: Input, policy: RolloutPolicy, client: Client, log_dir: Path
) -> PathResult:
    """The stream scoring through the running service (its rollout, its prediction log)."""
    before = ParquetPredictionLog(log_dir).read().height if log_dir.exists() else 0
    sink = MemoryScoreSink()
    remote = RemoteScoring(ScoringClient(str(client.base_url)))
    try:
        step = _stream_step(backend, policy, scoring=remote)
        run_embedded_stream(_in_time_order(data), step, sink, grace_s=GRACE_S)
    finally:
        remote.close()
    return PathResult(
        sink.scores, _logged_since(log_dir, before, sink.scores.height), _sink_routes(sink)
    )


@pytest.mark.parametrize("mode", list(POLICIES))
def test_every_path_scores_and_logs_the_same(
    mode: str,
    backend: Backend,
    data: Input,
    service: tuple[Client, Path],
    tmp_path: Path,
) -> None:
    policy = POLICIES[mode]
    batch = _batch(backend, data, tmp_path, policy)
    client, log_dir = service
    paths = {"batch": batch, **_rest_paths(client, log_dir, data, batch.records, policy)}
    paths["embedded_runner"] = _embedded(backend, data, policy)
    paths["stream_processor"] = _processor(backend, data, policy)
    paths["stream_through_service"] = _through_service(backend, data, policy, client, log_dir)

    # Independent expectations, on the batch result.
    trips = {(r["vehicle_id"], r["trip_id"]): r for r in batch.records.iter_rows(named=True)}
    assert set(trips) == set(data.driven_km), (
        "each (vehicle, trip id) once; the short one set aside"
    )
    for key, driven in data.driven_km.items():
        assert trips[key]["distance_km"] == pytest.approx(driven, rel=0.05), key
        assert trips[key]["model_role"] == _expected_role(mode, _driver(key[0])), key
        assert trips[key]["model_version"] == (
            "2" if trips[key]["model_role"] == "challenger" else "1"
        )
    decisions = _decisions(batch.decisions)
    assert decisions.height == len(data.driven_km)
    if mode == "champion":
        assert decisions["challenger_version"].null_count() == decisions.height
    else:
        # Both models scored every trip, whichever answered; they differ.
        assert decisions["challenger_score"].null_count() == 0
        assert (decisions["champion_score"] != decisions["challenger_score"]).any()

    # Routes: the batch's event points are its trips' counted events, and every stream
    # path draws the same routes from the same pings.
    assert batch.routes is not None
    batch_routes = batch.routes.sort("vehicle_id", "trip_id")
    points = batch_routes.explode("route").unnest("route")
    per_trip = points.group_by("vehicle_id", "trip_id").agg(
        *(pl.col(c).sum().cast(pl.Int64) for c in ("hard_brake", "harsh_accel", "harsh_corner"))
    )
    counted = batch.records.join(per_trip, on=["vehicle_id", "trip_id"], how="left")
    assert counted.height == len(data.driven_km)
    assert counted["hard_brake"].to_list() == counted["hard_brake_count"].to_list()
    assert counted["harsh_accel"].to_list() == counted["harsh_accel_count"].to_list()
    assert counted["harsh_corner"].to_list() == counted["harsh_corner_count"].to_list()
    assert counted["hard_brake"].sum() > 0 and points["speeding"].any()
    for name in ("embedded_runner", "stream_processor", "stream_through_service"):
        got_routes = paths[name].routes
        assert got_routes is not None
        assert got_routes.sort("vehicle_id", "trip_id").equals(batch_routes), name

    expected_records = _compared(batch.records)
    for name, result in paths.items():
        got = _compared(result.records)
        assert got.select(
            "vehicle_id", "trip_id", "model_version", "model_role", "risk_band", "reasons"
        ).equals(
            expected_records.select(
                "vehicle_id", "trip_id", "model_version", "model_role", "risk_band", "reasons"
            )
        ), name
        for column in ("risk_probability", "score"):
            assert np.allclose(
                got[column].to_numpy(), expected_records[column].to_numpy(), rtol=0, atol=1e-9
            ), (name, column)
        got_decisions = _decisions(result.decisions)
        assert got_decisions.select(DECISION_COLUMNS[:6]).equals(
            decisions.select(DECISION_COLUMNS[:6])
        ), name
        for column in ("champion_score", "challenger_score"):
            assert np.allclose(
                got_decisions[column].fill_null(-1.0).to_numpy(),
                decisions[column].fill_null(-1.0).to_numpy(),
                rtol=0,
                atol=1e-9,
            ), (name, column)


def test_csv_features_are_checked_like_json(service: tuple[Client, Path]) -> None:
    client, _ = service
    row = {k: 1.0 for k in FEATURE_INPUTS} | {"trip_id": "t", "vehicle_id": "v"}
    bad = pl.DataFrame([row | {"distance_km": -5.0, "night_share": 7.0}]).write_csv()
    response = client.post("/invocations", content=bad, headers={"content-type": "text/csv"})
    assert response.status_code == 422, response.text
    fields = {p["field"] for p in response.json()["problems"]}
    assert {"rows.0.features.distance_km", "rows.0.features.night_share"} <= fields
    json_answer = client.post(
        "/invocations",
        json={
            "trip_id": "t",
            "vehicle_id": "v",
            "features": {k: row[k] for k in FEATURE_INPUTS} | {"distance_km": -5.0},
        },
    )
    assert json_answer.status_code == 422
    empty = io.StringIO()
    pl.DataFrame([{k: None for k in row}], schema={k: pl.String for k in row}).write_csv(empty)
    response = client.post(
        "/invocations", content=empty.getvalue(), headers={"content-type": "text/csv"}
    )
    assert response.status_code == 422, response.text


def test_csv_pings_all_set_aside_are_refused_with_counts(service: tuple[Client, Path]) -> None:
    client, _ = service
    csv = (
        "ts,vehicle_id,lat,lon,speed_mps\n"
        "2026-03-02T08:00:00Z,v,95.0,13.4,10\n"
        "2026-03-02T08:00:01Z,v,95.0,13.4,10\n"
    )
    response = client.post("/invocations", content=csv, headers={"content-type": "text/csv"})
    assert response.status_code == 422, response.text
    assert "no trip left to score" in response.text and "2 pings posted" in response.text
