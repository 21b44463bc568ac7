"""What the dashboard reads, and the questions each page asks of it.

The score store answers through its query set (``adapters/score_store/queries.py``) on
DuckDB or Druid alike; routes come from the store's routes table when there is one; the
registry, the rollout split and the monitor's latest result come through callables the
entry point wires (``cli.py``), so this module opens nothing itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, Protocol

import polars as pl

from driverscore.adapters.score_store import ScoreReader
from driverscore.adapters.score_store.queries import QueryParams
from driverscore.domain.audit import AliasMove
from driverscore.domain.rollout import RolloutPolicy

__all__ = [
    "ALERT_FEED_LIMIT",
    "DashboardSources",
    "EntityPage",
    "ModelCatalog",
    "ModelPage",
    "Overview",
    "Period",
    "PeriodError",
    "entity_page",
    "fleet_overview",
    "latest_alerts",
    "model_page",
    "parse_period",
]

Entity = Literal["driver", "vehicle"]

#: Alerts on the alerts page and in each refresh of its live feed.
ALERT_FEED_LIMIT: Final = 100
#: Trips listed on a driver's or vehicle's page.
HISTORY_LIMIT: Final = 200
#: Longest period a filter may ask for (days), and longest id or filter value (characters).
MAX_DAYS: Final = 3660.0
MAX_ID_CHARS: Final = 512
#: The gate metrics the model page draws per version (the holdout's, logged at training).
GATE_METRICS: Final = ("holdout.roc_auc", "holdout.pr_auc", "holdout.f1", "holdout.brier")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class PeriodError(ValueError):
    """A filter value the dashboard cannot use; its text is the one line shown (400)."""


class ModelCatalog(Protocol):
    """What the model page reads of the registry (``adapters.registry.ModelRegistry``)."""

    def list_versions(self) -> list[Any]: ...

    def audit_log(self, limit: int = 50) -> list[AliasMove]: ...

    def rollout_policy(self, default: RolloutPolicy | None = None) -> RolloutPolicy: ...


@dataclass(frozen=True)
class DashboardSources:
    """Where the pages read from (module docstring)."""

    reader: ScoreReader
    #: ``duckdb`` or ``druid``: shown in the page footer.
    engine: str
    #: A trip's route points (``ts``, ``lat``, ``lon``, event flags), ``None`` when none
    #: is stored.
    route: Callable[[str, str], pl.DataFrame | None] = lambda _vehicle, _trip: None
    #: The registry (opened on first use by the caller's factory), or ``None``: no model page.
    registry: Callable[[], ModelCatalog] | None = None
    #: The split in force on the scoring service serving the dashboard (``None``: served
    #: alone; the registry's policy is what every replica polls).
    service_rollout: Callable[[], RolloutPolicy] | None = None
    #: The monitor's latest result (``monitoring.json``), ``None`` before the first run.
    drift: Callable[[], dict[str, Any] | None] = lambda: None
    #: The clock (tests pin it).
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Period:
    """The fleet overview's filters: trips ending in ``start < end <= end``, one fleet and
    one client (``None``: all)."""

    start: datetime
    end: datetime
    days: float
    fleet: str | None = None
    client: str | None = None

    def params(self, **options: Any) -> QueryParams:
        return QueryParams(
            start=self.start, end=self.end, fleet_id=self.fleet, client_id=self.client, **options
        )


def _time(value: str, name: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PeriodError(
            f"{name}={value[:40]!r} is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _text(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name, "").strip()
    if len(value) > MAX_ID_CHARS:
        raise PeriodError(f"{name} is {len(value)} characters long: at most {MAX_ID_CHARS}")
    return value or None


_KNOWN: Final = frozenset({"days", "start", "end", "fleet", "client", "trip"})


def parse_period(query: Mapping[str, str], newest: datetime | None, now: datetime) -> Period:
    """The filters of a page's query string; a :class:`PeriodError` names the bad one.

    ``end`` defaults to the newest trip end stored (so a store of past days shows them),
    ``start`` to ``days`` (default 30) before ``end``.
    """
    unknown = sorted(set(query) - _KNOWN)
    if unknown:
        raise PeriodError(
            f"unknown filter {unknown[0][:40]!r}: use days, start, end, fleet or client"
        )
    raw_days = query.get("days", "").strip()
    try:
        days = float(raw_days) if raw_days else 30.0
    except ValueError:
        raise PeriodError(f"days={raw_days[:40]!r} is not a number of days (e.g. days=7)") from None
    if not math.isfinite(days) or not 0 < days <= MAX_DAYS:
        raise PeriodError(f"days={raw_days[:40]!r}: use a number of days above 0, at most 3660")
    end_text, start_text = _text(query, "end"), _text(query, "start")
    end = _time(end_text, "end") if end_text else (newest or now)
    start = _time(start_text, "start") if start_text else end - timedelta(days=days)
    if start >= end:
        raise PeriodError(f"start {start:%Y-%m-%d %H:%M} is not before end {end:%Y-%m-%d %H:%M}")
    days = (end - start) / timedelta(days=1)
    return Period(start, end, days, _text(query, "fleet"), _text(query, "client"))


@dataclass(frozen=True)
class Overview:
    period: Period
    fleets: pl.DataFrame
    clients: pl.DataFrame
    fleet_histogram: pl.DataFrame
    client_histogram: pl.DataFrame
    trend: pl.DataFrame
    bands: pl.DataFrame
    worst_drivers: pl.DataFrame


def fleet_overview(sources: DashboardSources, period: Period, *, worst: int = 15) -> Overview:
    """The fleet overview's answers over ``period`` (every one from the query set)."""
    asks = [
        ("group_scores", period.params(level="fleet")),
        ("group_scores", period.params(level="client")),
        ("score_histogram", period.params(level="fleet")),
        ("score_histogram", period.params(level="client")),
        ("daily_trend", period.params()),
        ("band_shares", period.params()),
        ("worst_drivers", period.params(limit=worst)),
    ]
    answers = sources.reader.query_many(asks)
    return Overview(period, *answers)


def alert_window(sources: DashboardSources, days: float = 7.0) -> QueryParams:
    """The alerts feed's period: from ``days`` before the newest trip stored (or now, if
    earlier: a store of past days) to a day after now or that trip (clocks differ)."""
    now = sources.now()
    newest = sources.reader.newest_trip_end() or now
    end = max(now, newest) + timedelta(days=1)
    start = min(now, newest) - timedelta(days=days)
    return QueryParams(start=start, end=end, limit=ALERT_FEED_LIMIT)


def latest_alerts(sources: DashboardSources) -> pl.DataFrame:
    """The newest alerts (by trip end), their reasons and scores."""
    return sources.reader.query("latest_alerts", alert_window(sources))


@dataclass(frozen=True)
class EntityPage:
    entity: Entity
    entity_id: str
    #: Trips newest first, with behaviours (``trip_history`` joined to ``trip_behaviours``).
    trips: pl.DataFrame
    #: The trip whose route is drawn, and its route (``None``: no route stored).
    trip_id: str | None
    vehicle_id: str | None
    route: pl.DataFrame | None


def entity_page(
    sources: DashboardSources, entity: Entity, entity_id: str, trip_id: str | None
) -> EntityPage | None:
    """A driver's or vehicle's trips (all stored, newest first) and one trip's route;
    ``None`` when the store holds no trip of theirs."""
    params = QueryParams(
        start=_EPOCH,
        end=max(sources.now(), sources.reader.newest_trip_end() or _EPOCH) + timedelta(days=1),
        entity=entity,
        entity_id=entity_id,
        limit=HISTORY_LIMIT,
    )
    trips, behaviours = sources.reader.query_many(
        [("trip_history", params), ("trip_behaviours", params)]
    )
    if trips.height == 0:
        return None
    behaviours = behaviours.drop("end_ts")
    trips = trips.join(behaviours, on=["vehicle_id", "trip_id"], how="left")
    chosen = trips.filter(pl.col("trip_id") == trip_id) if trip_id is not None else trips.head(1)
    if chosen.height == 0:
        chosen = trips.head(1)
    trip, vehicle = chosen["trip_id"][0], chosen["vehicle_id"][0]
    return EntityPage(entity, entity_id, trips, trip, vehicle, sources.route(vehicle, trip))


@dataclass(frozen=True)
class ModelPage:
    #: One row per version, newest first: version, aliases, gate status, created, metrics.
    versions: list[Any]
    #: ``None`` when the registry could not be read, with why.
    registry_error: str | None
    #: The rollout policy held by the registry (``None``: the registry could not be read).
    rollout: RolloutPolicy | None
    #: The split in force on the service serving this page (``None``: served alone).
    service_rollout: RolloutPolicy | None
    #: Trips per model version and role in the store over the last 30 days (observed split).
    served: pl.DataFrame
    drift: dict[str, Any] | None
    #: The registry's audit log of alias and rollout moves, newest first.
    audit: list[AliasMove]


def model_page(sources: DashboardSources) -> ModelPage:
    versions: list[Any] = []
    audit: list[AliasMove] = []
    error: str | None = None
    rollout: RolloutPolicy | None = None
    if sources.registry is None:
        error = "no registry configured"
    else:
        try:
            registry = sources.registry()
            versions = registry.list_versions()
            audit = registry.audit_log(limit=50)
            rollout = registry.rollout_policy()
        except Exception as exc:  # a down registry must not take the page down
            error = f"the registry could not be read: {str(exc).splitlines()[0][:300]}"
    newest = sources.reader.newest_trip_end() or sources.now()
    served = sources.reader.query(
        "model_versions", QueryParams(start=newest - timedelta(days=30), end=newest)
    )
    service = sources.service_rollout() if sources.service_rollout is not None else None
    return ModelPage(versions, error, rollout, service, served, sources.drift(), audit)
