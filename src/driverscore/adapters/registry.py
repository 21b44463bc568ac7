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
import json
import os
import random
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
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
from pydantic import ValidationError

import driverscore
from driverscore.adapters.onnx_model import OnnxRiskModel
from driverscore.adapters.storage import DataStore
from driverscore.adapters.versions import CHALLENGER, CHAMPION, VersionSummary
from driverscore.domain.audit import AliasAction, AliasMove
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import ModelCard, TripScorer, feature_matrix
from driverscore.errors import AliasMoveError, ConfigError, NoModelError, RegistryError
from driverscore.settings import Settings

__all__ = [
    "CARD_ARTIFACT",
    "CHALLENGER",
    "CHAMPION",
    "ONNX_ARTIFACT",
    "PREVIOUS",
    "REFERENCE_PROFILE_ARTIFACT",
    "ROLLOUT_TAG",
    "UNCHECKED",
    "FittedModel",
    "GateOutcome",
    "LeaseTiming",
    "ModelRegistry",
    "RegisteredVersion",
    "audit_store_sink",
    "open_registry",
    "policy_label",
    "read_audit_store",
]

#: The champion before the last promotion: where a rollback moves ``champion`` back to.
PREVIOUS: Final = "previous"
#: Registered-model tags: the rollout policy (JSON), the move lease (JSON owner + expiry)
#: and the recent audit log (one tag per move, keyed by time so names sort by time).
ROLLOUT_TAG: Final = "driverscore.rollout"
LEASE_TAG: Final = "driverscore.lease"
#: The lease is a registered model of this name beside the model (created to take it).
LEASE_SUFFIX: Final = ".alias-lease"
AUDIT_TAG_PREFIX: Final = "driverscore.audit."
#: Audit tags kept on the registered model; older moves are only in the data store.
AUDIT_TAGS_KEPT: Final = 200


class _Unchecked:
    """Marker type of :data:`UNCHECKED`."""


#: ``move_alias(expect_from=UNCHECKED)``: move the alias wherever it points now.
UNCHECKED: Final = _Unchecked()

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
        *,
        lease: LeaseTiming | None = None,
        audit_sink: Callable[[AliasMove], None] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.model_name = model_name
        self.experiment_name = experiment_name
        self.artifact_location = artifact_location
        self.lease = lease or LeaseTiming()
        #: Receives every move after it is made (the data store's ``audit/`` log).
        self.audit_sink = audit_sink
        self.client = self._open_client()
        # Moves read then write aliases; serialise them within this process (re-entrant:
        # a promotion moves several aliases under one guard).
        self._lock = threading.RLock()
        self._lease_owner: str | None = None

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
            with self.guard("training-job"):
                alias = CHALLENGER if self.alias_version(CHAMPION) is not None else CHAMPION
                self.move_alias(
                    alias,
                    version,
                    action="register",
                    actor="training-job",
                    reason=f"passed the gate; registered as {alias}",
                    evidence={
                        k: v
                        for k, v in gate_report.candidate.flat().items()
                        if isinstance(v, int | float) and np.isfinite(v)
                    },
                )
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

    # -- guarded moves, rollout policy, audit log ----------------------------------------

    @contextmanager
    def guard(self, actor: str) -> Iterator[None]:
        """Exclusive right to move this model's aliases and rollout policy, across processes.

        MLflow aliases have no compare-and-set, so the guard is a lease: a registered model
        named after this one (``LEASE_SUFFIX``) with the owner id and expiry as a tag. The
        registry refuses a second model of the same name, so of two movers creating it at
        once exactly one succeeds; an expired lease may be removed and taken.
        Within one process a re-entrant lock serialises movers first, and on the embedded
        SQLite registry the database lock file is held too. Movers check under the guard
        that the alias is still where they expect (:meth:`move_alias` ``expect_from``).
        """
        with self._lock:
            if self._lease_owner is not None:  # re-entered by this thread
                yield
                return
            with self._database_locks():
                owner = f"{actor}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
                self._ensure_registered_model()
                self._acquire_lease(owner)
                self._lease_owner = owner
                try:
                    yield
                finally:
                    self._lease_owner = None
                    self._release_lease(owner)

    @property
    def lease_model_name(self) -> str:
        """The registered model whose existence is the move lease of this model's aliases."""
        return f"{self.model_name}{LEASE_SUFFIX}"

    def _read_lease(self) -> _Lease | None:
        try:
            tags = self.client.get_registered_model(self.lease_model_name).tags
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                return None
            raise
        try:
            data = json.loads(tags.get(LEASE_TAG) or "")
            return _Lease(str(data["owner"]), float(data["expires_at"]))
        except (ValueError, KeyError, TypeError):
            # An unreadable lease protects nothing: it counts as expired and may be taken.
            return _Lease("an unreadable lease", 0.0)

    def _acquire_lease(self, owner: str) -> None:
        """Create the lease model: the registry's unique name is the compare-and-set (two
        creations at once, one fails), which a tag written and read back is not."""
        timing = self.lease
        deadline = time.monotonic() + timing.wait_s
        while True:
            current = self._read_lease()
            if current is not None and current.expires_at <= time.time():
                # Its mover died: remove it, but only if it is still the lease we judged
                # expired (a rival may have taken it over meanwhile), then race to create.
                if self._read_lease() == current:
                    self._delete_lease()
                current = None
            if current is None:
                lease = {"owner": owner, "expires_at": time.time() + timing.ttl_s}
                try:
                    self.client.create_registered_model(
                        self.lease_model_name,
                        tags={LEASE_TAG: json.dumps(lease)},
                        description=f"Move lease of {self.model_name!r}'s aliases (driverscore).",
                    )
                    return
                except MlflowException as exc:
                    # Already exists: a rival holds it. Does not exist: the registry found
                    # the rival's row on insert, then the rival released it before the
                    # error was built (MLflow reads the model back to word it). Both: retry.
                    if exc.error_code not in {"RESOURCE_ALREADY_EXISTS", *_NOT_FOUND}:
                        raise
                current = self._read_lease()
            if time.monotonic() >= deadline:
                holder = current.owner if current else "another mover"
                raise AliasMoveError(
                    f"model {self.model_name!r}: the alias lease is held by {holder}; "
                    f"waited {timing.wait_s:g}s — try again, or wait {timing.ttl_s:g}s for "
                    "it to expire if that mover died"
                )
            # Jitter: rivals that collided do not retry in step.
            time.sleep(timing.settle_s * (0.5 + random.random()))

    def _delete_lease(self) -> None:
        try:
            self.client.delete_registered_model(self.lease_model_name)
        except MlflowException as exc:
            if exc.error_code not in _NOT_FOUND:
                raise

    def _release_lease(self, owner: str) -> None:
        current = self._read_lease()
        if current is not None and current.owner == owner:
            self._delete_lease()

    def _check_lease(self) -> None:
        """A mover that outlived its lease must not move: another may have taken it."""
        current = self._read_lease()
        if current is None or current.owner != self._lease_owner:
            raise AliasMoveError(
                f"model {self.model_name!r}: the alias lease expired during the move "
                f"(lease ttl {self.lease.ttl_s:g}s); nothing was moved — try again"
            )

    def _model_tags(self) -> dict[str, str]:
        try:
            return dict(self.client.get_registered_model(self.model_name).tags)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                return {}
            raise

    def move_alias(
        self,
        alias: str,
        version: str | None,
        *,
        action: AliasAction,
        actor: str,
        reason: str,
        evidence: dict[str, Any] | None = None,
        expect_from: str | _Unchecked | None = UNCHECKED,
        at: datetime | None = None,
    ) -> AliasMove:
        """Point ``alias`` at ``version`` (``None``: remove it) under the guard, and audit it.

        ``expect_from`` is the version the mover saw when it decided (``None``: unset);
        when the alias is elsewhere now, someone moved it first and :class:`AliasMoveError`
        is raised with nothing moved. Pass ``UNCHECKED`` to move whatever it points to.
        """
        with self.guard(actor):
            self._check_lease()
            current = self.alias_version(alias)
            if not isinstance(expect_from, _Unchecked) and current != expect_from:
                raise AliasMoveError(
                    f"alias {alias!r} of model {self.model_name!r} points to "
                    f"{current or 'nothing'}, not {expect_from or 'nothing'}: it was moved "
                    "meanwhile; nothing was moved"
                )
            if version is None:
                if current is not None:
                    self.client.delete_registered_model_alias(self.model_name, alias)
            else:
                self._require_version(version)
                self.set_alias(alias, version)
            move = AliasMove(
                at=at or datetime.now(UTC),
                actor=actor,
                action=action,
                alias=alias,
                from_version=current,
                to_version=version,
                reason=reason,
                evidence=evidence or {},
            )
            self._append_audit(move)
            return move

    def _require_version(self, version: str) -> None:
        try:
            self.client.get_model_version(self.model_name, version)
        except MlflowException as exc:
            if exc.error_code in _NOT_FOUND:
                raise AliasMoveError(
                    f"model {self.model_name!r} has no version {version}; "
                    "`driverscore models list` shows the versions"
                ) from None
            raise

    def _append_audit(self, move: AliasMove) -> None:
        # Keyed by when it was recorded, not by ``move.at``: a replayed day's move carries its
        # simulated time, and the log must still read in the order the moves were made.
        key = f"{AUDIT_TAG_PREFIX}{_recorded_stamp()}"
        self.client.set_registered_model_tag(self.model_name, key, move.model_dump_json())
        keys = sorted(k for k in self._model_tags() if k.startswith(AUDIT_TAG_PREFIX))
        for old in keys[:-AUDIT_TAGS_KEPT]:
            self.client.delete_registered_model_tag(self.model_name, old)
        if self.audit_sink is not None:
            self.audit_sink(move)

    def audit_log(self, limit: int = 50) -> list[AliasMove]:
        """The latest moves, newest first (the registry keeps the last ``AUDIT_TAGS_KEPT``)."""
        tags = self._model_tags()
        moves: list[AliasMove] = []
        for key in sorted((k for k in tags if k.startswith(AUDIT_TAG_PREFIX)), reverse=True):
            try:
                moves.append(AliasMove.model_validate_json(tags[key]))
            except ValidationError:
                continue  # a tag edited by hand: the data store keeps the original
            if len(moves) >= limit:
                break
        return moves

    def rollout_policy(self, default: RolloutPolicy | None = None) -> RolloutPolicy:
        """The rollout policy stored on the registered model; ``default`` (champion-only
        unless given) when none was ever set or the model is not registered yet."""
        return self.stored_rollout_policy() or default or RolloutPolicy()

    def stored_rollout_policy(self) -> RolloutPolicy | None:
        """The stored rollout policy, or None when none was set. An unreadable one (a tag
        edited by hand) is an error: serving a guessed split would be worse."""
        text = self._model_tags().get(ROLLOUT_TAG)
        if not text:
            return None
        try:
            return RolloutPolicy.model_validate_json(text)
        except ValidationError as exc:
            raise RegistryError(
                f"model {self.model_name!r}: tag {ROLLOUT_TAG} is not a rollout policy "
                f"({exc.errors()[0]['msg']}); set one with `driverscore models rollout`"
            ) from None

    def set_rollout_policy(
        self,
        policy: RolloutPolicy,
        *,
        actor: str,
        reason: str,
        evidence: dict[str, Any] | None = None,
        at: datetime | None = None,
    ) -> AliasMove:
        """Store ``policy`` on the registered model (every replica polls it), audited."""
        with self.guard(actor):
            self._check_lease()
            before = self.rollout_policy()
            self.client.set_registered_model_tag(
                self.model_name, ROLLOUT_TAG, policy.model_dump_json()
            )
            move = AliasMove(
                at=at or datetime.now(UTC),
                actor=actor,
                action="rollout",
                alias="rollout",
                from_version=policy_label(before),
                to_version=policy_label(policy),
                reason=reason,
                evidence={
                    "from": before.model_dump(),
                    "to": policy.model_dump(),
                    **(evidence or {}),
                },
            )
            self._append_audit(move)
            return move

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


@dataclass(frozen=True)
class LeaseTiming:
    """How the alias lease is held: its lifetime, the mean pause between tries for a busy
    lease (jittered), and how long a mover waits for it (seconds)."""

    ttl_s: float = 30.0
    settle_s: float = 0.3
    wait_s: float = 60.0


@dataclass(frozen=True)
class _Lease:
    owner: str
    expires_at: float


def _recorded_stamp() -> str:
    """Sortable, unique name part for a move being recorded now (ns, then a random tail)."""
    return f"{time.time_ns():020d}.{uuid.uuid4().hex[:8]}"


def policy_label(policy: RolloutPolicy) -> str:
    """``champion``, ``shadow`` or ``canary 10%``: a rollout policy in the audit log."""
    if policy.mode == "canary":
        return f"canary {policy.challenger_percent:g}%"
    return policy.mode


def audit_store_sink(store: DataStore, model_name: str) -> Callable[[AliasMove], None]:
    """Writes each move as one JSON line under ``audit/<model>/`` of a data store (one
    object per move, named by time: object stores have no append, and no two movers then
    write the same object)."""

    def write(move: AliasMove) -> None:
        name = f"{_recorded_stamp()}.jsonl"
        uri = store.object_uri("audit", _key(model_name).replace("/", "_"), name)
        store.write_object(uri, (move.model_dump_json() + "\n").encode())

    return write


def read_audit_store(store: DataStore, model_name: str) -> list[AliasMove]:
    """Every move the data store holds for ``model_name``, in the order recorded."""
    folder = store.object_uri("audit", _key(model_name).replace("/", "_"))
    moves = [
        AliasMove.model_validate_json(line)
        for uri in store.list_objects(folder, ".jsonl")
        for line in store.read_object(uri).decode().splitlines()
        if line.strip()
    ]
    return moves  # objects are listed by name: the order they were recorded in


def open_registry(settings: Settings, *, audit: bool = True) -> ModelRegistry:
    """The registry the settings name: their tracking and registry URIs, model, experiment.

    The artifact root applies only to the embedded default (no tracking server): a server
    keeps its own artifact location. Moves are also written to the data store's ``audit/``
    log unless ``audit`` is False (readers such as the service never move aliases).
    """
    sink: Callable[[AliasMove], None] | None = None
    if audit:
        store = DataStore(settings.resolved_data_uri, settings.storage_options())
        sink = audit_store_sink(store, settings.model_name)
    decision = settings.decision
    return ModelRegistry(
        tracking_uri=settings.resolved_tracking_uri,
        registry_uri=settings.mlflow_registry_uri,
        model_name=settings.model_name,
        experiment_name=settings.experiment_name,
        artifact_location=None if settings.mlflow_tracking_uri else settings.mlflow_artifact_root,
        lease=LeaseTiming(
            ttl_s=decision.lease_ttl_s,
            settle_s=decision.lease_settle_s,
            wait_s=decision.lease_wait_s,
        ),
        audit_sink=sink,
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
