"""Drift gauges of one process: its own scored trips over a rolling window, on ``/metrics``.

The service and the stream processor each hold a :class:`LiveMonitor`. Scored trips are
handed to it as they are answered (cheap: a list append); at most once a second they are
profiled on the champion's reference edges into the current minute's profile, and a
scrape judges the merge of the last ``window_s`` of minute profiles (mergeable profiles:
the window is a sum, never a rescan). The gauges are a view of this process only; the
scheduled ``driverscore monitor`` over every record is the source of truth, and its last
realised performance is shown beside them when the data store holds one.

Registered as a Prometheus collector, so the numbers are computed when scraped (at most
every ``min_interval_s``), not on the request path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import polars as pl
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from driverscore.domain.drift import MonitoringConfig
from driverscore.domain.monitoring import judge_window
from driverscore.domain.performance import estimate_performance
from driverscore.domain.profiles import (
    SCORE_COLUMNS,
    TripProfile,
    merge_profiles,
    profile_trips,
)
from driverscore.domain.scoring import ModelCard
from driverscore.settings import Settings

__all__ = ["LiveMonitor", "ReferenceSource", "build_live_monitor"]

_log = logging.getLogger("driverscore.monitor")

_VERDICT_VALUE: Final = {"ok": 0, "warn": 1, "drift": 2, "degraded": 3}
_STATUS_VALUE: Final = {"ok": 0, "warn": 1, "drift": 2}
_STATISTICS: Final = ("psi", "ks", "wasserstein_norm", "js")
#: Rows waiting for a reference are dropped beyond this many (a registry that never
#: answers must not grow the process without bound).
_MAX_PENDING: Final = 200_000


@dataclass
class _Minute:
    start: float
    profile: TripProfile
    probabilities: list[float] = field(default_factory=list)
    pings_in: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)


class LiveMonitor(Collector):
    """A rolling window of this process's champion-scored trips, judged on scrape.

    ``reference_loader(version)`` returns the version's reference profile (JSON bytes) or
    None; ``threshold_loader(version)`` its card's decision threshold and metrics;
    ``scheduled_result()`` the newest scheduled monitoring result (or None).
    """

    def __init__(
        self,
        config: MonitoringConfig,
        reference_loader: Callable[[str], bytes | None],
        *,
        card_metrics: Callable[[str], tuple[float, Mapping[str, float]]] | None = None,
        scheduled_result: Callable[[], Mapping[str, Any] | None] | None = None,
        window_s: float = 3600.0,
        bucket_s: float = 60.0,
        min_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        load_in_background: bool = True,
    ) -> None:
        self.config = config
        self.window_s = window_s
        self.bucket_s = bucket_s
        self.min_interval_s = min_interval_s
        self._reference_loader = reference_loader
        self._card_metrics = card_metrics
        self._scheduled_result = scheduled_result
        self._clock = clock
        # A scrape must never wait on the registry (a hung registry would hang /metrics):
        # a new champion's reference is fetched by a thread of its own.
        self._load_in_background = load_in_background
        self._lock = threading.Lock()
        self._pending: list[pl.DataFrame] = []
        self._lazy: list[
            tuple[Sequence[Any], Callable[[Sequence[Any]], tuple[pl.DataFrame, Mapping[str, int]]]]
        ] = []
        self._pending_rows = 0
        self._pending_pings = 0
        self._pending_quarantine: Counter[str] = Counter()
        self._version: str | None = None
        self._reference: TripProfile | None = None
        self._minutes: deque[_Minute] = deque()
        self._cached: list[Metric] = []
        self._cached_at = -float("inf")
        self.dropped_rows = 0

    def register(self, registry: CollectorRegistry) -> LiveMonitor:
        registry.register(self)
        return self

    # -- feeding --------------------------------------------------------------------------

    def observe(
        self,
        records: pl.DataFrame,
        *,
        pings_in: int = 0,
        quarantined: Mapping[str, int] | None = None,
    ) -> None:
        """Trip score records (``TRIP_RECORD_SCHEMA`` columns) of this process."""
        with self._lock:
            if records.height:
                if self._pending_rows + records.height > _MAX_PENDING:
                    self.dropped_rows += records.height
                else:
                    self._pending.append(records)
                    self._pending_rows += records.height
            self._pending_pings += pings_in
            self._pending_quarantine.update(quarantined or {})

    def observe_later(
        self,
        items: Sequence[Any],
        to_records: Callable[[Sequence[Any]], tuple[pl.DataFrame, Mapping[str, int]]],
        *,
        pings_in: int = 0,
    ) -> None:
        """Answers in any shape (the REST service's ``TripScore``), turned into records and
        quarantine counts by ``to_records`` only when folded: a request pays a list append."""
        with self._lock:
            if self._pending_rows + len(items) > _MAX_PENDING:
                self.dropped_rows += len(items)
                return
            self._lazy.append((items, to_records))
            self._pending_rows += len(items)
            self._pending_pings += pings_in

    # -- folding ----------------------------------------------------------------------------

    def _fold(self) -> None:
        """Profile the pending records into the current minute (under the lock)."""
        quarantined, self._pending_quarantine = self._pending_quarantine, Counter()
        for items, to_records in self._lazy:
            frame, counts = to_records(items)
            self._pending.append(frame)
            quarantined.update(counts)
        self._lazy = []
        frames = [f for f in self._pending if f.height]
        pending = pl.concat(frames, how="diagonal_relaxed") if frames else None
        self._pending, self._pending_rows = [], 0
        pings, self._pending_pings = self._pending_pings, 0
        now = self._clock()
        while self._minutes and self._minutes[0].start <= now - self.window_s:
            self._minutes.popleft()
        versions: list[str] = []
        if pending is not None and "model_version" in pending.columns:
            champion = pending.filter(pl.col("model_role") == "champion")
            versions = champion.get_column("model_version").unique().sort().to_list()
            pending = champion
        if versions and versions[-1] != self._version:
            self._switch(str(versions[-1]))
        if self._reference is None:
            # Kept for when the reference arrives, within the bound.
            if pending is not None and pending.height:
                self._pending, self._pending_rows = [pending], pending.height
            self._pending_pings, self._pending_quarantine = pings, quarantined
            return
        if pending is not None and self._version is not None:
            pending = pending.filter(pl.col("model_version") == self._version)
        minute_start = now - (now % self.bucket_s)
        if not self._minutes or self._minutes[-1].start != minute_start:
            edges = self._reference.edges
            self._minutes.append(_Minute(minute_start, merge_profiles([], edges)))
        minute = self._minutes[-1]
        if pending is not None and pending.height:
            minute.profile = minute.profile.merge(profile_trips(pending, self._reference.edges))
            minute.probabilities.extend(
                pending.get_column("risk_probability").cast(pl.Float64).drop_nulls().to_list()
            )
        minute.pings_in += pings
        minute.quarantined.update(quarantined)

    def _switch(self, version: str) -> None:
        """A new champion: a window that starts again (profiles on other edges do not
        merge), and its reference, fetched off the scrape (under the lock)."""
        self._version = version
        self._minutes.clear()
        self._reference = None
        if self._load_in_background:
            threading.Thread(
                target=self._load_reference, args=(version,), name="reference-loader", daemon=True
            ).start()
        else:
            self._reference = self._fetch(version)

    def _fetch(self, version: str) -> TripProfile | None:
        try:
            stored = self._reference_loader(version)
        except Exception:
            _log.exception("reference profile of version %s could not be loaded", version)
            return None
        if stored is None:
            _log.warning("model version %s has no reference profile: no drift gauges", version)
            return None
        return TripProfile.from_json(stored)

    def _load_reference(self, version: str) -> None:
        profile = self._fetch(version)
        with self._lock:
            if self._version == version:
                self._reference = profile
                # The next scrape folds what waited for it.
                self._cached_at = -float("inf")

    # -- gauges -----------------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        now = self._clock()
        with self._lock:
            if now - self._cached_at >= self.min_interval_s:
                try:
                    self._fold()
                    self._cached = list(self._metrics())
                except Exception:
                    _log.exception("live monitoring failed; gauges left as they were")
                self._cached_at = now
            return list(self._cached)

    def _metrics(self) -> Iterator[Metric]:
        trips = GaugeMetricFamily(
            "driverscore_monitor_window_trips",
            "Champion-scored trips of this process in the rolling window.",
        )
        reference = self._reference
        minutes = list(self._minutes)
        window = (
            merge_profiles((m.profile for m in minutes), reference.edges) if reference else None
        )
        trips.add_metric([], window.rows if window else 0)
        yield trips
        if reference is None or window is None or self._version is None:
            return
        threshold, card_metrics = (
            self._card_metrics(self._version) if self._card_metrics else (0.5, {})
        )
        probabilities = np.array([p for m in minutes for p in m.probabilities])
        estimated = estimate_performance(probabilities, threshold)
        pings_in = sum(m.pings_in for m in minutes)
        quarantined: Counter[str] = Counter()
        for m in minutes:
            quarantined.update(m.quarantined)
        judged = judge_window(
            reference,
            window,
            self.config,
            model_columns=[n for n in reference.edges.numeric if n not in SCORE_COLUMNS],
            card_metrics=card_metrics,
            performance={"estimated": estimated},
        )
        drift = GaugeMetricFamily(
            "driverscore_monitor_drift",
            "Drift statistic of each column, this process's window vs the champion's reference.",
            labels=["column", "statistic"],
        )
        status = GaugeMetricFamily(
            "driverscore_monitor_drift_status",
            "0 ok, 1 warn, 2 drift, by the deciding statistic (settings.monitoring.decide_by).",
            labels=["column"],
        )
        for f in judged.features:
            for name in _STATISTICS:
                value = f.statistics.get(name)
                if value is not None:
                    drift.add_metric([f.column, name], value)
            status.add_metric([f.column], _STATUS_VALUE[f.status])
        yield drift
        yield status
        score = GaugeMetricFamily(
            "driverscore_monitor_score_shift",
            "Shift of the score distribution from the reference, by statistic.",
            labels=["statistic"],
        )
        for f in judged.features:
            if f.column == "score":
                for name in _STATISTICS:
                    value = f.statistics.get(name)
                    if value is not None:
                        score.add_metric([name], value)
        yield score
        bands = GaugeMetricFamily(
            "driverscore_monitor_band_share",
            "Share of the window's trips per risk band.",
            labels=["band"],
        )
        for band, share in judged.band_shares["current"].items():
            bands.add_metric([band], share)
        yield bands
        performance = GaugeMetricFamily(
            "driverscore_monitor_estimated_performance",
            "Performance expected from the calibrated probabilities of the window (CBPE).",
            labels=["metric"],
        )
        for metric in ("roc_auc", "pr_auc", "brier", "f1"):
            value = estimated.get(metric)
            if value is not None:
                performance.add_metric([metric], float(value))
        yield performance
        yield from self._realised()
        quarantine = GaugeMetricFamily(
            "driverscore_monitor_quarantine_share",
            "Share of this process's pings in the window quarantined, per reason.",
            labels=["reason"],
        )
        for reason, n in sorted(quarantined.items()):
            quarantine.add_metric([reason], n / pings_in if pings_in else 0.0)
        yield quarantine
        verdict = GaugeMetricFamily(
            "driverscore_monitor_verdict",
            "Verdict of this process's window: 0 ok, 1 warn, 2 drift, 3 degraded.",
        )
        verdict.add_metric([], _VERDICT_VALUE[judged.verdict])
        yield verdict

    def _realised(self) -> Iterator[Metric]:
        realised = GaugeMetricFamily(
            "driverscore_monitor_realised_performance",
            "Realised performance on matured trips, from the newest scheduled monitoring run.",
            labels=["metric"],
        )
        result = None
        if self._scheduled_result is not None:
            try:
                result = self._scheduled_result()
            except Exception:
                _log.exception("the newest monitoring result could not be read")
        values = ((result or {}).get("performance") or {}).get("realised") or {}
        for metric in ("roc_auc", "pr_auc", "brier", "f1", "calibration_error"):
            value = values.get(metric)
            if value is not None:
                realised.add_metric([metric], float(value))
        yield realised


class ReferenceSource:
    """Reference profiles by version, from the registry the process already uses."""

    def __init__(self, registry_factory: Callable[[], Any]) -> None:
        self._factory = registry_factory
        self._registry: Any = None

    def __call__(self, version: str) -> bytes | None:
        if self._registry is None:
            self._registry = self._factory()
        loaded: bytes | None = self._registry.load_reference_profile(version)
        return loaded


class _NewestResult:
    """The newest scheduled monitoring result that measured realised performance, re-read
    once a minute.

    Newest by the time the run was made (``created_at``): run ids start with the window's
    end, which many runs can share. A run without matured labels measures nothing and does
    not hide the last realised value.
    """

    def __init__(self, data_uri: str, storage_options: Mapping[str, object]) -> None:
        self._data_uri = data_uri
        self._storage_options = storage_options
        self._read_at = -float("inf")
        self._result: Mapping[str, Any] | None = None

    def __call__(self) -> Mapping[str, Any] | None:
        now = time.monotonic()
        if now - self._read_at >= 60.0:
            from driverscore.adapters.storage import DataStore

            self._read_at = now
            store = DataStore(self._data_uri, self._storage_options)
            # Run ids sort by window end: the last two days of hourly runs are enough.
            uris = store.report_uris("monitoring", "monitoring.json")[-48:]
            results = [store.read_json(uri) for uri in uris]
            measured = [
                r for r in results if ((r.get("performance") or {}).get("realised") or None)
            ]
            self._result = max(measured, key=lambda r: str(r.get("created_at", "")), default=None)
        return self._result


def build_live_monitor(
    settings: Settings,
    registry_factory: Callable[[], Any],
    current_card: Callable[[], ModelCard | None],
) -> LiveMonitor:
    """The process's live monitor: references from the registry (``load_reference_profile``),
    the champion's threshold and holdout metrics from its loaded card, the scheduled
    monitor's realised performance from the data store."""

    def card_metrics(_version: str) -> tuple[float, Mapping[str, float]]:
        card = current_card()
        return (card.decision_threshold, card.metrics) if card else (0.5, {})

    return LiveMonitor(
        settings.monitoring,
        ReferenceSource(registry_factory),
        card_metrics=card_metrics,
        scheduled_result=_NewestResult(settings.resolved_data_uri, settings.storage_options()),
    )
