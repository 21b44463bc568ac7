"""The stream scoring through a real `driverscore serve` process (REST) instead of in-process.

One MLflow registry (SQLite) with a champion and a challenger; the service runs as its own
process (`python -m driverscore serve`, auth on). The embedded stream runner replays a
simulated day twice, in-process and through the service, and must publish the same trips
with the same scores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl
import pytest
from test_service import AUTH, JSON, TOKEN, Backend, _free_port, _register_two

from driverscore.adapters.registry import CHALLENGER, CHAMPION, open_registry
from driverscore.domain.features import FEATURE_COLUMNS
from driverscore.domain.rollout import BUCKETS, RolloutPolicy, canary_bucket, decide
from driverscore.errors import ConfigError, InputDataError, ScoringServiceError
from driverscore.services.stream import (
    ModelSource,
    PolledModels,
    StreamMetrics,
    TripScoringStep,
    stream_models,
    stream_scoring,
)
from driverscore.services.stream.remote import RemoteScoring, ScoringClient
from driverscore.services.stream_embedded import MemoryScoreSink, run_embedded_stream
from driverscore.settings import KafkaConfig, Settings
from driverscore.simulation import DirtConfig, SimulationConfig, simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GRACE_S = 60.0


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    return _register_two(tmp_path_factory.mktemp("stream-remote-mlflow"), "trip-risk-stream-rest")


@pytest.fixture(scope="module")
def day() -> pl.DataFrame:
    return simulate(SimulationConfig(vehicles=4, days=1, seed=5, dirt=DirtConfig.clean())).pings


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=30)


def _start_serve(backend: Backend, home: Path) -> Served:
    port = _free_port()
    env = {
        **os.environ,
        "DRIVERSCORE_HOME": str(home),
        "DRIVERSCORE_MLFLOW_TRACKING_URI": f"sqlite:///{backend.root / 'mlflow.db'}",
        "DRIVERSCORE_MODEL_NAME": backend.model_name,
        "DRIVERSCORE_SERVICE__AUTH": "on",
        "DRIVERSCORE_SERVICE__TOKENS": f'["{TOKEN}"]',
    }
    log = home / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "driverscore", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    served = Served(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 90
    with httpx.Client(base_url=served.url, timeout=5) as probe:
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if probe.get("/readyz").status_code == 200:
                    return served
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)


def _stop(served: Served) -> None:
    served.process.terminate()
    served.process.wait(timeout=30)


@pytest.fixture(scope="module")
def service(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = _start_serve(backend, tmp_path_factory.mktemp("stream-remote-serve"))
    try:
        yield served
    finally:
        _stop(served)


def _settings(backend: Backend, home: Path, **kafka: object) -> Settings:
    return Settings(
        home=home,
        mlflow_tracking_uri=f"sqlite:///{backend.root / 'mlflow.db'}",
        model_name=backend.model_name,
        kafka=KafkaConfig(**kafka),  # type: ignore[arg-type]
    )


def _models(settings: Settings) -> ModelSource:
    return stream_models(settings, lambda: open_registry(settings))


def _replay(settings: Settings, pings: pl.DataFrame) -> tuple[MemoryScoreSink, StreamMetrics]:
    metrics = StreamMetrics()
    scoring = stream_scoring(settings)
    sink = MemoryScoreSink()
    try:
        step = TripScoringStep(_models(settings), metrics, scoring=scoring)
        run_embedded_stream(pings, step, sink, grace_s=GRACE_S)
    finally:
        if isinstance(scoring, RemoteScoring):
            scoring.close()
    return sink, metrics


def _trips(metrics: StreamMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "driverscore_stream_trips_total", {"outcome": outcome}
    )
    return value or 0.0


def test_rest_scoring_equals_in_process_trip_for_trip(
    backend: Backend, service: Served, day: pl.DataFrame, tmp_path: Path
) -> None:
    local, _ = _replay(_settings(backend, tmp_path / "local"), day)
    remote_settings = _settings(
        backend, tmp_path / "rest", scoring_url=service.url, scoring_token=TOKEN
    )
    scoring = stream_scoring(remote_settings)
    assert isinstance(scoring, RemoteScoring)
    scoring.close()
    remote, metrics = _replay(remote_settings, day)

    # Within a batch of trips the order may differ (the in-process split sorts by start).
    expected, got = local.scores.sort("trip_id"), remote.scores.sort("trip_id")
    assert expected.height >= 8
    # Same score-record frame: same columns in the same order, same types.
    assert got.schema == expected.schema
    assert got["trip_id"].to_list() == expected["trip_id"].to_list()
    for column in FEATURE_COLUMNS:
        assert got[column].to_list() == expected[column].to_list(), column
    assert got["risk_probability"].to_list() == expected["risk_probability"].to_list()
    assert got["score"].to_list() == expected["score"].to_list()
    assert got["risk_band"].to_list() == expected["risk_band"].to_list()
    assert got["reasons"].to_list() == expected["reasons"].to_list()
    assert set(got["model_version"]) == {backend.versions[0]}
    assert got["model_version"].to_list() == expected["model_version"].to_list()
    assert got["model_name"].to_list() == expected["model_name"].to_list()
    assert set(got["model_role"]) == {"champion"}
    assert got["scored_at"].null_count() == 0
    # Everything downstream is unchanged: feature rows and alerts of the same trips.
    assert remote.features.sort("trip_id").equals(local.features.sort("trip_id"))
    local_alerts, remote_alerts = local.alerts.sort("trip_id"), remote.alerts.sort("trip_id")
    assert remote_alerts["trip_id"].to_list() == local_alerts["trip_id"].to_list()
    assert remote_alerts["alert"].to_list() == local_alerts["alert"].to_list()
    assert remote.alerts.height > 0
    # The service logs the decisions of what it scores; in process, the stream does.
    assert remote.decisions == []
    assert len(local.decisions) == local.scores.height
    assert _trips(metrics, "scored") == got.height
    assert _trips(metrics, "failed") == 0


def test_the_services_canary_split_names_the_answering_model(
    backend: Backend, service: Served, day: pl.DataFrame, tmp_path: Path
) -> None:
    # A share that puts the lower half of the day's drivers (by canary bucket) on the challenger.
    salt = RolloutPolicy().salt
    buckets = sorted(canary_bucket(str(d), salt) for d in day["driver_id"].unique())
    cut = buckets[len(buckets) // 2]
    policy = RolloutPolicy(mode="canary", challenger_percent=cut / BUCKETS * 100)
    with service.client() as client:
        response = client.put("/v1/rollout", json=policy.model_dump())
        assert response.status_code == 200, response.text
        try:
            remote, _ = _replay(
                _settings(backend, tmp_path, scoring_url=service.url, scoring_token=TOKEN), day
            )
        finally:
            client.put("/v1/rollout", json={"mode": "champion", "challenger_percent": 0})
    registry = backend.registry()
    scorers = {
        "champion": registry.load_scorer(CHAMPION),
        "challenger": registry.load_scorer(CHALLENGER),
    }
    records = remote.scores
    assert records.height >= 8
    roles = set()
    for row in records.iter_rows(named=True):
        answered = decide(policy, row["driver_id"] or row["vehicle_id"], True).answered_by
        assert row["model_role"] == answered, row["trip_id"]
        scorer = scorers[answered]
        assert row["model_version"] == scorer.model_version
        alone = scorer.score_trips(
            remote.features.filter(pl.col("trip_id") == row["trip_id"]), row["scored_at"]
        )
        assert row["score"] == pytest.approx(alone["score"][0], abs=1e-9)
        roles.add(answered)
    assert roles == {"champion", "challenger"}


def test_wrong_or_missing_token_is_a_clear_error(
    backend: Backend, service: Served, day: pl.DataFrame, tmp_path: Path
) -> None:
    for token in ("not-the-token", None):
        settings = _settings(backend, tmp_path, scoring_url=service.url, scoring_token=token)
        with pytest.raises(ScoringServiceError, match=r"refused the stream's token \(HTTP 401\)"):
            _replay(settings, day)


def test_a_service_that_is_down_raises_instead_of_dropping_trips(
    backend: Backend, day: pl.DataFrame, tmp_path: Path
) -> None:
    (tmp_path / "serve").mkdir()
    served = _start_serve(backend, tmp_path / "serve")
    settings = _settings(backend, tmp_path / "stream", scoring_url=served.url, scoring_token=TOKEN)
    scoring = stream_scoring(settings)
    assert isinstance(scoring, RemoteScoring)
    models = _models(settings)  # the registry is up, the service too
    _stop(served)  # ...and then the service goes down
    metrics = StreamMetrics()
    step = TripScoringStep(models, metrics, scoring=scoring)
    sink = MemoryScoreSink()
    with scoring, pytest.raises(ScoringServiceError, match=r"did not score .* after 3 tries"):
        run_embedded_stream(day, step, sink, grace_s=GRACE_S)
    # Nothing was published, and nothing was counted as failed and passed over: the run
    # stops, and a processor would not commit (its trips are scored again after restart).
    assert sink.sessions == []
    assert _trips(metrics, "failed") == 0
    assert _trips(metrics, "scored") == 0


def test_5xx_and_connection_errors_are_retried_then_answered(
    backend: Backend, service: Served, day: pl.DataFrame, tmp_path: Path
) -> None:
    answers = iter([503, "drop"])
    calls: list[str] = []

    with httpx.Client(base_url=service.url, headers=AUTH, timeout=30) as real:

        def flaky(request: httpx.Request) -> httpx.Response:
            what = next(answers, 200)
            calls.append(str(what))
            if what == "drop":
                raise httpx.ConnectError("connection refused", request=request)
            if what == 503:
                return httpx.Response(503, json={"error": "not_ready"})
            forwarded = real.post(request.url.path, content=request.content, headers=JSON)
            return httpx.Response(forwarded.status_code, content=forwarded.content)

        sleeps: list[float] = []
        client = ScoringClient(
            service.url, TOKEN, transport=httpx.MockTransport(flaky), sleep=sleeps.append
        )
        metrics = StreamMetrics()
        sink = MemoryScoreSink()
        with RemoteScoring(client) as scoring:
            step = TripScoringStep(_models(_settings(backend, tmp_path)), metrics, scoring=scoring)
            run_embedded_stream(day, step, sink, grace_s=GRACE_S)
    assert _trips(metrics, "failed") == 0
    # The first request was tried three times (backoff 0.2 s, 0.4 s), the others once.
    assert calls[:3] == ["503", "drop", "200"]
    assert set(calls[3:]) <= {"200"}
    assert sleeps == [0.2, 0.4]
    assert sink.scores.height >= 8


def test_refused_features_fail_those_trips_only(
    backend: Backend, day: pl.DataFrame, tmp_path: Path
) -> None:
    """A 422 is the trips' problem: each session is retried alone, the refused one fails."""
    settings = _settings(backend, tmp_path)
    cards = _models(settings)
    assert isinstance(cards, PolledModels)
    local, _ = _replay(settings, day)
    refused = str(local.scores["trip_id"][0])

    def answer(request: httpx.Request) -> httpx.Response:
        import orjson

        trips = orjson.loads(request.content)["trips"]
        if any(t["trip_id"] == refused for t in trips):
            return httpx.Response(422, json={"error": "invalid_request", "message": "no"})
        scorer = cards.current().champion
        posted = pl.DataFrame(
            {
                "vehicle_id": [t["vehicle_id"] for t in trips],
                "trip_id": [t["trip_id"] for t in trips],
            }
        )
        rows = posted.join(
            local.features, on=["vehicle_id", "trip_id"], how="left", maintain_order="left"
        )
        scored = scorer.score_trips(rows, local.scores["scored_at"][0])
        body = [
            {**r, "scored_at": r["scored_at"].isoformat()} for r in scored.iter_rows(named=True)
        ]
        return httpx.Response(200, content=orjson.dumps({"scores": body}, default=str))

    client = ScoringClient("http://scoring.test", None, transport=httpx.MockTransport(answer))
    metrics = StreamMetrics()
    sink = MemoryScoreSink()
    with RemoteScoring(client) as scoring:
        step = TripScoringStep(cards, metrics, scoring=scoring)
        run_embedded_stream(day, step, sink, grace_s=GRACE_S)
        with pytest.raises(InputDataError, match="HTTP 422"):
            client.score_features(local.features.filter(pl.col("trip_id") == refused))
    assert refused not in sink.scores["trip_id"].to_list()
    assert sink.scores.height == local.scores.height - 1
    assert _trips(metrics, "failed") == 1


def test_rest_scoring_refuses_a_stream_side_split(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        kafka=KafkaConfig(scoring_url="http://127.0.0.1:9", rollout=RolloutPolicy(mode="shadow")),
    )
    with pytest.raises(ConfigError, match="service applies its own rollout"):
        stream_scoring(settings)
