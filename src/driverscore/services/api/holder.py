"""The models a service process serves, swapped whole when a registry alias moves.

A request reads :attr:`ModelHolder.models` once and scores with that snapshot; a swap
replaces the reference, so requests in flight finish on the models they started with and
no request ever sees a half-loaded pair.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Protocol

from driverscore.domain.scoring import TripScorer

if TYPE_CHECKING:
    from driverscore.adapters.versions import VersionSummary

__all__ = ["LoadedModels", "ModelHolder", "RegistryReader"]

_log = logging.getLogger("driverscore.service.models")


class RegistryReader(Protocol):
    """What the service needs from the registry (``ModelRegistry`` provides it)."""

    model_name: str

    def alias_version(self, alias: str) -> str | None: ...
    def load_scorer(self, alias: str, role: str | None = None) -> TripScorer: ...
    def list_versions(self) -> list[VersionSummary]: ...
    def version_tags(self, version: str) -> dict[str, str]: ...


@dataclass(frozen=True)
class LoadedModels:
    """A consistent champion/challenger pair and when each was loaded."""

    champion: TripScorer
    challenger: TripScorer | None
    #: The challenger scoring alongside without answering (role ``shadow``).
    shadow: TripScorer | None
    champion_loaded_at: datetime
    challenger_loaded_at: datetime | None
    #: Per loaded version: run metrics (holdout) from the registry, and its tags (lineage).
    run_metrics: dict[str, dict[str, float]]
    tags: dict[str, dict[str, str]]


class ModelHolder:
    """Loads the champion and challenger by alias and reloads them when an alias moves.

    ``registry_factory`` is called lazily (a registry that is down at start must not stop
    the process from starting); registry errors are kept in :attr:`last_error` and the
    models already loaded keep serving.
    """

    def __init__(
        self,
        registry_factory: Callable[[], RegistryReader],
        on_swap: Callable[[LoadedModels], None] | None = None,
    ) -> None:
        self._factory = registry_factory
        self._registry: RegistryReader | None = None
        self._on_swap = on_swap
        self._refresh_lock = threading.Lock()
        self.models: LoadedModels | None = None
        self.last_error: str | None = None
        #: ``last_error`` without details (paths, URIs): safe to show to clients.
        self.public_error: str | None = None
        self.model_name: str | None = None

    @property
    def ready(self) -> bool:
        return self.models is not None

    def _reader(self) -> RegistryReader:
        if self._registry is None:
            self._registry = self._factory()
            self.model_name = self._registry.model_name
        return self._registry

    def refresh(self) -> bool:
        """Check both aliases and swap in whatever moved; True when something changed.

        Raises nothing: a failure is logged, kept in :attr:`last_error` and leaves the
        loaded models in place.
        """
        with self._refresh_lock:
            try:
                changed = self._refresh()
            except Exception as exc:
                self.last_error = _describe(exc)
                self.public_error = _public_reason(exc)
                _log.error(
                    "cannot load models from the registry; "
                    + ("serving the models already loaded" if self.ready else "not ready"),
                    extra={"error": self.last_error, "ready": self.ready},
                )
                return False
            self.last_error = None
            self.public_error = None
            return changed

    def _refresh(self) -> bool:
        # Imported here, in the poller's thread, not with this module: MLflow (behind the
        # registry adapter) takes seconds to import, and the service listens before then.
        from driverscore.adapters.registry import CHALLENGER, CHAMPION

        registry = self._reader()
        current = self.models
        champion_version = registry.alias_version(CHAMPION)
        challenger_version = registry.alias_version(CHALLENGER)
        if champion_version is None:
            raise LookupError(
                f"model {registry.model_name!r} has no version with alias {CHAMPION!r}; "
                "train and register one first (driverscore train)"
            )
        now = datetime.now(UTC)
        if current is not None and current.champion.model_version == champion_version:
            champion, champion_at = current.champion, current.champion_loaded_at
        else:
            champion, champion_at = registry.load_scorer(CHAMPION), now
        challenger: TripScorer | None = None
        challenger_at: datetime | None = None
        if challenger_version is not None and challenger_version != champion_version:
            if (
                current is not None
                and current.challenger is not None
                and (current.challenger.model_version == challenger_version)
            ):
                challenger, challenger_at = current.challenger, current.challenger_loaded_at
            else:
                challenger, challenger_at = registry.load_scorer(CHALLENGER), now
        # An alias can move again while we load: trust what was loaded, the next poll
        # picks up a later move.
        if current is not None and (
            champion is current.champion and challenger is current.challenger
        ):
            return False
        shadow = (
            TripScorer(
                challenger.predict_proba,
                challenger.card,
                challenger.model_name,
                challenger.model_version,
                "shadow",
            )
            if challenger is not None
            else None
        )
        versions = [champion.model_version] + ([challenger.model_version] if challenger else [])
        summaries = {s.version: s for s in registry.list_versions()}
        run_metrics = {v: summaries[v].metrics if v in summaries else {} for v in versions}
        tags = {v: registry.version_tags(v) for v in versions}
        loaded = LoadedModels(
            champion, challenger, shadow, champion_at, challenger_at, run_metrics, tags
        )
        self.models = loaded
        _log.info(
            "models loaded",
            extra={
                "model_name": champion.model_name,
                "champion_version": champion.model_version,
                "challenger_version": challenger.model_version if challenger else None,
            },
        )
        if self._on_swap is not None:
            self._on_swap(loaded)
        return True


#: Words in a failed registry call's error that say why the registry did not answer.
_UNREACHABLE: Final = (
    ("connection refused", "connection refused"),
    ("timed out", "timed out"),
    ("timeout", "timed out"),
    ("name or service not known", "host name not found"),
    ("temporary failure in name resolution", "host name not found"),
    ("max retries exceeded", "no answer"),
)


def _public_reason(exc: Exception) -> str:
    """Why no model can be loaded, for /readyz: the kind of failure, no address or path."""
    if isinstance(exc, LookupError):
        return "no champion model is registered"
    text = str(exc).lower()
    why = next((what for words, what in _UNREACHABLE if words in text), None)
    if why is None and isinstance(exc, OSError):
        why = type(exc).__name__
    if why is not None:
        return f"model registry unreachable ({why}); the service log has its address"
    return f"model registry failed ({type(exc).__name__}); the service log has the error"


def _describe(exc: Exception) -> str:
    """One line for logs and /readyz: the error kind and its first line, no traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]
