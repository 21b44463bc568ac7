"""Settings, built once per entry point and passed down (nothing reads the environment later).

Every field can be set with an environment variable ``DRIVERSCORE_<FIELD>``; nested
fields use ``__`` (for example ``DRIVERSCORE_FEATURES__HARD_BRAKE_MPS2=3.5``).
"""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path
from typing import Any, Final, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.decision import DecisionConfig
from driverscore.domain.drift import MonitoringConfig
from driverscore.domain.rollout import RolloutPolicy
from driverscore.errors import ConfigError

ENV_PREFIX: Final = "DRIVERSCORE_"
_NESTED: Final = "__"
_FIELD_IN_MESSAGE: Final = re.compile(r'field "([^"]+)"')
_CONTAINERS: Final = (list, dict, set, frozenset, tuple)


class GateConfig(BaseModel):
    """Minimums a candidate model must meet before it may serve."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_roc_auc: float = Field(0.70, ge=0, le=1)
    min_pr_auc_lift: float = Field(
        1.5,
        ge=0,
        description="PR-AUC must be at least this multiple of the holdout's positive rate.",
    )
    max_brier: float = Field(0.10, ge=0, le=1)
    max_calibration_error: float = Field(
        0.05, ge=0, le=1, description="Expected calibration error over 10 quantile bins."
    )
    champion_tolerance: float = Field(
        0.01, ge=0, description="A candidate may trail the champion's ROC-AUC by at most this."
    )
    min_slice_trips: int = Field(
        200, ge=1, description="Per-fleet metrics are reported for fleets with this many trips."
    )


class TrainingConfig(BaseModel):
    """How the model is trained."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    validation_fraction: float = Field(
        0.25, gt=0, lt=1, description="Newest share of trips held out."
    )
    label_maturity_days: float = Field(
        7.0,
        ge=0,
        description=(
            "Trips younger than this are left out of training: their claims may be pending."
        ),
    )
    max_rejected_label_share: float = Field(
        0.01,
        ge=0,
        le=1,
        description=(
            "Training refuses when a larger share of claim rows is rejected (times that do "
            "not parse or are missing, no vehicle, reported before the incident)."
        ),
    )
    max_iter: int = Field(200, ge=10)
    learning_rate: float = Field(0.05, gt=0, le=1)
    max_leaf_nodes: int = Field(15, ge=2)
    min_samples_leaf: int = Field(100, ge=1)
    random_seed: int = 7


class ServiceConfig(BaseModel):
    """The scoring service (`driverscore serve`): binding, security, models and rollout."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 for all.")
    port: int = Field(8080, ge=1, le=65535, description="TCP port (8080: SageMaker contract).")
    auth: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Bearer-token auth; auto: on unless bound to localhost only.",
    )
    tokens: list[SecretStr] = Field(default_factory=list, description="Accepted bearer tokens.")
    token_file: Path | None = Field(
        None, description="File with one accepted bearer token per line (added to tokens)."
    )
    max_body_bytes: int = Field(
        8_000_000, ge=1024, description="Larger request bodies are refused (bytes)."
    )
    max_pings: int = Field(50_000, ge=1, description="Most pings accepted for one trip.")
    max_trips: int = Field(1_000, ge=1, description="Most trips accepted in one batch request.")
    max_future_s: float = Field(
        300.0, ge=0, description="Pings later than now plus this are refused (s)."
    )
    model_dir: Path | None = Field(
        None,
        description=(
            "Serve the version exported to this directory (driverscore export-model; "
            "SageMaker mounts it at /opt/ml/model) instead of reading the registry."
        ),
    )
    poll_interval_s: float = Field(
        30.0, gt=0, description="How often the registry is checked for moved aliases (s)."
    )
    registry_timeout_s: int = Field(
        5,
        ge=1,
        description=(
            "Timeout of each HTTP call to an MLflow server registry (whole seconds); "
            "MLFLOW_HTTP_REQUEST_TIMEOUT, when set, wins."
        ),
    )
    registry_retries: int = Field(
        1,
        ge=0,
        le=10,
        description=(
            "Retries of a failed registry HTTP call before the poll counts as failed; "
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES, when set, wins."
        ),
    )
    rollout_reload_s: float = Field(
        1.0, gt=0, description="How often the rollout file is checked for changes (s)."
    )
    rollout_mode: Literal["champion", "canary", "shadow"] = Field(
        "champion", description="Initial champion/challenger split (see domain/rollout.py)."
    )
    challenger_percent: float = Field(
        0.0, ge=0, le=100, description="Canary: share of drivers answered by the challenger (%)."
    )
    rollout_file: Path | None = Field(
        None,
        description=(
            "JSON rollout policy re-read every rollout_reload_s: the split changes without "
            "restart, whatever the registry's state."
        ),
    )
    prediction_log: Literal["parquet", "kafka"] = Field(
        "parquet",
        description=(
            "Where rollout decisions go: Parquet parts under prediction_log_dir, or the "
            "kafka.topics.predictions topic at kafka.bootstrap_servers."
        ),
    )
    prediction_log_dir: Path | None = Field(
        None, description="Where rollout decisions are logged (default: <home>/prediction_log)."
    )


class KafkaTopics(BaseModel):
    """Topic names of the streaming contract (docs/streaming.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pings: str = Field("telematics.pings", description="Ping messages, key: vehicle id.")
    dlq: str = Field(
        "telematics.pings.dlq", description="Rejected messages: original bytes + reason."
    )
    trip_features: str = "driverscore.trip-features"
    scores: str = "driverscore.scores"
    alerts: str = "driverscore.alerts"
    predictions: str = Field(
        "driverscore.predictions",
        description="The service's rollout decisions when service.prediction_log is kafka.",
    )
    shadow_scores: str = Field(
        "driverscore.shadow-scores",
        description="Shadow mode: the challenger's score records (role shadow), key: vehicle.",
    )
    routes: str = Field(
        "driverscore.trip-routes",
        description="Each scored trip's thinned route (domain/routes.py), key: vehicle.",
    )


#: ``KafkaConfig.commit_interval_s`` when it is not set, by processing guarantee.
AT_LEAST_ONCE_COMMIT_INTERVAL_S: Final = 0.2
#: Exactly-once outputs are readable only at their transaction's commit: the interval is
#: most of a trip's close → score latency (p99 at 50k pings/s in 50-ping messages, here:
#: 460-880 ms at 0.2 s, 340-430 ms at 0.1 s; docs/streaming.md).
EXACTLY_ONCE_COMMIT_INTERVAL_S: Final = 0.1


class KafkaConfig(BaseModel):
    """Kafka connection, topics and the stream processor's knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _commit_interval_of_the_guarantee(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("commit_interval_s") is None:
            exactly_once = data.get("processing_guarantee") == "exactly-once"
            interval = (
                EXACTLY_ONCE_COMMIT_INTERVAL_S if exactly_once else AT_LEAST_ONCE_COMMIT_INTERVAL_S
            )
            data = {**data, "commit_interval_s": interval}
        return data

    bootstrap_servers: str = Field("127.0.0.1:9092", description="host:port[,host:port...]")
    topics: KafkaTopics = KafkaTopics()
    partitions: int = Field(3, ge=1, description="Partitions of every topic `kafka init` creates.")
    replication_factor: int = Field(1, ge=1)
    retention_hours: float = Field(
        168.0, gt=0, description="Retention of every topic `kafka init` creates (hours)."
    )
    consumer_group: str = "driverscore-stream"
    grace_s: float = Field(
        60.0, ge=0, description="Extra wait for late pings before a trip closes (s)."
    )
    processing_guarantee: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once",
        description=(
            "exactly-once: outputs and state commit in Kafka transactions "
            "(read them with isolation.level=read_committed)."
        ),
    )
    commit_interval_s: float = Field(
        AT_LEAST_ONCE_COMMIT_INTERVAL_S,
        gt=0,
        description=(
            "How often offsets, state and transactions are committed (s); unset: 0.2 "
            "at-least-once, 0.1 exactly-once (where outputs are readable only at a commit)."
        ),
    )
    session_timeout_s: float = Field(
        45.0,
        ge=6,
        le=300,
        description=(
            "A processor silent this long leaves the consumer group and its partitions move "
            "to the others (s)."
        ),
    )
    score_batch_trips: int = Field(
        200, ge=1, description="Closed trips are scored together once this many are waiting."
    )
    score_batch_wait_s: float = Field(
        0.1, ge=0, description="...or once the first of them has waited this long (s)."
    )
    score_catch_up_wait_s: float = Field(
        1.0,
        ge=0,
        description=(
            "...or this long while the processor is catching up: the message in hand was "
            "written at least this long ago, so its trips are late already and bigger "
            "batches score the backlog faster (s)."
        ),
    )
    score_at_commit: bool = Field(
        True,
        description=(
            "exactly-once: closed trips wait for the checkpoint's commit (when their outputs "
            "become readable) and every partition's are scored in one batch just before it."
        ),
    )
    closed_at_header: bool = Field(
        False,
        description=(
            "Add the header driverscore.closed_ms to trip outputs: the Kafka timestamp of the "
            "message at which the trip closed (close → score latency, the batch wait included)."
        ),
    )
    state_dir: Path | None = Field(
        None, description="Stream state (RocksDB) folder (default: <home>/stream-state)."
    )
    model_alias: str = Field("champion", description="Registry alias of the scoring model.")
    poll_interval_s: float = Field(
        30.0, gt=0, description="How often the stream re-checks the champion/challenger aliases."
    )
    rollout: RolloutPolicy = Field(
        default_factory=RolloutPolicy,
        description="Champion/challenger split of the stream (domain/rollout.py).",
    )
    scoring_url: str | None = Field(
        None,
        description=(
            "Score closed trips through this scoring service (`driverscore serve`, e.g. "
            "http://127.0.0.1:8080) instead of in-process; None: in-process ONNX."
        ),
    )
    scoring_token: SecretStr | None = Field(
        None, description="Bearer token sent to the scoring service."
    )
    scoring_timeout_s: float = Field(
        10.0, gt=0, description="Timeout of one request to the scoring service (s)."
    )
    scoring_max_trips: int = Field(
        1_000,
        ge=1,
        description="Most trips in one request to the scoring service (its max_trips).",
    )


class DruidConfig(BaseModel):
    """Apache Druid, the score store at scale (docs/store.md): where it answers SQL, what its
    datasources are called, and the local single-machine Druid of `driverscore druid`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = Field(
        None,
        description=(
            "Druid broker or router answering SQL, e.g. http://127.0.0.1:8082 (default: the "
            "local Druid that `driverscore druid up` recorded under <home>/druid)."
        ),
    )
    overlord_url: str | None = Field(
        None,
        description=(
            "Druid overlord for the Kafka supervisors (default: the local Druid's coordinator, "
            "which runs as overlord)."
        ),
    )
    trips_datasource: str = Field(
        "driverscore_trips", description="Trip-level datasource fed from the scores topic."
    )
    alerts_datasource: str = Field(
        "driverscore_alerts", description="Alert records fed from the alerts topic."
    )
    hourly_datasource: str = Field(
        "driverscore_scores_hourly",
        description="Hourly rollup per fleet, client, vehicle and model version.",
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one Druid SQL request (s).")
    heap: str = Field("512m", description="-Xmx of each local Druid process.")


class TriggerConfig(BaseModel):
    """What starts the closed loop's Dagster jobs (pipelines/triggers.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    new_data: Literal["schedule", "immediate"] = Field(
        "schedule",
        description=(
            "New raw data trains on the daily/weekly schedule, or at once (the retrain "
            "sensor's next tick)."
        ),
    )
    retrain_on_verdicts: tuple[Literal["drift", "degraded", "warn"], ...] = Field(
        ("drift", "degraded"), description="Monitoring verdicts that start a training run."
    )
    sensor_interval_s: int = Field(60, ge=1, description="How often the retrain sensor looks.")
    decision_interval_s: int = Field(
        300, ge=1, description="How often the decision sensor reads the challenger's evidence."
    )
    rollback_watch_cron: str = Field(
        "*/15 * * * *", description="Schedule of the rollback watch job."
    )


class StoreConfig(BaseModel):
    """The score store (docs/store.md): the embedded DuckDB file and the Kafka sink into it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path | None = Field(None, description="The DuckDB file (default: <home>/scores.duckdb).")
    lock_timeout_s: float = Field(
        60.0,
        gt=0,
        description=(
            "How long a write or a query waits for another process's lock on the file (s)."
        ),
    )
    sink_group: str = Field("driverscore-sink", description="Consumer group of `driverscore sink`.")
    sink_batch_records: int = Field(
        5_000, ge=1, description="The sink writes once this many messages are waiting..."
    )
    sink_batch_wait_s: float = Field(
        1.0, gt=0, description="...or once the first of them has waited this long (s)."
    )
    druid: DruidConfig = DruidConfig()


class SparkConfig(BaseModel):
    """The Spark engine (``--engine spark``): how its session is built (``docs/spark.md``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    master: str | None = Field(
        None, description="Spark master; default: spark-submit's --master, else local[*]."
    )
    app_name: str = Field("driverscore", description="Spark application name.")
    hadoop_aws_version: str | None = Field(
        None,
        description=(
            "org.apache.hadoop:hadoop-aws version for s3a:// (default: the Hadoop inside "
            "pyspark); empty string: add no package (the cluster has it, as on EMR and Glue)."
        ),
    )
    pings_per_group: int = Field(
        1_000_000,
        ge=1,
        description="Pings per vehicle group handed to prepare_trips on an executor.",
    )
    shuffle_partitions: int | None = Field(
        None, ge=1, description="spark.sql.shuffle.partitions (default: Spark's)."
    )
    conf: dict[str, str] = Field(
        default_factory=dict, description="More Spark properties, e.g. spark.executor.memory."
    )


class SupersetConfig(BaseModel):
    """The local Apache Superset of `driverscore superset up` (docs/superset.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int = Field(8088, ge=1, le=65535, description="Port Superset listens on (127.0.0.1).")
    admin_user: str = Field("admin", description="Superset's admin login.")
    venv: Path | None = Field(
        None,
        description=(
            "Superset's own environment (default: ~/.cache/driverscore/superset-<version>-"
            "<requirements hash>, shared by every home)."
        ),
    )


class Settings(BaseSettings):
    """All settings of one driverscore process."""

    model_config = SettingsConfigDict(
        env_prefix="DRIVERSCORE_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    home: Path = Field(Path(".driverscore"), description="Folder holding all embedded state.")
    data_uri: str | None = Field(
        None,
        description=(
            "Root of the versioned datasets: a path or s3://bucket/prefix (default: <home>/data)."
        ),
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server or database URI (default: SQLite under <home>/mlflow).",
    )
    mlflow_registry_uri: str | None = None
    model_name: str = "driverscore-trip-risk"
    experiment_name: str = "driverscore"
    s3_endpoint_url: str | None = Field(
        None, description="Custom S3 API endpoint (MinIO, moto, Ceph...)."
    )
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_region: str = "us-east-1"
    s3_connect_timeout_s: float = Field(
        5.0, gt=0, description="Connecting to the S3 endpoint gives up after this (s)."
    )
    s3_read_timeout_s: float = Field(
        60.0, gt=0, description="An S3 endpoint silent this long fails the request (s)."
    )
    s3_max_attempts: int = Field(
        3,
        ge=1,
        description=(
            "Attempts per S3 request, retries included: with the timeouts, a dead endpoint "
            "fails a command in seconds instead of minutes."
        ),
    )
    schedule: Literal["daily", "weekly"] = "daily"
    schedule_cron: str | None = Field(
        None, description="Overrides the daily/weekly cron expression."
    )

    cleaning: CleaningConfig = CleaningConfig()
    trips: TripConfig = TripConfig()
    features: FeatureConfig = FeatureConfig()
    training: TrainingConfig = TrainingConfig()
    gate: GateConfig = GateConfig()
    kafka: KafkaConfig = KafkaConfig()
    service: ServiceConfig = ServiceConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    #: Champion/challenger decision, rollback watch and alias lease (domain/decision.py).
    decision: DecisionConfig = DecisionConfig()
    monitoring_cron: str = Field(
        "0 * * * *", description="Schedule of the Dagster monitoring job (default: hourly)."
    )
    store: StoreConfig = StoreConfig()
    triggers: TriggerConfig = TriggerConfig()
    spark: SparkConfig = SparkConfig()
    superset: SupersetConfig = SupersetConfig()

    @property
    def resolved_data_uri(self) -> str:
        return self.data_uri or str((self.home / "data").resolve())

    @property
    def resolved_tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.home / 'mlflow' / 'mlflow.db').resolve()}"

    @property
    def store_path(self) -> Path:
        """The embedded score store's DuckDB file."""
        return (self.store.path or self.home / "scores.duckdb").resolve()

    @property
    def mlflow_artifact_root(self) -> str:
        return str((self.home / "mlflow" / "artifacts").resolve())

    def storage_options(self) -> dict[str, object]:
        """fsspec options for S3 URIs; empty values fall back to the AWS environment."""
        options: dict[str, object] = {
            # botocore's defaults (60 s to connect, up to 5 attempts with back-off) make a
            # dead endpoint hang a command for minutes.
            "config_kwargs": {
                "connect_timeout": self.s3_connect_timeout_s,
                "read_timeout": self.s3_read_timeout_s,
                "retries": {"total_max_attempts": self.s3_max_attempts, "mode": "standard"},
            }
        }
        if self.s3_endpoint_url:
            options["client_kwargs"] = {
                "endpoint_url": self.s3_endpoint_url,
                "region_name": self.aws_region,
            }
        if self.aws_access_key_id and self.aws_secret_access_key:
            options["key"] = self.aws_access_key_id.get_secret_value()
            options["secret"] = self.aws_secret_access_key.get_secret_value()
        return options


def load_settings() -> Settings:
    """The settings from the environment, once per entry point.

    A wrong value is one :class:`ConfigError` naming the variable that holds it, never a
    pydantic traceback: values that do not validate, and lists or objects that are not
    JSON (``DRIVERSCORE_SERVICE__TOKENS=plaintext``, ``DRIVERSCORE_FEATURES={bad``).
    """
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        path: list[str] = []
        for part in first["loc"]:
            if not isinstance(part, str):
                break  # a list index: the variable holds the whole list
            path.append(part)
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(
            f"setting {_variable_for(path)}: {first['msg']}{more} — fix or unset it"
        ) from None
    except SettingsError as exc:
        raise ConfigError(_unparseable_setting(exc)) from None


def _environment() -> dict[str, str]:
    # Settings read variable names case-insensitively; so do the error messages.
    return {name.upper(): name for name in os.environ}


def _variable_for(path: list[str]) -> str:
    """The variable that set the value at ``path``: the nested one (``GATE__MIN_ROC_AUC``) or
    the JSON object around it (``GATE``), whichever is set."""
    present = _environment()
    for end in range(len(path), 0, -1):
        name = ENV_PREFIX + _NESTED.join(path[:end]).upper()
        if name in present:
            inner = ".".join(path[end:])
            return f"{present[name]} ({inner})" if inner else present[name]
    return ENV_PREFIX + _NESTED.join(path).upper()


def _unparseable_setting(exc: SettingsError) -> str:
    """A line naming the variable whose list or object value is not JSON."""
    cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
    hint = """lists and objects are written as JSON, e.g. '["a", "b"]' or '{"key": 1}'"""
    match = _FIELD_IN_MESSAGE.search(str(exc))
    if match is None:
        return f"settings: {exc}{cause} — {hint}"
    family = ENV_PREFIX + match.group(1).upper()
    for upper, name in sorted(_environment().items()):
        if upper != family and not upper.startswith(family + _NESTED):
            continue
        path = upper.removeprefix(ENV_PREFIX).lower().split(_NESTED)
        if _expects_json(path) and not _is_json(os.environ[name]):
            return f"setting {name}: not valid JSON{cause} — {hint}"
    return f"setting {family} (or one nested under it): not valid JSON{cause} — {hint}"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _expects_json(path: list[str]) -> bool:
    """Whether the field at ``path`` is a list or an object (its variable holds JSON)."""
    model: type[BaseModel] | None = Settings
    annotation: Any = None
    for name in path:
        if model is None or name not in model.model_fields:
            return False
        annotation = _unwrap_optional(model.model_fields[name].annotation)
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation if is_model else None
    return model is not None or get_origin(annotation) in _CONTAINERS or annotation in _CONTAINERS
