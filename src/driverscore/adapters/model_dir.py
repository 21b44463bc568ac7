"""A registered model version exported to a directory: what SageMaker mounts at
``/opt/ml/model`` (from the endpoint's ``model.tar.gz``), or any volume a service reads.

Layout (docs/deployment.md), the registry's own artifact names:

- ``onnx/model.onnx``: the version's pickle-free ONNX export;
- ``model_card.json``: its model card (features, score mapping, thresholds, trip rules);
- ``version.json``: where it came from: model name, version, the alias it was exported
  under, its tags (gate status, code and data versions) and holdout metrics, and the ONNX
  file's sha256, checked when the directory is read.

``driverscore export-model`` writes it (:func:`export_model`); ``driverscore serve`` with
``DRIVERSCORE_SERVICE__MODEL_DIR`` serves it (:class:`ModelDirectory`) as the champion, with
no registry and no MLflow import.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from driverscore.adapters.onnx_model import OnnxRiskModel
from driverscore.adapters.versions import CHAMPION, VersionSummary
from driverscore.domain.scoring import ModelCard, TripScorer
from driverscore.errors import ConfigError, NoModelError

if TYPE_CHECKING:
    from driverscore.adapters.registry import ModelRegistry

__all__ = ["ExportedModel", "ModelDirectory", "export_model"]

ONNX_FILE: Final = "onnx/model.onnx"
CARD_FILE: Final = "model_card.json"
VERSION_FILE: Final = "version.json"
#: Bumped when the layout changes incompatibly; a reader refuses formats it does not know.
FORMAT: Final = 1


@dataclass(frozen=True)
class ExportedModel:
    """The contents of ``version.json``."""

    model_name: str
    version: str
    exported_alias: str | None
    onnx_sha256: str
    exported_at: str
    registered_at: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    format: int = FORMAT


def export_model(
    registry: ModelRegistry, dest: Path, *, alias: str | None = CHAMPION, version: str | None = None
) -> ExportedModel:
    """Write the version behind ``alias`` (or ``version``) to ``dest``: a new or empty
    directory, or a ``.tar.gz`` file holding the same files at its root (SageMaker's
    ``model.tar.gz``)."""
    if version is None:
        version = registry.alias_version(alias or CHAMPION)
        if version is None:
            raise NoModelError(
                f"model {registry.model_name!r} has no version with alias {alias!r}; "
                "train and register one first (driverscore train), or pass --version"
            )
        exported_alias: str | None = alias
    else:
        exported_alias = None
    summary = next((s for s in registry.list_versions() if s.version == version), None)
    if summary is None:
        raise NoModelError(
            f"model {registry.model_name!r} has no version {version!r}; "
            "`driverscore models` lists the versions"
        )
    onnx_bytes = registry.load_onnx(version)
    exported = ExportedModel(
        model_name=registry.model_name,
        version=version,
        exported_alias=exported_alias,
        onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        registered_at=summary.created_at,
        tags=registry.version_tags(version),
        metrics=summary.metrics,
    )
    card = registry.load_card(version)
    if dest.name.endswith(".tar.gz"):
        with tempfile.TemporaryDirectory(prefix="driverscore-export-") as tmp:
            _write(Path(tmp), onnx_bytes, card, exported)
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(dest.name + ".partial")
            with tarfile.open(partial, "w:gz") as archive:
                for name in (CARD_FILE, VERSION_FILE, ONNX_FILE):
                    archive.add(Path(tmp) / name, arcname=name)
            partial.replace(dest)
        return exported
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(
            f"{dest}: exists and is not an empty directory; export to a new path "
            "(or a .tar.gz file)"
        )
    _write(dest, onnx_bytes, card, exported)
    return exported


def _write(folder: Path, onnx_bytes: bytes, card: ModelCard, exported: ExportedModel) -> None:
    (folder / ONNX_FILE).parent.mkdir(parents=True, exist_ok=True)
    (folder / ONNX_FILE).write_bytes(onnx_bytes)
    (folder / CARD_FILE).write_text(card.to_json())
    # Written last: a directory with version.json is complete.
    (folder / VERSION_FILE).write_text(json.dumps(asdict(exported), indent=2) + "\n")


class ModelDirectory:
    """An exported version, read as the service reads a registry: it answers to the
    champion alias, has no challenger, and never moves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.exported = _read_version(path)
        self.model_name = self.exported.model_name
        self._card = _read_card(path)

    def alias_version(self, alias: str) -> str | None:
        return self.exported.version if alias == CHAMPION else None

    def load_scorer(self, alias: str, role: str | None = None) -> TripScorer:
        if alias != CHAMPION:
            raise NoModelError(f"{self.path}: a model directory serves the champion only")
        onnx_bytes = (self.path / ONNX_FILE).read_bytes()
        if hashlib.sha256(onnx_bytes).hexdigest() != self.exported.onnx_sha256:
            raise ConfigError(
                f"{self.path / ONNX_FILE}: does not match the sha256 in {VERSION_FILE} "
                "(changed or partly copied); export the version again"
            )
        model = OnnxRiskModel(onnx_bytes)
        return TripScorer(
            model.predict_proba, self._card, self.model_name, self.exported.version, role or alias
        )

    def list_versions(self) -> list[VersionSummary]:
        tags = self.exported.tags
        return [
            VersionSummary(
                version=self.exported.version,
                aliases=(CHAMPION,),
                gate_status=tags.get("gate_status", "unknown"),
                code_version=tags.get("code_version", "unknown"),
                created_at=self.exported.registered_at,
                metrics=dict(self.exported.metrics),
            )
        ]

    def version_tags(self, version: str) -> dict[str, str]:
        return dict(self.exported.tags) if version == self.exported.version else {}


def _read_version(path: Path) -> ExportedModel:
    where = path / VERSION_FILE
    hint = "export a registered version there with `driverscore export-model`"
    if not path.is_dir():
        raise ConfigError(f"{path}: model directory not found; {hint}")
    try:
        document: Any = json.loads(where.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: missing, so {path} holds no exported model; {hint}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: unreadable ({exc}); {hint}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else None
        raise ConfigError(
            f"{where}: model directory format {found!r}, this driverscore reads {FORMAT}; {hint}"
        )
    try:
        return ExportedModel(**document)
    except TypeError as exc:
        raise ConfigError(f"{where}: not a driverscore version file ({exc}); {hint}") from None


def _read_card(path: Path) -> ModelCard:
    where = path / CARD_FILE
    try:
        return ModelCard.from_json(where.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{where}: missing; export the version again") from None
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not a model card ({first}); export it again") from None
