"""Where the stream's models come from, and how its closed trips are scored.

A :class:`ModelSource` hands out the current :class:`~driverscore.domain.trip_scoring.
ScoringModels` (champion, challenger when set): fixed for the run, or polled from the
registry. A :class:`Scoring` turns a group of closed sessions' pings into scored trips
with those models: in process that is the domain's one scoring path,
:func:`~driverscore.domain.trip_scoring.score_trip_pings`; through a running
``driverscore serve`` it is :class:`~driverscore.services.stream.remote.RemoteScoring`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

import polars as pl

from driverscore.adapters.registry import CHAMPION
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import TripScorer
from driverscore.domain.trip_scoring import PingScoring, ScoringModels, score_trip_pings
from driverscore.errors import NoModelError
from driverscore.services.api.holder import ModelHolder, RegistryReader
from driverscore.services.stream.remote import remote_scoring
from driverscore.settings import Settings

__all__ = [
    "FixedModels",
    "ModelSource",
    "PolledModels",
    "RolloutSource",
    "Scoring",
    "stream_models",
    "stream_scoring",
]


_log = logging.getLogger("driverscore.stream.models")


class ModelSource(Protocol):
    def current(self) -> ScoringModels: ...


@runtime_checkable
class RolloutSource(Protocol):
    """A model source that also knows the rollout policy stored in the registry."""

    def rollout(self, configured: RolloutPolicy) -> RolloutPolicy: ...


class Scoring(Protocol):
    """Closed sessions' canonical pings → scored trips, as ``score_trip_pings`` does."""

    def __call__(
        self,
        pings: pl.DataFrame,
        models: ScoringModels,
        policy: RolloutPolicy,
        now: datetime,
        /,
    ) -> PingScoring: ...


@dataclass(frozen=True)
class FixedModels:
    """One model for the whole run (e.g. a named alias other than champion)."""

    scorer: TripScorer

    def current(self) -> ScoringModels:
        return ScoringModels(self.scorer)


class PolledModels:
    """Champion and challenger by registry alias, re-checked every ``poll_interval_s``.

    The REST service's :class:`~driverscore.services.api.holder.ModelHolder` does the
    loading: a moved alias swaps in the new version for every session closed after the
    poll; a registry that fails keeps the models already loaded (the holder logs it).
    """

    def __init__(
        self,
        holder: ModelHolder,
        poll_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.holder = holder
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self._stored_rollout: RolloutPolicy | None = None
        holder.refresh()
        if holder.models is None:
            raise NoModelError(f"no champion model to stream with: {holder.last_error}")
        self._poll_rollout()
        self._next_poll = clock() + poll_interval_s

    def current(self) -> ScoringModels:
        if self.clock() >= self._next_poll:
            self.holder.refresh()
            self._poll_rollout()
            self._next_poll = self.clock() + self.poll_interval_s
        loaded = self.holder.models
        assert loaded is not None  # set at construction, never unset by a refresh
        return ScoringModels(loaded.champion, loaded.challenger)

    def rollout(self, configured: RolloutPolicy) -> RolloutPolicy:
        """The policy stored in the registry at the last poll; ``configured`` (the stream's
        setting) while the registry holds none."""
        return self._stored_rollout or configured

    def _poll_rollout(self) -> None:
        try:
            registry = self.holder.rollout_registry()
            self._stored_rollout = (
                registry.stored_rollout_policy() if registry is not None else None
            )
        except Exception as exc:
            # As with the models: a registry that fails keeps the split already in use.
            _log.error(
                "rollout policy unreadable in the registry; keeping the current split",
                extra={"error": type(exc).__name__},
            )


def stream_models(settings: Settings, registry: Callable[[], RegistryReader]) -> ModelSource:
    """The stream's models: champion and challenger polled by alias, or one fixed alias.

    ``registry`` opens the model registry (the composition root knows how).
    """
    config = settings.kafka
    if config.model_alias != CHAMPION:
        return FixedModels(registry().load_scorer(config.model_alias))
    return PolledModels(ModelHolder(registry), config.poll_interval_s)


def stream_scoring(settings: Settings) -> Scoring:
    """In process (the domain's scoring), or through the service at ``kafka.scoring_url``."""
    if settings.kafka.scoring_url is None:
        return score_trip_pings
    return remote_scoring(settings.kafka)
