"""A real Kafka broker for the suite.

With ``DRIVERSCORE_KAFKA_BOOTSTRAP`` set (CI or a developer's `driverscore kafka up`), the
tests use that broker; otherwise the session starts a single-node KRaft broker with
``adapters/kafka/broker.sh`` (jars fetched from Maven Central once, then cached) and stops
it at the end. Every test uses topics and consumer groups of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from driverscore.adapters.kafka.broker import LocalKafkaBroker, wait_until_ready
from driverscore.adapters.registry import CHAMPION
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.scoring import TripScorer, feature_matrix
from driverscore.pipelines.training_run import open_registry
from driverscore.settings import GateConfig, KafkaConfig, KafkaTopics, Settings, TrainingConfig
from driverscore.simulation import DirtConfig, SimulationConfig, simulate
from driverscore.training.dataset import label_trips, time_split
from driverscore.training.gate import evaluate, run_gate
from driverscore.training.model import train_model
from driverscore.training.onnx_export import export_onnx
from driverscore.training.synthetic import synthetic_trips


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("DRIVERSCORE_KAFKA_BOOTSTRAP")
    if given:
        wait_until_ready(given)
        yield given
        return
    broker = LocalKafkaBroker(tmp_path_factory.mktemp("kafka"))
    bootstrap = broker.up()
    try:
        yield bootstrap
    finally:
        broker.down()


@pytest.fixture
def kafka_config(kafka_bootstrap: str) -> KafkaConfig:
    """Topics, consumer group and broker address no other test shares."""
    run = uuid.uuid4().hex[:8]
    return KafkaConfig(
        bootstrap_servers=kafka_bootstrap,
        topics=KafkaTopics(
            pings=f"pings-{run}",
            dlq=f"pings-dlq-{run}",
            trip_features=f"features-{run}",
            scores=f"scores-{run}",
            alerts=f"alerts-{run}",
        ),
        partitions=2,
        consumer_group=f"stream-{run}",
        grace_s=30.0,
        alert_below_score=70.0,
        processing_guarantee="exactly-once",
    )


CLEAN = DirtConfig.clean()


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A driverscore home whose registry holds a champion trained on synthetic trips."""
    root = tmp_path_factory.mktemp("stream-home")
    settings = Settings(home=root)
    features, incidents = synthetic_trips(3000, seed=11)
    labelled = label_trips(features, incidents, datetime(2026, 5, 20, tzinfo=UTC), 7.0)
    train, holdout = time_split(labelled, 0.25)
    trained = train_model(train, TrainingConfig(max_iter=40, min_samples_leaf=50))
    x = feature_matrix(holdout, trained.feature_names)
    card = trained.model_card(
        cleaning_config=CleaningConfig(),
        trip_config=TripConfig(),
        feature_config=FeatureConfig(),
    )
    metrics = evaluate(
        holdout["incident"].to_numpy(),
        trained.predict_proba(x),
        card.decision_threshold,
        holdout["fleet_id"].to_numpy(),
    )
    report = run_gate(
        metrics, None, GateConfig(min_roc_auc=0.5, max_brier=0.5, max_calibration_error=0.5)
    )
    registered = open_registry(settings).register(
        trained,
        export_onnx(trained, x),
        card,
        report,
        params={},
        data_versions={},
        code_version="test",
        sample=holdout.head(5),
    )
    assert registered.alias == CHAMPION
    return root


@pytest.fixture(scope="session")
def scorer(home: Path) -> TripScorer:
    return open_registry(Settings(home=home)).load_scorer(CHAMPION)


@pytest.fixture(scope="session")
def day_of_pings() -> pl.DataFrame:
    config = SimulationConfig(vehicles=4, days=1, seed=5, dirt=CLEAN)
    return simulate(config).pings
