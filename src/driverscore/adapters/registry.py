"""MLflow tracking and model registry: one run per candidate, aliases for the serving roles.

Only an :class:`MlflowClient` built from the given URIs is used, never the fluent
``mlflow.*`` API with its process-wide tracking URI and active run: two registries (a test
and the app, or two tenants) can live in one process without seeing each other.

A version's run holds the sklearn model as an MLflow model directory (``model/``, with a
signature and input example so ``mlflow models serve -m models:/<name>@champion`` works),
the pickle-free serving export ``onnx/model.onnx``, ``model_card.json`` and
``gate_report.json``. Serving loads only the ONNX file and the card.
"""

from __future__ import annotations

import fcntl
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import mlflow
import numpy as np
import numpy.typing as npt
import polars as pl
import sqlalchemy.exc
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import driverscore
from driverscore.adapters.onnx_model import OnnxRiskModel
from driverscore.adapters.versions import CHALLENGER, CHAMPION, VersionSummary
from driverscore.domain.scoring import ModelCard, TripScorer, feature_matrix
from driverscore.errors import ConfigError, NoModelError, RegistryError
from driverscore.settings import Settings

__all__ = [
    "CARD_ARTIFACT",
    "CHALLENGER",
    "CHAMPION",
    "ONNX_ARTIFACT",
    "REFERENCE_PROFILE_ARTIFACT",
    "FittedModel",
    "GateOutcome",
    "ModelRegistry",
    "RegisteredVersion",
    "open_registry",
]

ONNX_ARTIFACT: Final = "onnx/model.onnx"
CARD_ARTIFACT: Final = "model_card.json"
#: The drift reference profile fitted at training (``domain/profiles.py``), beside the card.
REFERENCE_PROFILE_ARTIFACT: Final = "reference_profile.json"
GATE_ARTIFACT: Final = "gate_report.json"
SKLEARN_ARTIFACT: Final = "model"

# MLflow metric and tag keys allow alphanumerics, "_ - . / " and spaces only.
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_\-./ ]")
_MAX_PARAM_VALUE: Final = 6000


def _key(name: str) -> str:
    return _UNSAFE_KEY.sub("_", name)


#: What an MLflow backend answers for an alias or model that does not exist. Anything else
#: (a registry that cannot be reached, a server error) is a failure, never "no such alias".
_NOT_FOUND: Final = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


# What registration reads of training's results, stated here so that this adapter does not
# import the training layer above it (training.model.TrainedModel and
# training.gate.GateReport are what callers pass).


class FittedModel(Protocol):
    """A fitted sklearn estimator with its feature order and a P(incident) function."""

    @property
    def estimator(self) -> Any: ...

    @property
    def feature_names(self) -> tuple[str, ...]: ...

    def predict_proba(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]: ...


class HoldoutMetrics(Protocol):
    def flat(self) -> dict[str, float]: ...


class GateOutcome(Protocol):
    """The validation gate's verdict, its failed rules in words, and the metrics behind it."""

    @property
    def passed(self) -> bool: ...

    @property
    def failures(self) -> list[str]: ...

    @property
    def candidate(self) -> HoldoutMetrics: ...

    @property
    def champion(self) -> HoldoutMetrics | None: ...

    def model_dump_json(self, *, indent: int | None = None) -> str: ...


@dataclass(frozen=True)
class RegisteredVersion:
    """What registration produced: the version, its run, gate status and alias (if any)."""

    model_name: str
    version: str
    run_id: str
    gate_status: str
    alias: str | None

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"


class ModelRegistry:
    """Tracking runs and registered versions of one model in one MLflow backend.

    ``tracking_uri`` is a database URI (``sqlite:///...``) or an ``http(s)://`` MLflow
    server; ``registry_uri`` defaults to it. ``artifact_location`` is used only when the
    experiment is created (a local folder or ``s3://...``). Promotion rules are in
    :meth:`register`.
    """

    def __init__(
        self,
        tracking_uri: str,
        registry_uri: str | None,
        model_name: str,
        experiment_name: str,
        artifact_location: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.model_name = model_name
        self.experiment_name = experiment_name
        self.artifact_location = artifact_location
        self.client = self._open_client()
        # Promotion reads then writes the champion alias; serialise it within this process.
        self._lock = threading.Lock()

    def _open_client(self) -> MlflowClient:
        """The client, with the embedded SQLite database checked and its schema in place.

        MLflow creates (or migrates) a SQLite database's tables when a process first uses
        it, with no guard against a second process doing the same at the same moment: two
        ``driverscore train`` on a fresh home failed with ``table registered_models already
        exists``. Creation is serialised by a lock file beside the database; later opens
        find the tables and only wait for the lock briefly.
        """
        databases = self._databases()
        for database in databases:
            _check_sqlite_file(database)
        with self._database_locks():
            try:
                # Building the client opens the tracking store; the registry store opens on
                # first use, so it is touched here, under the same lock.
                client = MlflowClient(
                    tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
                )
                if databases:
                    client.search_registered_models(max_results=1)
            except sqlalchemy.exc.DBAPIError as exc:
                raise _unreadable_database(databases, str(exc.orig)) from None
            except MlflowException as exc:
                if databases and "unsupported URI" not in str(exc):
                    # e.g. a schema MLflow cannot migrate
                    raise _unreadable_database(databases, str(exc).split(". ")[0]) from None
                raise ConfigError(self._unsupported_uri(exc)) from None
        return client

    def _databases(self) -> list[Path]:
        """The embedded SQLite database files behind the two URIs (none for a server)."""
        return sorted(
            {db for db in map(_sqlite_file, (self.tracking_uri, self.registry_uri)) if db}
        )

    @contextmanager
    def _database_locks(self) -> Iterator[None]:
        """Exclusive use of the embedded databases across processes (a no-op for a server).

        Held to create the schema, and to promote: two processes registering at once would
        otherwise both find no champion and both take the alias.
        """
        with ExitStack() as locks:
            for database in self._databases():
                locks.enter_context(_exclusive(database.with_name(database.name + ".lock")))
            yield

    def _unsupported_uri(self, exc: MlflowException) -> str:
        text = str(exc)
        setting, uri = "DRIVERSCORE_MLFLOW_TRACKING_URI", self.tracking_uri
        if self.registry_uri != self.tracking_uri and self.registry_uri in text:
            setting, uri = "DRIVERSCORE_MLFLOW_REGISTRY_URI", self.registry_uri
        reason = "unsupported scheme" if "unsupported URI" in text else text.split(". ")[0]
        return (
            f"{setting}={uri!r}: MLflow cannot use it ({reason.strip()}) — use sqlite:///<file>, "
            "http(s)://<server> or a database URI (postgresql://, mysql://)"
        )

    # -- registration ---------------------------------------------------------------------

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(
                self.client.create_experiment(
                    self.experiment_name, artifact_location=self.artifact_location
                )
            )
        except MlflowException:
            # Another process created it between our lookup and create.
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return str(experiment.experiment_id)

    def _ensure_registered_model(self) -> None:
        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    self.model_name, description="Calibrated trip incident risk (driverscore)."
                )
            except MlflowException:
                self.client.get_registered_model(self.model_name)  # created concurrently

    def register(
        self,
        trained: FittedModel,
        onnx_bytes: bytes,
        card: ModelCard,
        gate_report: GateOutcome,
        params: dict[str, Any],
        data_versions: dict[str, str],
        code_version: str,
        sample: pl.DataFrame,
        reference_profile: bytes | None = None,
    ) -> RegisteredVersion:
        """Record the candidate as one run and one model version, and promote it if it passed.

        A candidate that failed the gate is still recorded (run and version tagged
        ``gate_status=failed``, with the failures) so the attempt is traceable, but it never
        gets an alias. The first passing version becomes ``champion``; later passing ones
        become ``challenger`` (replacing the previous challenger), to be promoted by the
        rollout after their canary. ``sample`` (a few trip feature rows) is the input example.
        ``reference_profile`` (JSON) is stored beside the card as the drift reference.
        """
        gate_status = "passed" if gate_report.passed else "failed"
        tags = {
            "driverscore.version": driverscore.__version__,
            "code_version": code_version,
            "gate_status": gate_status,
            "model_name": self.model_name,
            **{f"data_version.{_key(k)}": v for k, v in data_versions.items()},
        }
        if gate_report.failures:
            tags["gate_failures"] = "; ".join(gate_report.failures)[:5000]
        run = self.client.create_run(self._experiment_id(), tags=tags)
        run_id: str = run.info.run_id
        try:
            self._log_run(run_id, trained, onnx_bytes, card, gate_report, params, sample)
            if reference_profile is not None:
                self.client.log_text(run_id, reference_profile.decode(), REFERENCE_PROFILE_ARTIFACT)
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")

        self._ensure_registered_model()
        version_tags = {
            "gate_status": gate_status,
            "code_version": code_version,
            **{f"data_version.{_key(k)}": v for k, v in data_versions.items()},
        }
        model_version = self.client.create_model_version(
            self.model_name,
            source=f"runs:/{run_id}/{SKLEARN_ARTIFACT}",
            run_id=run_id,
            tags=version_tags,
            description=f"gate {gate_status}",
        )
        version = str(model_version.version)
        alias: str | None = None
        if gate_report.passed:
            with self._lock, self._database_locks():
                alias = CHALLENGER if self.alias_version(CHAMPION) is not None else CHAMPION
                self.set_alias(alias, version)
        return RegisteredVersion(self.model_name, version, run_id, gate_status, alias)

    def _log_run(
        self,
        run_id: str,
        trained: FittedModel,
        onnx_bytes: bytes,
        card: ModelCard,
        gate_report: GateOutcome,
        params: dict[str, Any],
        sample: pl.DataFrame,
    ) -> None:
        # Registration only: the serving image, which reads versions, has none of these.
        import mlflow.sklearn
        import skl2onnx
        import sklearn
        from mlflow.models import infer_signature

        metrics = {f"holdout.{k}": v for k, v in gate_report.candidate.flat().items()}
        if gate_report.champion is not None:
            metrics.update(
                {f"champion.{k}": v for k, v in gate_report.champion.flat().items() if "." not in k}
            )
        metrics["decision_threshold"] = card.decision_threshold
        now_ms = int(time.time() * 1000)
        params_out = {_key(k): str(v)[:_MAX_PARAM_VALUE] for k, v in params.items()}
        self.client.log_batch(
            run_id,
            metrics=[Metric(_key(k), float(v), now_ms, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params_out.items()],
        )
        self.client.log_text(run_id, card.to_json(), CARD_ARTIFACT)
        self.client.log_text(run_id, gate_report.model_dump_json(indent=2), GATE_ARTIFACT)
        example = feature_matrix(sample.head(5), trained.feature_names)
        with tempfile.TemporaryDirectory(prefix="driverscore-") as tmp:
            onnx_dir = Path(tmp) / "onnx"
            onnx_dir.mkdir()
            (onnx_dir / "model.onnx").write_bytes(onnx_bytes)
            self.client.log_artifacts(run_id, str(onnx_dir), "onnx")
            model_dir = Path(tmp) / SKLEARN_ARTIFACT
            signature = (
                infer_signature(example, trained.predict_proba(example))
                if example.shape[0]
                else None
            )
            mlflow.sklearn.save_model(
                trained.estimator,
                str(model_dir),
                signature=signature,
                input_example=example if example.shape[0] else None,
                # Explicit requirements: inferring them would re-load the model in a subprocess.
                pip_requirements=[
                    f"scikit-learn=={sklearn.__version__}",
                    f"numpy=={np.__version__}",
                    f"mlflow=={mlflow.__version__}",
                ],
                pyfunc_predict_fn="predict_proba",
                serialization_format="cloudpickle",
            )
            self.client.log_artifacts(run_id, str(model_dir), SKLEARN_ARTIFACT)
        self.client.set_tag(run_id, "onnx.opset", str(_onnx_opset(onnx_bytes)))
        self.client.set_tag(run_id, "skl2onnx.version", skl2onnx.__version__)

    # -- aliases ----------------------------------------------------------------------------

    def alias_version(self, alias: str) -> str | None:
        """Version number the alias points to, or ``None`` when unset (or no model yet).

        Raises ``MlflowException`` when the registry cannot answer: "unreachable" must not
        read as "no champion" (a service would report the wrong reason, a registration
        would crown a new champion).
        """
        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                return None
            raise

    def set_alias(self, alias: str, version: str) -> None:
        """Point ``alias`` at ``version`` (moving it if it pointed elsewhere)."""
        self.client.set_registered_model_alias(self.model_name, alias, version)
        self.client.set_model_version_tag(self.model_name, version, "role", alias)

    def delete_alias(self, alias: str) -> None:
        """Remove ``alias``; no error when it is not set."""
        if self.alias_version(alias) is not None:
            self.client.delete_registered_model_alias(self.model_name, alias)

    # -- loading ----------------------------------------------------------------------------

    def _download(self, version: str, artifact: str, dst: str) -> Path:
        run_id = self.client.get_model_version(self.model_name, version).run_id
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=artifact,
            dst_path=dst,
            tracking_uri=self.tracking_uri,
        )
        return Path(local)

    def load_card(self, version: str) -> ModelCard:
        """The model card stored with ``version``."""
        with tempfile.TemporaryDirectory(prefix="driverscore-") as tmp:
            return ModelCard.from_json(self._download(version, CARD_ARTIFACT, tmp).read_text())

    def load_reference_profile(self, version: str) -> bytes | None:
        """The drift reference profile stored with ``version``; None when it has none."""
        names = {a.path for a in self.client.list_artifacts(self._run_of(version))}
        if REFERENCE_PROFILE_ARTIFACT not in names:
            return None
        with tempfile.TemporaryDirectory(prefix="driverscore-") as tmp:
            return self._download(version, REFERENCE_PROFILE_ARTIFACT, tmp).read_bytes()

    def save_reference_profile(self, version: str, profile: bytes) -> None:
        """Store a reference profile built after registration (a version that predates
        profiles), beside its card, once."""
        self.client.log_text(self._run_of(version), profile.decode(), REFERENCE_PROFILE_ARTIFACT)

    def _run_of(self, version: str) -> str:
        run_id = self.client.get_model_version(self.model_name, version).run_id
        if not run_id:
            raise RegistryError(f"model {self.model_name!r} version {version} has no run")
        return str(run_id)

    def load_onnx(self, version: str) -> bytes:
        """The ONNX export stored with ``version``."""
        with tempfile.TemporaryDirectory(prefix="driverscore-") as tmp:
            return self._download(version, ONNX_ARTIFACT, tmp).read_bytes()

    def load_scorer(self, alias: str, role: str | None = None) -> TripScorer:
        """Scorer for the version behind ``alias``, from its ONNX file and card (no pickle).

        ``role`` is written into each score record (defaults to the alias; ``shadow`` when a
        challenger scores alongside the champion without serving).
        """
        version = self.alias_version(alias)
        if version is None:
            raise NoModelError(
                f"model {self.model_name!r} has no version with alias {alias!r} at "
                f"{self.tracking_uri}; train and register one first (driverscore train)"
            )
        card = self.load_card(version)
        model = OnnxRiskModel(self.load_onnx(version))
        return TripScorer(model.predict_proba, card, self.model_name, version, role or alias)

    def list_versions(self) -> list[VersionSummary]:
        """Every registered version, newest first, with aliases, gate status and metrics."""
        try:
            versions = self.client.search_model_versions(f"name = '{self.model_name}'")
        except MlflowException:
            return []
        aliases: dict[str, list[str]] = {}
        try:
            for alias, version in self.client.get_registered_model(self.model_name).aliases.items():
                aliases.setdefault(str(version), []).append(str(alias))
        except MlflowException:
            pass
        out: list[VersionSummary] = []
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            run = self.client.get_run(mv.run_id) if mv.run_id else None
            metrics = dict(run.data.metrics) if run else {}
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(mv.creation_timestamp / 1000))
            out.append(
                VersionSummary(
                    version=str(mv.version),
                    aliases=tuple(sorted(aliases.get(str(mv.version), []))),
                    gate_status=mv.tags.get("gate_status", "unknown"),
                    code_version=mv.tags.get("code_version", "unknown"),
                    created_at=created,
                    metrics={str(k): float(v) for k, v in metrics.items()},
                )
            )
        return out

    def version_tags(self, version: str) -> dict[str, str]:
        """Tags of a registered version (gate status, code and data versions, role)."""
        return dict(self.client.get_model_version(self.model_name, version).tags)


def open_registry(settings: Settings) -> ModelRegistry:
    """The registry the settings name: their tracking and registry URIs, model, experiment.

    The artifact root applies only to the embedded default (no tracking server): a server
    keeps its own artifact location.
    """
    return ModelRegistry(
        tracking_uri=settings.resolved_tracking_uri,
        registry_uri=settings.mlflow_registry_uri,
        model_name=settings.model_name,
        experiment_name=settings.experiment_name,
        artifact_location=None if settings.mlflow_tracking_uri else settings.mlflow_artifact_root,
    )


#: The first 16 bytes of every SQLite 3 database file.
_SQLITE_HEADER: Final = b"SQLite format 3\x00"


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other backends and in-memory ones."""
    if not uri.startswith("sqlite:"):
        return None
    database = sqlalchemy.engine.make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve()


def _check_sqlite_file(database: Path) -> None:
    """A file that is not SQLite would surface as a driver error deep inside MLflow."""
    try:
        with database.open("rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return  # a fresh registry: MLflow creates it
    except OSError as exc:
        raise RegistryError(
            f"{database}: cannot read the MLflow registry database ({exc.strerror})"
        ) from None
    # An empty file is a valid empty database to SQLite.
    if header and header != _SQLITE_HEADER:
        raise RegistryError(
            f"{database}: not an SQLite database, so not an MLflow registry (corrupt or "
            "overwritten) — move the file aside (a fresh registry is then created) or restore "
            "a backup"
        )


def _unreadable_database(databases: list[Path], reason: str) -> RegistryError:
    return RegistryError(
        f"{', '.join(map(str, databases))}: cannot open the MLflow registry database "
        f"({reason.strip()}) — move the file aside (a fresh registry is then created) or "
        "restore a backup"
    )


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_file``; other processes wait for it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _onnx_opset(onnx_bytes: bytes) -> int:
    import onnx  # registration only, as above

    proto = onnx.load_from_string(onnx_bytes)
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
