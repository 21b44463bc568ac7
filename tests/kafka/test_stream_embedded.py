"""The embedded (Kafka-free) stream runner: same sessions as Quix, same scores as batch.

No broker: these tests only share the registry and pings of the Kafka tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from driverscore.adapters.ping_files import load_canonical_pings
from driverscore.adapters.prediction_log import ParquetPredictionLog
from driverscore.adapters.registry import CHALLENGER, CHAMPION, ModelRegistry, open_registry
from driverscore.domain.features import FEATURE_COLUMNS
from driverscore.domain.mapping import ColumnMapping
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.rollout import RolloutPolicy, decide
from driverscore.domain.scoring import TripScorer
from driverscore.services.api.holder import ModelHolder
from driverscore.services.stream import (
    PolledModels,
    ScoredSession,
    StreamMetrics,
    TripScoringStep,
)
from driverscore.services.stream_embedded import (
    MemoryScoreSink,
    run_embedded_stream,
)
from driverscore.settings import Settings

pytestmark = [pytest.mark.slow]

GAP_MS = 300_000
GRACE_MS = 30_000


def _ping(vehicle: str, ms: int) -> dict[str, Any]:
    return {"ts": ms * 1000, "vehicle_id": vehicle, "lat": 52.0, "lon": 13.0}


def _batch_scores(scorer: TripScorer, pings: pl.DataFrame) -> pl.DataFrame:
    card = scorer.card
    now = datetime.now(UTC)
    prepared = prepare_trips(
        pings, card.cleaning_config, card.trip_config, card.feature_config, now
    )
    return scorer.score_trips(prepared.features, scored_at=now).sort("trip_id")


def _assert_same_scores(got: pl.DataFrame, expected: pl.DataFrame) -> None:
    got = got.sort("trip_id")
    assert expected.height >= 8
    assert got["trip_id"].to_list() == expected["trip_id"].to_list()
    for column in [c for c in FEATURE_COLUMNS if expected.schema[c].is_numeric()]:
        assert got[column].is_null().to_list() == expected[column].is_null().to_list(), column
        assert got[column].drop_nulls().to_list() == pytest.approx(
            expected[column].drop_nulls().to_list(), rel=1e-12, abs=1e-12, nan_ok=True
        ), column
    assert got["score"].to_list() == pytest.approx(expected["score"].to_list(), abs=1e-9)
    assert got["risk_band"].to_list() == expected["risk_band"].to_list()
    assert got["reasons"].to_list() == expected["reasons"].to_list()
    assert got["model_version"].to_list() == expected["model_version"].to_list()


def _with_threshold(scorer: TripScorer, threshold: float) -> TripScorer:
    card = scorer.card.model_copy(update={"decision_threshold": threshold})
    return TripScorer(
        scorer.predict_proba, card, scorer.model_name, scorer.model_version, scorer.model_role
    )


def test_embedded_runner_scores_every_trip_exactly_as_batch_does(
    scorer: TripScorer, day_of_pings: pl.DataFrame, tmp_path: Path
) -> None:
    expected = _batch_scores(scorer, day_of_pings)
    # Alerts for the riskier half of the trips: both sides of the card's threshold.
    scorer = _with_threshold(scorer, float(expected["risk_probability"].median()))  # type: ignore[arg-type]
    sink = MemoryScoreSink()
    step = TripScoringStep(scorer, StreamMetrics())
    log = ParquetPredictionLog(tmp_path / "prediction_log")
    log.setup()
    # Shuffled input: the runner replays in timestamp order whatever the file order.
    result = run_embedded_stream(
        day_of_pings.sample(fraction=1.0, seed=3), step, sink, grace_s=30, prediction_log=log
    )
    assert result.pings == day_of_pings.height
    assert result.trips == expected.height
    _assert_same_scores(sink.scores, expected)
    assert sink.features["trip_id"].sort().to_list() == expected["trip_id"].to_list()
    risky = expected.filter(pl.col("risk_probability") >= scorer.card.decision_threshold)
    assert 0 < risky.height < expected.height
    assert sink.alerts["trip_id"].sort().to_list() == risky["trip_id"].to_list()
    # One decision per trip, in the prediction log as the service writes it.
    decisions = log.read().sort("trip_id")
    assert decisions["trip_id"].to_list() == expected["trip_id"].to_list()
    assert decisions["champion_score"].to_list() == pytest.approx(expected["score"].to_list())
    assert set(decisions["answered_by"]) == {"champion"}
    # Trips close while the replay runs, not only at the end of the file.
    assert result.sessions > len(set(day_of_pings["vehicle_id"]))


def test_speed_paces_the_replay_in_event_time(
    scorer: TripScorer, day_of_pings: pl.DataFrame
) -> None:
    vehicle = day_of_pings["vehicle_id"][0]
    pings = day_of_pings.filter(pl.col("vehicle_id") == vehicle).sort("ts").head(600)
    span_s = (pings["ts"][-1] - pings["ts"][0]).total_seconds()
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    step = TripScoringStep(scorer, StreamMetrics())
    run_embedded_stream(
        pings, step, MemoryScoreSink(), grace_s=30, speed=10.0, sleep=sleep, clock=lambda: now[0]
    )
    assert now[0] == pytest.approx(span_s / 10.0, rel=1e-6)


def test_stream_command_replays_a_file_into_parquet_like_batch(
    home: Path, scorer: TripScorer, day_of_pings: pl.DataFrame, tmp_path: Path
) -> None:
    # Another layout through a column mapping: epoch-second times and km/h speeds.
    raw = day_of_pings.select(
        pl.col("ts").dt.epoch("s").alias("time_s"),
        pl.col("vehicle_id").alias("unit"),
        "lat",
        "lon",
        (pl.col("speed_mps") * 3.6).alias("speed_kmh"),
    )
    raw.write_csv(tmp_path / "pings.csv")
    mapping_yaml = (
        "format: csv\n"
        "columns: {ts: time_s, vehicle_id: unit, speed_mps: speed_kmh}\n"
        "units: {ts: epoch_s, speed_mps: kmh}\n"
    )
    (tmp_path / "mapping.yaml").write_text(mapping_yaml)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIVERSCORE_")}
    env["DRIVERSCORE_HOME"] = str(home)
    out = tmp_path / "stream-out"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "driverscore", "stream", "--source", "file"),
            *(str(tmp_path / "pings.csv"), "--mapping", str(tmp_path / "mapping.yaml")),
            *("--out", str(out)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    canonical, rejected = load_canonical_pings(
        str(tmp_path / "pings.csv"), ColumnMapping.from_yaml_text(mapping_yaml, where="test"), {}
    )
    assert rejected == 0 and canonical.height == day_of_pings.height
    expected = _batch_scores(scorer, canonical)
    got = pl.read_parquet(out / "scores" / "*.parquet")
    _assert_same_scores(got, expected)
    assert got["scored_at"].dtype == pl.Datetime("us", "UTC")
    assert timedelta(0) <= datetime.now(UTC) - got["scored_at"].max() < timedelta(hours=1)  # type: ignore[operator]


def _home_with_a_second_version(home: Path, tmp_path: Path) -> tuple[Settings, ModelRegistry]:
    """A copy of the test home whose registry also holds version 2 (the same model files)."""
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    settings = Settings(home=copy)
    registry = open_registry(settings)
    first = registry.client.get_model_version(registry.model_name, "1")
    registry.client.create_model_version(
        registry.model_name, source=first.source, run_id=first.run_id
    )
    return settings, registry


@dataclass
class _MoveAliasAfter:
    """A sink that moves ``alias`` to version 2 once ``sessions`` sessions were stored."""

    registry: ModelRegistry
    alias: str
    sessions: int
    inner: MemoryScoreSink

    def add(self, scored: ScoredSession) -> None:
        self.inner.add(scored)
        if len(self.inner.sessions) == self.sessions:
            self.registry.set_alias(self.alias, "2")

    def flush(self) -> None:
        self.inner.flush()


def test_a_champion_moved_mid_stream_scores_the_trips_closed_after_the_next_poll(
    home: Path, day_of_pings: pl.DataFrame, tmp_path: Path
) -> None:
    settings, registry = _home_with_a_second_version(home, tmp_path)
    models = PolledModels(ModelHolder(lambda: registry), poll_interval_s=1e-9)
    sink = _MoveAliasAfter(registry, CHAMPION, 3, MemoryScoreSink())
    step = TripScoringStep(models, StreamMetrics())
    run_embedded_stream(day_of_pings, step, sink, grace_s=30, score_batch_trips=1)
    versions = [s.records["model_version"].unique().to_list() for s in sink.inner.sessions]
    assert versions[:3] == [["1"]] * 3
    assert versions[3:] and all(v == ["2"] for v in versions[3:])
    assert set(sink.inner.scores["model_role"]) == {"champion"}
    assert settings.kafka.poll_interval_s > 0


def test_canary_split_answers_each_driver_with_the_model_rollout_decides(
    home: Path, day_of_pings: pl.DataFrame, tmp_path: Path
) -> None:
    _, registry = _home_with_a_second_version(home, tmp_path)
    registry.set_alias(CHALLENGER, "2")
    policy = RolloutPolicy(mode="canary", challenger_percent=50.0)
    models = PolledModels(ModelHolder(lambda: registry), poll_interval_s=3600)
    sink = MemoryScoreSink()
    step = TripScoringStep(models, StreamMetrics(), policy=policy)
    result = run_embedded_stream(day_of_pings, step, sink, grace_s=30)
    scores = sink.scores
    assert scores.height == result.trips
    for driver, role, version in scores.select(
        "driver_id", "model_role", "model_version"
    ).iter_rows():
        wanted = decide(policy, driver, has_challenger=True)
        assert role == wanted.role
        assert version == ("2" if wanted.answered_by == "challenger" else "1")
    assert set(scores["model_role"]) == {"champion", "challenger"}
    assert sink.features["trip_id"].to_list() == scores["trip_id"].to_list()
    # The other model scored every trip too: its records as shadow, both in each decision.
    shadow = sink.shadow
    assert set(shadow["model_role"]) == {"shadow"}
    assert shadow.select("vehicle_id", "trip_id").equals(scores.select("vehicle_id", "trip_id"))
    assert [{"1": "2", "2": "1"}[v] for v in scores["model_version"]] == shadow[
        "model_version"
    ].to_list()
    decisions = sink.decisions
    assert [d.trip_id for d in decisions] == scores["trip_id"].to_list()
    assert all(
        d.rollout_mode == "canary"
        and d.champion_version == "1"
        and d.challenger_version == "2"
        and d.champion_score is not None
        and d.challenger_score is not None
        for d in decisions
    )

    shadow_policy = RolloutPolicy(mode="shadow")
    shadow_sink = MemoryScoreSink()
    step = TripScoringStep(models, StreamMetrics(), policy=shadow_policy)
    run_embedded_stream(day_of_pings, step, shadow_sink, grace_s=30)
    assert set(shadow_sink.scores["model_version"]) == {"1"}
    assert set(shadow_sink.shadow["model_role"]) == {"shadow"}
    assert (
        shadow_sink.shadow["trip_id"].sort().to_list()
        == shadow_sink.scores["trip_id"].sort().to_list()
    )
