"""The Kafka-free stream processor: ping messages in, trip outputs out.

Messages are decoded by the ping contract (``adapters/kafka/messages.py``); rejected
ones go to the dead-letter topic with their original bytes and the reason in headers.
Pings are grouped per vehicle (the message key) into sessions whose inactivity gap is the
model card's ``TripConfig.gap_s`` - the rule batch uses to cut trips - with a grace period
for late pings (``domain/sessions.py``). When sessions close, their pings go through the
project's one scoring path (``domain/trip_scoring.py``, or the scoring service through
``services/stream/remote.py``), and every result is published: feature rows, score
records, alerts, shadow records, the rollout decisions, and trips set aside with their
reason on the dead-letter topic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

import polars as pl

from driverscore.adapters.kafka.messages import (
    DecodedMessage,
    decode_message,
    encode_batch,
    pings_frame,
)
from driverscore.adapters.kafka.prediction_log import encode_prediction, prediction_key
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.routes import ROUTE_SCHEMA, trip_routes
from driverscore.domain.scoring import TripScorer
from driverscore.domain.sessions import ClosedSession, PartitionScope, TripAssembler
from driverscore.domain.trip_scoring import (
    SET_ASIDE_SCHEMA,
    PingScoring,
    PredictionRecord,
    ScoringModels,
    score_trip_pings,
)
from driverscore.errors import ScoringServiceError
from driverscore.services.live_monitor import LiveMonitor
from driverscore.services.profile_writer import ProfileWriter
from driverscore.services.stream.metrics import StreamMetrics
from driverscore.services.stream.models import FixedModels, ModelSource, RolloutSource, Scoring
from driverscore.settings import KafkaTopics

__all__ = [
    "CLOSED_AT_HEADER",
    "CLOSE_TRIGGER_HEADER",
    "DLQ_REASON_HEADER",
    "DLQ_SOURCE_HEADER",
    "OutMessage",
    "PingProcessor",
    "ScoredSession",
    "TripScoringStep",
]

log = logging.getLogger(__name__)

DLQ_REASON_HEADER = "driverscore.dlq.reason"
DLQ_SOURCE_HEADER = "driverscore.dlq.source"
#: On every trip output: Kafka timestamp (ms) of the input message at which the trip was
#: published - the message that closed it, or, when closed trips wait to be scored together,
#: the message (or flush tick) that ended the wait.
CLOSE_TRIGGER_HEADER = "driverscore.close_trigger_ms"
#: With ``PingProcessor(closed_at_header=True)``: Kafka timestamp (ms) of the input message
#: at which the trip closed, the wait for its batch included (what close → score latency is
#: measured from); the trigger's when the close time was not kept (a trip pending before a
#: restart of an older version).
CLOSED_AT_HEADER = "driverscore.closed_ms"

_TripKey = tuple[str | None, str | None]


@dataclass(frozen=True)
class ScoredSession:
    """What one group of closed sessions gives, trips in the scoring path's order.

    ``records``: the answer of each scored trip (role ``champion`` or ``challenger``);
    ``features``: their feature rows, in the same order; ``alerts``: the records whose
    risk reached the answering card's decision threshold, plus an ``alert`` text;
    ``shadow``: the other model's records of the same trips (role ``shadow``, canary and
    shadow mode); ``decisions``: one prediction-log row per record (none when the scoring
    service logged them itself); ``set_aside``: trips (or shadow scores) not scored, with
    ``reason`` and ``detail`` and the trip's feature row; ``routes``: the thinned route
    of each scored trip (``domain/routes.py``), for the score store's trip view.
    """

    features: pl.DataFrame
    records: pl.DataFrame
    alerts: pl.DataFrame
    shadow: pl.DataFrame
    decisions: list[PredictionRecord]
    set_aside: pl.DataFrame
    routes: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=ROUTE_SCHEMA))
    #: Vehicle → Kafka timestamp (ms) of the message its trip closed at (one trip of a
    #: vehicle per scored group), when the closed sessions carried it.
    closed_ms: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, result: PingScoring) -> ScoredSession:
        scored = result.scored
        set_aside = scored.set_aside_frame()
        if set_aside.height:
            rows = result.features[[s.row for s in scored.set_aside]]
            set_aside = pl.concat(
                [set_aside, rows.drop([c for c in SET_ASIDE_SCHEMA if c in rows.columns])],
                how="horizontal",
            )
        records = scored.records_frame()
        routes = trip_routes(result.pings)
        if routes.height:
            routes = routes.join(
                records.select("vehicle_id", "trip_id"), on=["vehicle_id", "trip_id"], how="semi"
            )
        return cls(
            features=scored.features_frame(),
            records=records,
            alerts=scored.alerts_frame(),
            shadow=scored.shadow_frame(),
            decisions=list(scored.decisions),
            set_aside=set_aside,
            routes=routes,
        )


class TripScoringStep:
    """Closed sessions' pings → scored trips, by the project's one scoring path.

    The one trip-closing function of every stream runner: the Kafka processor
    (``build_stream_application``) and the embedded file replay
    (``services/stream_embedded.py``) both hand closed sessions to :meth:`close_sessions`.
    ``models`` gives the current champion and challenger; ``scoring`` scores the pings
    with them and the rollout ``policy``: in process (``score_trip_pings``, the default)
    or through the scoring service (``RemoteScoring``).
    """

    def __init__(
        self,
        models: TripScorer | ModelSource,
        metrics: StreamMetrics,
        *,
        policy: RolloutPolicy | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        scoring: Scoring = score_trip_pings,
        live_monitor: LiveMonitor | None = None,
        profile_writer: ProfileWriter | None = None,
    ) -> None:
        self.models: ModelSource = FixedModels(models) if isinstance(models, TripScorer) else models
        self.metrics = metrics
        #: Drift gauges of this processor's trips over a rolling window (on its /metrics).
        self.live_monitor = live_monitor
        #: The trips this processor scored → profile parts in the data store (flushed by
        #: the runner); None when the scoring service scores them (it writes their parts).
        self.profile_writer = profile_writer
        self.policy = policy or RolloutPolicy()
        #: The split of the settings, served while the registry holds none.
        self.configured_policy = self.policy
        self.now = now
        self.scoring = scoring
        self._shown: set[tuple[str, str]] = set()

    @property
    def scorer(self) -> TripScorer:
        """The current champion."""
        return self.models.current().champion

    def score_session(self, pings: list[dict[str, Any]]) -> ScoredSession | None:
        """Prepare and score closed sessions' pings; None when they make no trip at all."""
        with self.metrics.scoring_seconds.time():
            models = self.models.current()
            self._follow_rollout()
            self._show_models(models)
            result = self.scoring(pings_frame(pings), models, self.policy, self.now())
            scored = ScoredSession.of(result)
        self._count(result, scored)
        if result.features.height == 0:
            self.metrics.trips.labels("set_aside").inc()  # a session too short for a trip
            return None
        return scored

    def _follow_rollout(self) -> None:
        """Take the registry's rollout policy when the model source polls it: a split
        changed by the decision job or a person reaches the stream within one poll."""
        if isinstance(self.models, RolloutSource):
            policy = self.models.rollout(self.configured_policy)
            if policy != self.policy:
                log.info("rollout changed", extra={"rollout": policy.model_dump()})
                self.policy = policy

    def _count(self, result: PingScoring, scored: ScoredSession) -> None:
        quarantined: dict[str, int] = {}
        if result.quarantine.height:
            for reason, count in result.quarantine["reason"].value_counts().iter_rows():
                self.metrics.quarantined_pings.labels(str(reason)).inc(count)
                quarantined[str(reason)] = int(count)
        if self.live_monitor is not None:
            self.live_monitor.observe(
                scored.records,
                pings_in=int(result.counts.get("rows_in", 0)),
                quarantined=quarantined,
            )
        if self.profile_writer is not None:
            self.profile_writer.observe(scored.records)
        self.metrics.trips.labels("scored").inc(scored.records.height)
        self.metrics.alerts.inc(scored.alerts.height)
        for trip in result.scored.set_aside:
            role = "shadow" if trip.model_role == "shadow" else "answer"
            self.metrics.set_aside.labels(trip.reason, role).inc()
            if role == "answer":
                self.metrics.trips.labels("set_aside").inc()

    def _show_models(self, models: ScoringModels) -> None:
        shown = {("champion", models.champion.model_version)}
        challenger = models.challenger
        if challenger is not None and self.policy.mode != "champion":
            role = "challenger" if self.policy.mode == "canary" else "shadow"
            shown.add((role, challenger.model_version))
        if shown != self._shown:
            for role, version in self._shown - shown:
                self.metrics.model.remove(role, version)
            for role, version in shown:
                self.metrics.model.labels(role, version).set(1)
            self._shown = shown

    def close(
        self, vehicle: str, start: object, pings: list[dict[str, Any]]
    ) -> ScoredSession | None:
        """:meth:`score_session`, but a session that fails is counted and logged, not raised.

        A trip that cannot be scored must not stop the stream; a scoring service that cannot
        score (``ScoringServiceError``) must, uncommitted, so no trip is lost.
        """
        try:
            return self.score_session(pings)
        except ScoringServiceError:
            raise
        except Exception:
            self.metrics.trips.labels("failed").inc()
            log.exception("trip of %s starting at %s could not be scored", vehicle, start)
            return None

    def close_sessions(self, sessions: list[ClosedSession]) -> list[ScoredSession]:
        """Score closed sessions together, one vehicle's session per group at most.

        Many sessions close at once when event time jumps (a clock message, a partition
        catching up); one scoring call over all of them costs a fraction of one per
        session and gives every trip the same row (a trip's features do not depend on
        other trips). A group that fails is retried one session at a time, so one bad trip
        does not take its neighbours down.
        """
        groups: list[list[ClosedSession]] = []
        for session in sessions:
            home = next(
                (g for g in groups if all(s.vehicle_id != session.vehicle_id for s in g)), None
            )
            if home is None:
                groups.append([session])
            else:
                home.append(session)
        scored: list[ScoredSession] = []
        for group in groups:
            pings = [p for s in group for p in s.pings]
            if len(group) == 1:
                result = self.close(group[0].vehicle_id, group[0].start_us, pings)
            else:
                try:
                    result = self.score_session(pings)
                except ScoringServiceError:
                    raise
                except Exception:
                    scored.extend(self.close_sessions_alone(group))
                    continue
            if result is not None:
                scored.append(_with_close_times(result, group))
        return scored

    def close_sessions_alone(self, sessions: list[ClosedSession]) -> list[ScoredSession]:
        results = ((self.close(s.vehicle_id, s.start_us, s.pings), s) for s in sessions)
        return [_with_close_times(r, [s]) for r, s in results if r is not None]


def _with_close_times(scored: ScoredSession, group: list[ClosedSession]) -> ScoredSession:
    closed = {s.vehicle_id: s.closed_ms for s in group if s.closed_ms is not None}
    return replace(scored, closed_ms=closed) if closed else scored


@dataclass(frozen=True)
class OutMessage:
    """One message the processor publishes: the topic name, key, value bytes and headers."""

    topic: str
    key: str
    value: bytes
    headers: list[tuple[str, bytes]]


def _late_message(vehicle: str, late: list[dict[str, Any]]) -> bytes:
    rows = [{**p, "ts": datetime.fromtimestamp(int(p["ts"]) / 1e6, UTC)} for p in late]
    return encode_batch(vehicle, rows)


def _lines(frame: pl.DataFrame) -> list[bytes]:
    return [line.encode() for line in frame.write_ndjson().splitlines()] if frame.height else []


def _keys(frame: pl.DataFrame) -> list[_TripKey]:
    # A trip is its vehicle's trip: ids given by devices repeat across vehicles.
    return list(zip(frame["vehicle_id"].to_list(), frame["trip_id"].to_list(), strict=True))


#: The lead before a commit (``PingProcessor.commit_lead_s``): this many times the recent
#: scoring time at a commit, whose moving average gives the latest scoring this weight.
COMMIT_LEAD_MARGIN: Final = 1.5
COMMIT_SCORING_WEIGHT: Final = 0.2


class PingProcessor:
    """One ping message in, its output messages out: decode, assemble trips, score.

    Kafka-free: the Quix Streams application calls :meth:`process` for every message with
    the message's partition state; tests call it with a ``MemoryScope``. Everything after
    decoding leaves through one list, so a trip's feature row, score record and alert are
    produced together (and, under exactly-once, committed in the same transaction).
    """

    def __init__(
        self,
        step: TripScoringStep,
        assembler: TripAssembler,
        topics: KafkaTopics,
        metrics: StreamMetrics,
        clock: Callable[[], float] = time.perf_counter,
        *,
        batch_trips: int = 1,
        batch_wait_s: float = 0.0,
        catch_up_wait_s: float = 0.0,
        wall_clock: Callable[[], float] = time.time,
        commit_wait_s: float | None = None,
        closed_at_header: bool = False,
    ) -> None:
        self.step = step
        self.assembler = assembler
        self.topics = topics
        self.metrics = metrics
        self.clock = clock
        self.batch_trips = batch_trips
        self.batch_wait_s = batch_wait_s
        self.catch_up_wait_s = catch_up_wait_s
        self.wall_clock = wall_clock
        #: Exactly-once: outputs are read when their transaction commits, so closed trips
        #: wait for the checkpoint's commit (``process(committing=...)``) and every
        #: partition's are scored in one batch just before it; this long at most (the
        #: commit interval) plus ``batch_wait_s`` when no message comes at the commit.
        self.commit_wait_s = commit_wait_s
        self.closed_at_header = closed_at_header
        #: How long closed trips of a live processor wait at most (:meth:`overdue`).
        self.live_wait_s = batch_wait_s + (commit_wait_s or 0.0)
        #: Partitions with closed trips waiting to be scored, since when (``clock``).
        self.waiting: dict[Hashable, float] = {}
        #: How long scoring the trips waiting at a commit took lately (moving average).
        self.commit_scoring_s = 0.0
        self._published: dict[str, Any] = {}

    @property
    def commit_lead_s(self) -> float:
        """How long before the checkpoint expires the trips waiting for it are scored.

        Scored as it expires, the commit would wait for them, and every trip closing
        meanwhile would wait for the next commit that much longer; scored this early, the
        scoring is done as it expires. A margin over the recent scoring time, at most
        half the commit interval (trips closing in the lead go with the commit too: they
        are scored as it expires).
        """
        if self.commit_wait_s is None:
            return 0.0
        most = self.commit_wait_s / 2
        if self.commit_scoring_s == 0.0:
            # Not timed yet (a processor just started): the most, or the first trips would
            # miss the first commit and wait a whole interval more, while its first
            # transaction and the backlog it leaves make every later trip wait too.
            return most
        return min(most, COMMIT_LEAD_MARGIN * self.commit_scoring_s)

    def process(
        self,
        value: bytes | None,
        key: str | None,
        timestamp_ms: int,
        headers: list[tuple[str, bytes]],
        scope: PartitionScope,
        source: str,
        committing: Mapping[Hashable, PartitionScope] | None = None,
        partners: Callable[[], Mapping[Hashable, PartitionScope]] | None = None,
    ) -> list[OutMessage]:
        """``committing``: the checkpoint commits after this message or within
        :attr:`commit_lead_s`; the scopes of every partition that has a live transaction in
        it (with ``commit_wait_s``, their waiting trips are scored now, together).
        ``partners``: those scopes on demand; when this partition's trips are scored, the
        other partitions' waiting trips go in the same batch (one scoring instead of one
        per partition: a batch is mostly fixed cost)."""
        started = self.clock()
        decoded = decode_message(value, key)
        if decoded.error is None and decoded.clock_us is None and not key:
            decoded = DecodedMessage(error="key_mismatch: the message has no key (the vehicle id)")
        if decoded.error is not None:
            self.metrics.messages.count(decoded.reason_code or "invalid")
            reject = [
                (DLQ_REASON_HEADER, decoded.error.encode()),
                (DLQ_SOURCE_HEADER, source.encode()),
            ]
            return [self._out(self.topics.dlq, key or "", value or b"", [*headers, *reject])]
        if decoded.clock_us is not None:
            self.metrics.messages.count("clock")
            assembled = self.assembler.advance(scope, decoded.clock_us, message_ms=timestamp_ms)
        else:
            self.metrics.messages.count("accepted")
            assert key is not None
            assembled = self.assembler.add(scope, key, decoded.pings, message_ms=timestamp_ms)
        out: list[OutMessage] = []
        if assembled.late:
            self.metrics.late_pings.inc(len(assembled.late))
            everything = len(assembled.late) == len(decoded.pings)
            reason = (
                f"late_ping: {len(assembled.late)} ping(s) behind a closed trip or more than "
                "gap + grace behind the partition's event time"
            )
            out.append(
                self._out(
                    self.topics.dlq,
                    key or "",
                    (value or b"") if everything else _late_message(str(key), assembled.late),
                    [
                        *headers,
                        (DLQ_REASON_HEADER, reason.encode()),
                        (DLQ_SOURCE_HEADER, source.encode()),
                    ],
                )
            )
        closed = assembled.closed
        waiting = assembled.pending or self.waiting
        catching_up = self._catching_up(timestamp_ms) if waiting else False
        if assembled.pending:
            since = self.waiting.setdefault(scope.partition, started)
            wait = self.catch_up_wait_s if catching_up else self.live_wait_s
            if (
                assembled.pending >= self.batch_trips
                or decoded.clock_us is not None
                or started - since >= wait
            ):
                closed = closed + self.assembler.flush(scope)
                del self.waiting[scope.partition]
                if partners is not None and self.waiting:
                    committing = partners()
        if committing is not None and (self.commit_wait_s is not None or closed):
            # Also while catching up: a checkpoint's trips are one batch already, and a
            # 1 s catch-up wait would add a second to every trip of a processor that fell
            # behind for a moment.
            for partition, other in committing.items():
                if partition in self.waiting:
                    closed = closed + self.assembler.flush(other)
                    del self.waiting[partition]
        if closed:
            for scored in self.step.close_sessions(closed):
                out.extend(self._trip_messages(scored, timestamp_ms, source))
            took = self.clock() - started
            self.metrics.close_to_publish.observe(took)
            if committing is not None and self.commit_wait_s is not None:
                if self.commit_scoring_s == 0.0:  # the first: nothing to average with
                    self.commit_scoring_s = took
                else:
                    self.commit_scoring_s += COMMIT_SCORING_WEIGHT * (took - self.commit_scoring_s)
        return out

    def _catching_up(self, timestamp_ms: int) -> bool:
        """The message in hand was written ``catch_up_wait_s`` or more ago (its Kafka
        timestamp): the processor works through a backlog, its trips are late already,
        and waiting up to ``catch_up_wait_s`` to score more of them together costs less
        per trip (scoring a batch is mostly fixed cost). A live processor reads messages
        within milliseconds of their writing and keeps to ``batch_wait_s``."""
        if self.catch_up_wait_s <= self.batch_wait_s:
            return False
        return self.wall_clock() * 1000.0 - timestamp_ms >= self.catch_up_wait_s * 1000.0

    def overdue(self) -> list[Hashable]:
        """Partitions whose waiting trips are past ``live_wait_s`` (for :class:`FlushTicker`)."""
        now = self.clock()
        waiting = dict(self.waiting)  # written by the processing thread
        return [p for p, since in waiting.items() if now - since >= self.live_wait_s]

    def _trip_messages(
        self, scored: ScoredSession, trigger_ms: int, source: str
    ) -> list[OutMessage]:
        """A trip's feature row, route, score record, alert, shadow record and decision,
        trip by trip; then the trips set aside, on the dead-letter topic with their reason."""
        topics = self.topics
        out: list[OutMessage] = []
        trigger = [(CLOSE_TRIGGER_HEADER, str(trigger_ms).encode())]

        def trip_headers(vehicle: str) -> list[tuple[str, bytes]]:
            if not self.closed_at_header:
                return trigger
            closed_ms = scored.closed_ms.get(vehicle, trigger_ms)
            return [*trigger, (CLOSED_AT_HEADER, str(closed_ms).encode())]

        keys = _keys(scored.records)
        alerts = dict(zip(_keys(scored.alerts), _lines(scored.alerts), strict=True))
        shadows = dict(zip(_keys(scored.shadow), _lines(scored.shadow), strict=True))
        routes = dict(zip(_keys(scored.routes), _lines(scored.routes), strict=True))
        decisions: list[PredictionRecord | None] = (
            list(scored.decisions) if scored.decisions else [None] * len(keys)
        )
        if len(decisions) != len(keys):
            raise ValueError("scoring gave decisions that do not match its records")
        for key, feature, record, decision in zip(
            keys, _lines(scored.features), _lines(scored.records), decisions, strict=True
        ):
            vehicle = str(key[0])
            headers = trip_headers(vehicle)
            out.append(self._out(topics.trip_features, vehicle, feature, headers))
            route = routes.get(key)
            if route is not None:
                out.append(self._out(topics.routes, vehicle, route, headers))
            out.append(self._out(topics.scores, vehicle, record, headers))
            alert = alerts.get(key)
            if alert is not None:
                out.append(self._out(topics.alerts, vehicle, alert, headers))
            shadow = shadows.get(key)
            if shadow is not None:
                out.append(self._out(topics.shadow_scores, vehicle, shadow, headers))
            if decision is not None:
                value = encode_prediction(decision)
                out.append(self._out(topics.predictions, prediction_key(decision), value, headers))
        set_aside = scored.set_aside
        for row, line in zip(set_aside.iter_rows(named=True), _lines(set_aside), strict=True):
            reason = f"{row['reason']}: {row['detail']}"
            dead = [
                *trip_headers(str(row["vehicle_id"] or "")),
                (DLQ_REASON_HEADER, reason.encode()),
                (DLQ_SOURCE_HEADER, source.encode()),
            ]
            out.append(self._out(topics.dlq, str(row["vehicle_id"] or ""), line, dead))
        return out

    def _out(
        self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]
    ) -> OutMessage:
        counter = self._published.get(topic)
        if counter is None:
            counter = self._published[topic] = self.metrics.published.labels(topic)
        counter.inc()
        return OutMessage(topic, key, value, headers)
