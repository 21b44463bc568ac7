"""The decision job and the rollback watch: evidence from the logs, moves in the registry.

While a challenger runs (canary or shadow) both models score every trip, and the
prediction log holds both probabilities under one decision id; the trips' times, fleet
and client come from the scored trips (``scores`` datasets, the service's and the
stream's trip keys), outcomes from the claims the monitor joins. The rules are in
``domain/decision.py``; this module gathers their inputs and moves the aliases through
the registry's guard (``ModelRegistry.guard``/``move_alias``), so every move is audited
and two deciders at once move an alias once.

``now`` lets replayed simulated days drive both jobs: trip times and label maturity are
judged on it, never on the wall clock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import polars as pl

from driverscore.adapters.profile_parts import ProfilePartStore
from driverscore.adapters.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    UNCHECKED,
    ModelRegistry,
    _Unchecked,
    open_registry,
)
from driverscore.adapters.storage import DataStore
from driverscore.domain.audit import AliasMove
from driverscore.domain.decision import (
    LabelledPairs,
    OperationalStats,
    Verdict,
    WatchInput,
    decide_challenger,
    judge_watch,
)
from driverscore.domain.rollout import RolloutPolicy
from driverscore.errors import AliasMoveError
from driverscore.pipelines.monitoring_run import _claims
from driverscore.services.prediction_log import open_prediction_log
from driverscore.settings import Settings
from driverscore.training.dataset import LABEL_COLUMN, label_trips

__all__ = [
    "ChallengerEvidence",
    "DecisionOutcome",
    "WatchOutcome",
    "challenger_evidence",
    "promote",
    "reject",
    "rollback",
    "run_decision",
    "run_rollback_watch",
]

_UTC_US: Final = pl.Datetime("us", "UTC")
_TRIP_KEY: Final = ["vehicle_id", "trip_id"]
_SLICE_COLUMNS: Final = ("fleet_id", "client_id")
_FACT_COLUMNS: Final = ("vehicle_id", "trip_id", "start_ts", "end_ts", *_SLICE_COLUMNS)
#: How far back of ``now`` the trip keys of the service and the stream are read.
_KEYS_LOOKBACK: Final = timedelta(days=60)


@dataclass(frozen=True)
class ChallengerEvidence:
    """What the running challenger has shown so far against the champion, on the same trips.

    ``ready`` says the rules can decide now (promote or reject); ``verdict`` is what they
    would decide (``collect`` while not ready)."""

    champion_version: str | None
    challenger_version: str | None
    rollout: RolloutPolicy
    paired_trips: int
    labelled_trips: int
    positive_labels: int
    started_at: datetime | None
    ready: bool
    verdict: Verdict | None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rollout"] = self.rollout.model_dump()
        return out


@dataclass(frozen=True)
class DecisionOutcome:
    """What the decision job did: its action, why, the numbers, and the main alias move."""

    action: Literal["promote", "reject", "collect", "none"]
    reasons: list[str]
    evidence: dict[str, Any] = field(default_factory=dict)
    move: AliasMove | None = None


@dataclass(frozen=True)
class WatchOutcome:
    """What the rollback watch saw, and the move back when it rolled back."""

    rolled_back: bool
    reasons: list[str]
    evidence: dict[str, Any] = field(default_factory=dict)
    move: AliasMove | None = None


# -- evidence -------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC)


def _store(settings: Settings) -> DataStore:
    return DataStore(settings.resolved_data_uri, settings.storage_options())


def _prediction_log(settings: Settings) -> pl.DataFrame:
    log = open_prediction_log(settings)
    log.setup()
    return log.read()


def _trip_facts(store: DataStore, versions: list[str], now: datetime) -> pl.DataFrame:
    """Times, fleet and client of every scored trip (latest scoring wins): from the
    ``scores`` datasets, and the keys the service and the stream store for ``versions``."""
    frames: list[pl.DataFrame] = []
    for ref in store.versions("scores"):
        for part in store.scan_dataset(ref, columns=(*_FACT_COLUMNS, "scored_at")):
            if {"vehicle_id", "trip_id", "end_ts"} <= set(part.columns):
                frames.append(part)
    parts = ProfilePartStore(store)
    for version in versions:
        # The keys the service and the stream store beside their profile parts (batch
        # scoring's trips are in the ``scores`` datasets read above).
        keys = parts.keys(version, now - _KEYS_LOOKBACK, now + timedelta(days=1))
        if {"vehicle_id", "trip_id", "end_ts"} <= set(keys.columns):
            frames.append(
                keys.select([c for c in (*_FACT_COLUMNS, "scored_at") if c in keys.columns])
            )
    frames = [f for f in frames if f.height]
    if not frames:
        return pl.DataFrame(schema={c: pl.String() for c in _TRIP_KEY})
    facts = pl.concat(frames, how="diagonal_relaxed")
    facts = facts.with_columns(
        pl.col("start_ts").cast(_UTC_US), pl.col("end_ts").cast(_UTC_US)
    ).with_columns(pl.col(_TRIP_KEY).cast(pl.String()))
    if "scored_at" in facts.columns:
        facts = facts.sort("scored_at", nulls_last=False)
    return facts.unique(subset=_TRIP_KEY, keep="last", maintain_order=True).select(
        [c for c in _FACT_COLUMNS if c in facts.columns]
    )


def _trial_rows(log: pl.DataFrame, champion: str, challenger: str) -> pl.DataFrame:
    """The log's decisions of this champion/challenger pair, each trip once (the latest)."""
    if log.height == 0:
        return log
    rows = log.filter(
        (pl.col("champion_version") == champion) & (pl.col("challenger_version") == challenger)
    )
    keyed = rows.filter(pl.col("trip_id").is_not_null() & pl.col("vehicle_id").is_not_null())
    return keyed.sort("logged_at").unique(subset=_TRIP_KEY, keep="last", maintain_order=True)


def _error_rates(rows: pl.DataFrame) -> OperationalStats:
    """A model that scored none of a trip the other scored failed it (the scoring paths
    log the trip with that model's probability empty). Latency is not in the log: it
    stays unmeasured here (the service's ``/metrics`` has it)."""
    if rows.height == 0:
        return OperationalStats()
    return OperationalStats(
        champion_error_rate=_null_share(rows, "champion_probability"),
        challenger_error_rate=_null_share(rows, "challenger_probability"),
    )


def _null_share(rows: pl.DataFrame, column: str) -> float:
    return float(np.mean(rows.get_column(column).is_null().to_numpy()))


def _labelled(
    settings: Settings,
    store: DataStore,
    paired: pl.DataFrame,
    facts: pl.DataFrame,
    now: datetime,
    probabilities: tuple[str, str],
) -> pl.DataFrame | None:
    """The paired trips whose claims matured by ``now``, with the ``incident`` column."""
    if paired.height == 0 or "end_ts" not in facts.columns:
        return None
    claims = _claims(settings, store, None)
    if claims is None:
        return None
    timed = paired.join(facts, on=_TRIP_KEY, how="inner")
    timed = timed.filter(pl.col("start_ts").is_not_null() & pl.col("end_ts").is_not_null())
    if timed.height == 0:
        return None
    labelled = label_trips(
        timed,
        claims,
        reference_time=now,
        maturity_days=settings.training.label_maturity_days,
    )
    return labelled.filter(
        pl.col(probabilities[0]).is_not_null() & pl.col(probabilities[1]).is_not_null()
    )


def _pairs(labelled: pl.DataFrame) -> LabelledPairs:
    slices: dict[str, npt.NDArray[np.object_]] = {
        c: labelled.get_column(c).cast(pl.String()).to_numpy().astype(object)
        for c in _SLICE_COLUMNS
        if c in labelled.columns
    }
    return LabelledPairs(
        y=labelled.get_column(LABEL_COLUMN).to_numpy().astype(np.int_),
        champion=labelled.get_column("champion_probability").to_numpy().astype(np.float64),
        challenger=labelled.get_column("challenger_probability").to_numpy().astype(np.float64),
        slices=slices,
    )


def _started_at(
    registry: ModelRegistry, challenger: str, paired: pl.DataFrame, facts: pl.DataFrame
) -> datetime | None:
    """When the trial began: its first paired trip's end (trip time, the clock ``now``
    runs on), else its first logged decision, else the challenger's registration."""
    if paired.height and "end_ts" in facts.columns:
        ends = paired.join(facts, on=_TRIP_KEY, how="inner").get_column("end_ts").drop_nulls()
        if ends.len():
            first = ends.min()
            if isinstance(first, datetime):
                return first.astimezone(UTC)
    if paired.height:
        first = paired.get_column("logged_at").min()
        if isinstance(first, datetime):
            return first.astimezone(UTC)
    for move in registry.audit_log(limit=200):
        if move.alias == CHALLENGER and move.to_version == challenger:
            return move.at
    return None


def challenger_evidence(settings: Settings, *, now: datetime | None = None) -> ChallengerEvidence:
    """The running challenger's evidence against the champion so far, and the verdict the
    rules would give now (``ready`` when that verdict is promote or reject)."""
    return _evidence(settings, open_registry(settings), _now(now))


def _evidence(settings: Settings, registry: ModelRegistry, now: datetime) -> ChallengerEvidence:
    champion = registry.alias_version(CHAMPION)
    challenger = registry.alias_version(CHALLENGER)
    rollout = registry.rollout_policy()
    if champion is None or challenger is None:
        return ChallengerEvidence(champion, challenger, rollout, 0, 0, 0, None, False, None)
    store = _store(settings)
    rows = _trial_rows(_prediction_log(settings), champion, challenger)
    paired = rows.filter(
        pl.col("champion_probability").is_not_null()
        & pl.col("challenger_probability").is_not_null()
    )
    facts = _trip_facts(store, [champion, challenger], now)
    labelled = _labelled(
        settings, store, paired, facts, now, ("champion_probability", "challenger_probability")
    )
    pairs = _pairs(labelled) if labelled is not None and labelled.height else None
    started_at = _started_at(registry, challenger, paired, facts)
    verdict = decide_challenger(
        paired.get_column("champion_probability").to_numpy(),
        paired.get_column("challenger_probability").to_numpy(),
        pairs,
        _error_rates(rows),
        started_at=started_at,
        now=now,
        config=settings.decision,
    )
    verdict.evidence.update({"champion_version": champion, "challenger_version": challenger})
    return ChallengerEvidence(
        champion_version=champion,
        challenger_version=challenger,
        rollout=rollout,
        paired_trips=paired.height,
        labelled_trips=pairs.size if pairs else 0,
        positive_labels=pairs.positives if pairs else 0,
        started_at=started_at,
        ready=verdict.action != "collect",
        verdict=verdict,
    )


# -- moves ----------------------------------------------------------------------------------


def promote(
    registry: ModelRegistry,
    version: str,
    *,
    actor: str,
    reason: str,
    evidence: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> AliasMove:
    """The challenger ``version`` becomes champion; the old champion is kept as
    ``previous``; the challenger alias goes; the rollout returns to champion-only.

    Under one guard, and the challenger and champion are checked first, before anything
    moves: a decider that lost the race to another moves nothing."""
    with registry.guard(actor):
        challenger = registry.alias_version(CHALLENGER)
        if challenger != version:
            raise AliasMoveError(
                f"version {version} is not the challenger (the challenger is "
                f"{challenger or 'unset'}); only the challenger can be promoted"
            )
        champion = registry.alias_version(CHAMPION)
        said = _Said(actor, reason, evidence or {}, at)
        move = said.move(registry, CHAMPION, version, "promote", champion)
        if champion is not None:
            said.move(registry, PREVIOUS, champion, "promote")
        said.move(registry, CHALLENGER, None, "promote", version)
        _champion_only(registry, actor, f"{version} promoted", at)
        return move


def reject(
    registry: ModelRegistry,
    version: str,
    *,
    actor: str,
    reason: str,
    evidence: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> AliasMove:
    """The challenger alias is removed (the version stays registered); the champion is
    untouched and the rollout returns to champion-only."""
    with registry.guard(actor):
        challenger = registry.alias_version(CHALLENGER)
        if challenger != version:
            raise AliasMoveError(
                f"version {version} is not the challenger (the challenger is "
                f"{challenger or 'unset'}); only the challenger can be rejected"
            )
        move = registry.move_alias(
            CHALLENGER,
            None,
            action="reject",
            actor=actor,
            reason=reason,
            evidence=evidence or {},
            expect_from=version,
            at=at,
        )
        _champion_only(registry, actor, f"{version} rejected", at)
        return move


def rollback(
    registry: ModelRegistry,
    *,
    actor: str,
    reason: str,
    expect_champion: str | None = None,
    evidence: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> AliasMove:
    """``champion`` moves back to ``previous`` (which is then cleared, so a second
    rollback cannot bounce back). ``expect_champion``: the champion the caller judged."""
    with registry.guard(actor):
        previous = registry.alias_version(PREVIOUS)
        champion = registry.alias_version(CHAMPION)
        if previous is None:
            raise AliasMoveError(
                f"model {registry.model_name!r} has no previous champion to roll back to "
                "(nothing was promoted since, or it was rolled back already)"
            )
        if expect_champion is not None and champion != expect_champion:
            raise AliasMoveError(
                f"the champion is {champion or 'unset'}, not {expect_champion}: it was moved "
                "meanwhile; nothing was rolled back"
            )
        said = _Said(actor, reason, evidence or {}, at)
        move = said.move(registry, CHAMPION, previous, "rollback", champion)
        said.move(registry, PREVIOUS, None, "rollback", previous)
        return move


@dataclass(frozen=True)
class _Said:
    """Who moves, why and on what evidence: the same for every alias of one decision."""

    actor: str
    reason: str
    evidence: dict[str, Any]
    at: datetime | None

    def move(
        self,
        registry: ModelRegistry,
        alias: str,
        version: str | None,
        action: Literal["promote", "rollback"],
        expect_from: str | _Unchecked | None = UNCHECKED,
    ) -> AliasMove:
        return registry.move_alias(
            alias,
            version,
            action=action,
            actor=self.actor,
            reason=self.reason,
            evidence=self.evidence,
            expect_from=expect_from,
            at=self.at,
        )


def _champion_only(registry: ModelRegistry, actor: str, why: str, at: datetime | None) -> None:
    current = registry.rollout_policy()
    if current.mode != "champion":
        registry.set_rollout_policy(
            current.model_copy(update={"mode": "champion", "challenger_percent": 0.0}),
            actor=actor,
            reason=f"{why}: no challenger to route to",
            at=at,
        )


# -- jobs -----------------------------------------------------------------------------------


def run_decision(
    settings: Settings, *, now: datetime | None = None, actor: str = "decision-job"
) -> DecisionOutcome:
    """Decide on the running challenger: promote, reject, or keep collecting.

    A decider that finds the aliases moved by another in the meantime moves nothing and
    answers ``none`` with the reason."""
    when = _now(now)
    registry = open_registry(settings)
    evidence = _evidence(settings, registry, when)
    if evidence.challenger_version is None or evidence.verdict is None:
        return DecisionOutcome("none", ["no challenger is running"])
    verdict = evidence.verdict
    reason = "; ".join(verdict.reasons)
    try:
        if verdict.action == "promote":
            move = promote(
                registry,
                evidence.challenger_version,
                actor=actor,
                reason=reason,
                evidence=verdict.evidence,
                at=when,
            )
        elif verdict.action == "reject":
            move = reject(
                registry,
                evidence.challenger_version,
                actor=actor,
                reason=reason,
                evidence=verdict.evidence,
                at=when,
            )
        else:
            return DecisionOutcome("collect", verdict.reasons, verdict.evidence)
    except AliasMoveError as exc:
        return DecisionOutcome("none", [str(exc)], verdict.evidence)
    return DecisionOutcome(verdict.action, verdict.reasons, verdict.evidence, move)


def _last_promotion(registry: ModelRegistry, champion: str) -> AliasMove | None:
    for move in registry.audit_log(limit=200):
        if move.alias == CHAMPION:
            return move if move.action == "promote" and move.to_version == champion else None
    return None


def run_rollback_watch(settings: Settings, *, now: datetime | None = None) -> WatchOutcome:
    """Watch the champion promoted last: within ``decision.watch_days`` of its promotion,
    a breached guardrail against the previous champion (score distribution, error rate)
    or a realised log-loss worse than the previous champion's moves ``champion`` back to
    ``previous``."""
    when = _now(now)
    config = settings.decision
    registry = open_registry(settings)
    champion = registry.alias_version(CHAMPION)
    previous = registry.alias_version(PREVIOUS)
    if champion is None or previous is None:
        return WatchOutcome(False, ["no promotion to watch (no previous champion)"])
    promotion = _last_promotion(registry, champion)
    if promotion is None:
        return WatchOutcome(False, [f"champion {champion} was not promoted by a decision"])
    if when - promotion.at > timedelta(days=config.watch_days):
        return WatchOutcome(False, [f"the {config.watch_days:g}-day watch window has ended"])
    store = _store(settings)
    log = _prediction_log(settings)
    facts = _trip_facts(store, [champion, previous], when)
    if log.height == 0:
        return WatchOutcome(False, ["no trips scored since the promotion"])
    timed = log.join(facts, on=_TRIP_KEY, how="left")
    if "end_ts" not in timed.columns:
        timed = timed.with_columns(pl.lit(None, dtype=_UTC_US).alias("end_ts"))
    # The new champion's trips since the promotion, against the previous champion's last
    # trips as champion before it (trip time when known, else log time).
    moment = pl.coalesce(pl.col("end_ts"), pl.col("logged_at"))
    window = timedelta(days=config.watch_days)
    current = timed.filter(
        (pl.col("champion_version") == champion) & (moment >= promotion.at) & (moment <= when)
    ).unique(subset=_TRIP_KEY, keep="last", maintain_order=True)
    before = timed.filter((pl.col("champion_version") == previous) & (moment < promotion.at))
    if before.height:
        # Its last ``watch_days`` of trips as champion: the trial may have ended well
        # before the decision ran.
        last = before.select(moment.max()).item()
        before = before.filter(moment >= last - window)
    scored = current.filter(pl.col("champion_probability").is_not_null())
    ops = OperationalStats(
        champion_error_rate=_missing_share(before),
        challenger_error_rate=_missing_share(current),
    )
    labelled = _labelled(
        settings,
        store,
        scored.select(log.columns),
        facts,
        when,
        ("champion_probability", "champion_probability"),
    )
    previous_loss = promotion.evidence.get("log_loss.champion")
    watch = WatchInput(
        champion=scored.get_column("champion_probability").to_numpy().astype(np.float64),
        previous=before.get_column("champion_probability")
        .drop_nulls()
        .to_numpy()
        .astype(np.float64),
        ops=ops,
        labelled_y=(
            labelled.get_column(LABEL_COLUMN).to_numpy().astype(np.int_)
            if labelled is not None and labelled.height
            else None
        ),
        labelled_p=(
            labelled.get_column("champion_probability").to_numpy().astype(np.float64)
            if labelled is not None and labelled.height
            else None
        ),
        previous_log_loss=float(previous_loss) if isinstance(previous_loss, int | float) else None,
    )
    verdict = judge_watch(watch, config)
    evidence = {**verdict.evidence, "champion_version": champion, "previous_version": previous}
    if verdict.action != "reject":
        return WatchOutcome(False, verdict.reasons, evidence)
    try:
        move = rollback(
            registry,
            actor="rollback-watch",
            reason="; ".join(verdict.reasons),
            expect_champion=champion,
            evidence=evidence,
            at=when,
        )
    except AliasMoveError as exc:
        return WatchOutcome(False, [str(exc)], evidence)
    return WatchOutcome(True, verdict.reasons, evidence, move)


def _missing_share(rows: pl.DataFrame) -> float | None:
    if rows.height == 0:
        return None
    return _null_share(rows, "champion_probability")
