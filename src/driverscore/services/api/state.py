"""What a service instance shares between its requests, and the threads that keep it current.

:class:`ServiceState` holds the settings, the models (``ModelHolder``), the rollout
policy, the prediction log, the profile writer, the metrics and the accepted tokens. Four
background threads, started and stopped by :meth:`ServiceState.lifespan`, keep it
current, each on its own clock so that none can hold up another: the registry poller, the
rollout-file watcher, the log flusher and the profile-part writer. Requests never call the registry.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

from pydantic import ValidationError

from driverscore.adapters.prediction_log import PredictionLog
from driverscore.domain.rollout import RolloutPolicy
from driverscore.services.api.errors import ServiceError
from driverscore.services.api.holder import LoadedModels, ModelHolder, RegistryReader
from driverscore.services.api.logs import flush_logs
from driverscore.services.api.metrics import ServiceMetrics
from driverscore.services.api.scoring import RequestLimits
from driverscore.services.live_monitor import LiveMonitor, build_live_monitor
from driverscore.services.prediction_log import open_prediction_log
from driverscore.services.profile_writer import ProfileWriter, build_profile_writer
from driverscore.settings import Settings

__all__ = ["ServiceState"]

_log = logging.getLogger("driverscore.service")
#: How often the prediction log and the batched log lines are written out (s).
_TICK_S: Final = 1.0
#: While no model is loaded, the registry is tried again at least this often (s).
_NOT_READY_RETRY_S: Final = 5.0
#: A registry call still running at shutdown is waited for this long at most (s).
_REGISTRY_JOIN_S: Final = 2.0


@dataclass
class ServiceState:
    """What the routes share: settings, models, rollout policy, log and metrics.

    Three background threads keep it current, each on its own clock so that none can hold
    up another: the registry poller (:meth:`poll_registry_forever`; registry calls have
    HTTP timeouts but may still take seconds), the rollout-file watcher and the log flusher
    (:meth:`every`). Requests never call the registry.
    """

    settings: Settings
    holder: ModelHolder
    metrics: ServiceMetrics
    prediction_log: PredictionLog
    policy: RolloutPolicy
    tokens: list[bytes]
    auth: bool
    limits: RequestLimits
    #: This process's scored trips over a rolling window, as drift gauges on ``/metrics``.
    live_monitor: LiveMonitor | None = None
    #: The trips this instance scored → profile parts in the data store, for the monitor.
    profile_writer: ProfileWriter | None = None
    rollout_mtime: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    models_frozen: bool = False

    @classmethod
    def create(
        cls,
        settings: Settings,
        registry_factory: Callable[[], RegistryReader],
        *,
        auth: bool,
        tokens: list[bytes],
    ) -> ServiceState:
        """The state of a new instance: no model yet (the poller loads them), the rollout
        split of the settings."""
        config = settings.service
        metrics = ServiceMetrics.create()
        holder = ModelHolder(registry_factory, on_swap=_record_models(metrics))
        live_monitor = build_live_monitor(
            settings,
            registry_factory,
            lambda: holder.models.champion.card if holder.models is not None else None,
        ).register(metrics.registry)
        return cls(
            settings=settings,
            holder=holder,
            live_monitor=live_monitor,
            profile_writer=build_profile_writer(settings, registry_factory, "service"),
            metrics=metrics,
            prediction_log=open_prediction_log(settings),
            policy=RolloutPolicy(
                mode=config.rollout_mode, challenger_percent=config.challenger_percent
            ),
            tokens=tokens,
            auth=auth,
            limits=RequestLimits(max_pings=config.max_pings, max_future_s=config.max_future_s),
        )

    def loaded_models(self) -> LoadedModels:
        """The models serving now; a 503 ``not_ready`` (with the reason) before the first load."""
        models = self.holder.models
        if models is None:
            raise ServiceError(
                503, "not_ready", f"no model loaded yet ({self.holder.public_error or 'loading'})"
            )
        return models

    def reload_rollout_file(self) -> None:
        path = self.settings.service.rollout_file
        if path is None:
            return
        try:
            mtime = path.stat().st_mtime
            if mtime == self.rollout_mtime:
                return
            policy = RolloutPolicy.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as exc:
            _log.error(
                "rollout file unreadable; keeping the current split",
                extra={"path": str(path), "error": type(exc).__name__},
            )
            return
        self.rollout_mtime = mtime
        if policy != self.policy:
            self.policy = policy
            _log.info("rollout changed", extra={"rollout": policy.model_dump()})

    def every(self, interval_s: float, action: Callable[[], None]) -> None:
        """Run ``action`` every ``interval_s`` seconds until the service stops."""
        while not self.stop.wait(interval_s):
            action()

    def poll_registry_forever(self) -> None:
        """Poll the registry at once, then every ``poll_interval_s`` (at least every 5 s
        while no model is loaded, so the service turns ready soon after the registry
        answers)."""
        while True:
            self.poll_registry()
            wait = self.settings.service.poll_interval_s
            if not self.holder.ready:
                wait = min(wait, _NOT_READY_RETRY_S)
            if self.stop.wait(wait):
                return

    def poll_registry(self) -> None:
        changed = self.holder.refresh()
        outcome = "failed" if self.holder.last_error else ("swapped" if changed else "unchanged")
        self.metrics.registry_polls.labels(outcome).inc()
        if changed and not self.models_frozen:
            # The first models live as long as the process, like the libraries: out of the
            # collector's full passes too (see ``lifespan``).
            gc.freeze()
            self.models_frozen = True

    def flush_logs(self) -> None:
        """Write out the prediction log and the request lines batched by the log handler."""
        self._flush_log()
        flush_logs()

    def flush_profiles(self) -> None:
        """Write the profile parts of the trips scored since the last flush."""
        if self.profile_writer is None:
            return
        try:
            self.profile_writer.flush()
        except Exception:
            _log.exception("profile parts could not be written; the trips wait for the next flush")
            self.metrics.errors.labels("profile_parts").inc()

    def _flush_log(self) -> None:
        try:
            self.prediction_log.flush()
        except Exception:
            _log.exception("prediction log flush failed")
            self.metrics.errors.labels("prediction_log").inc()

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """The app's lifespan: open the prediction log and start the background threads;
        at shutdown stop them and write out the log.

        The registry is not awaited here: a registry that is down or slow delays readiness
        (``/readyz`` says why), never listening.
        """
        self.prediction_log.setup()
        self.reload_rollout_file()
        # Everything loaded so far (libraries) lives as long as the process: keep it out of
        # the garbage collector's full passes, which otherwise stall requests.
        gc.collect()
        gc.freeze()
        poller = threading.Thread(
            target=self.poll_registry_forever, name="registry-poller", daemon=True
        )
        workers = [
            threading.Thread(
                target=self.every,
                args=(self.settings.service.rollout_reload_s, self.reload_rollout_file),
                name="rollout-file-watcher",
                daemon=True,
            ),
            threading.Thread(
                target=self.every,
                args=(_TICK_S, self.flush_logs),
                name="log-flusher",
                daemon=True,
            ),
            # Parts every few minutes, not every second: each flush writes one file per
            # model version and hour of trip end, and the monitor reads them all.
            threading.Thread(
                target=self.every,
                args=(self.settings.monitoring.profile_flush_s, self.flush_profiles),
                name="profile-parts",
                daemon=True,
            ),
        ]
        for thread in (poller, *workers):
            thread.start()
        try:
            yield
        finally:
            self.stop.set()
            for thread in workers:
                await asyncio.to_thread(thread.join, 10)
            # A daemon thread: a registry call in flight must not hold up the stop.
            await asyncio.to_thread(poller.join, _REGISTRY_JOIN_S)
            self.prediction_log.flush()
            await asyncio.to_thread(self.flush_profiles)


def _record_models(metrics: ServiceMetrics) -> Callable[[LoadedModels], None]:
    def record(models: LoadedModels) -> None:
        metrics.models.info(
            {
                "model_name": models.champion.model_name,
                "champion_version": models.champion.model_version,
                "challenger_version": (
                    models.challenger.model_version if models.challenger else "none"
                ),
            }
        )

    return record
