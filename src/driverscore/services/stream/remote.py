"""The stream's trips scored through the scoring service (`driverscore serve`) over REST.

Features stay local: a closed session's pings go through the same ``prepare_trips`` with
the champion card's cleaning, trip and feature configs as in-process scoring (and batch).
Only the scoring moves: the feature rows of one batch of closed trips are posted, in the
features form of ``TripIn``, in one ``POST /v1/score:batch`` request (split at
``scoring_max_trips``), and the answers become the same trip score records (columns of
:data:`~driverscore.domain.trip_scoring.TRIP_RECORD_SCHEMA`) as in-process scoring, so
trip outputs, alerts, Kafka messages and the embedded sinks do not change. The model name,
version and role of each record are the service's: its rollout is the one applied (the
stream's own ``rollout`` setting must stay at ``champion``), and the service logs its
decisions itself, so this path hands no decisions to the stream. A trip alerts when its
probability reaches the decision threshold of the card of the version that answered.

Failures are never swallowed. Connection errors, timeouts and 5xx answers are retried
(``tries``, backoff doubling from ``backoff_s``); when the service still does not answer,
or refuses the stream's token, :class:`~driverscore.errors.ScoringServiceError` is raised:
the processor stops without committing, and the trips are processed again after a
restart. A 422 (the service refuses a trip's features) is a problem of those trips:
:class:`~driverscore.errors.InputDataError`, counted and logged as a failed trip like any
trip the in-process scorer cannot score.
"""

from __future__ import annotations

import logging
import math
import time
import typing
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import httpx
import orjson
import polars as pl
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from driverscore.adapters.registry import CHAMPION
from driverscore.domain.features import FEATURE_SCHEMA
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import SCORE_RECORD_COLUMNS, ModelCard
from driverscore.domain.trip_scoring import (
    ALERT_COLUMN,
    TRIP_RECORD_SCHEMA,
    PingScoring,
    ScoredTrips,
    ScoringModels,
    alert_text,
)
from driverscore.errors import ConfigError, InputDataError, ScoringServiceError
from driverscore.services.api.schemas import TripFeaturesIn
from driverscore.settings import KafkaConfig

__all__ = ["RemoteScoring", "ScoringClient", "remote_scoring", "scoring_client"]

log = logging.getLogger(__name__)

BATCH_ROUTE: Final = "/v1/score:batch"
_IDENTITY: Final = ("trip_id", "vehicle_id", "driver_id", "fleet_id", "client_id")
#: The posted feature fields (model inputs plus start/end), as the service's schema has them.
_FEATURES: Final = tuple(TripFeaturesIn.model_fields)
#: Features the service's schema allows to be null (unknown): those typed ``... | None``,
#: required or not; every other one must be a number.
_NULLABLE: Final = frozenset(
    name
    for name, field in TripFeaturesIn.model_fields.items()
    if type(None) in typing.get_args(field.annotation)
)
_EXCERPT: Final = 300


def _excerpt(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "…"


class _TransientScoringError(Exception):
    """A try that may succeed when repeated: the service unreachable, a 5xx or a 429."""


class ScoringClient:
    """``POST /v1/score:batch`` of trip feature rows, over one keep-alive connection pool."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 10.0,
        max_trips: int = 1_000,
        tries: int = 3,
        backoff_s: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if tries < 1:
            raise ValueError("tries must be at least 1")
        self.url = url.rstrip("/")
        self.max_trips = max_trips
        self.tries = tries
        self.backoff_s = backoff_s
        self.sleep = sleep
        headers = {"content-type": "application/json", "accept": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def score_features(self, features: pl.DataFrame) -> list[dict[str, Any]]:
        """Trip feature rows (as ``prepare_trips`` made them) → the service's ``TripScore``
        answers, one per row, in the same order."""
        base = features.drop([c for c in SCORE_RECORD_COLUMNS if c in features.columns])
        trips = _trip_bodies(base)
        answers: list[dict[str, Any]] = []
        for start in range(0, len(trips), self.max_trips):
            chunk = trips[start : start + self.max_trips]
            answers.extend(self._post(chunk))
        return answers

    def _post(self, trips: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One batch, retried on connection errors, 5xx and 429 with exponential back-off
        (``backoff_s``, then twice that, ...); any other refusal is final at once."""
        body = orjson.dumps({"trips": trips})
        retrying = Retrying(
            stop=stop_after_attempt(self.tries),
            wait=wait_exponential(multiplier=self.backoff_s, min=0),
            retry=retry_if_exception_type(_TransientScoringError),
            after=self._log_failed_try,
            sleep=self.sleep,
            reraise=True,
        )
        try:
            answers: list[dict[str, Any]] = retrying(self._post_once, body, trips)
        except _TransientScoringError as exc:
            raise ScoringServiceError(
                f"the scoring service {self.url} did not score {len(trips)} trip(s) after "
                f"{self.tries} tries ({exc}); nothing was committed, the trips are scored "
                "again once it answers"
            ) from None
        return answers

    def _log_failed_try(self, state: RetryCallState) -> None:
        outcome = state.outcome
        if outcome is not None and isinstance(outcome.exception(), _TransientScoringError):
            log.warning(
                "scoring service %s failed (try %d of %d): %s",
                self.url,
                state.attempt_number,
                self.tries,
                outcome.exception(),
            )

    def _post_once(self, body: bytes, trips: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            response = self._client.post(BATCH_ROUTE, content=body)
        except httpx.TransportError as exc:
            raise _TransientScoringError(f"unreachable: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status >= 500 or status == 429:
            raise _TransientScoringError(f"HTTP {status}: {_excerpt(response)}")
        if status == 200:
            return self._answers(response, trips)
        if status == 422:
            raise InputDataError(
                f"the scoring service {self.url} refused the features of "
                f"{len(trips)} trip(s) (HTTP 422): {_excerpt(response)}"
            )
        if status in (401, 403):
            raise ScoringServiceError(
                f"the scoring service {self.url} refused the stream's token (HTTP {status}); "
                "set DRIVERSCORE_KAFKA__SCORING_TOKEN to a token it accepts: "
                f"{_excerpt(response)}"
            )
        raise ScoringServiceError(
            f"the scoring service {self.url} answered HTTP {status} to {BATCH_ROUTE} "
            f"(is DRIVERSCORE_KAFKA__SCORING_URL a driverscore service?): {_excerpt(response)}"
        )

    def _answers(
        self, response: httpx.Response, trips: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        try:
            scores = orjson.loads(response.content)["scores"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ScoringServiceError(
                f"the scoring service {self.url} answered 200 without a scores list: "
                f"{_excerpt(response)}"
            ) from exc
        # A trip is its vehicle's trip: ids given by devices repeat across vehicles.
        sent = [(t["vehicle_id"], t["trip_id"]) for t in trips]
        got = [
            (s.get("vehicle_id"), s.get("trip_id")) if isinstance(s, dict) else None for s in scores
        ]
        if got != sent:
            raise ScoringServiceError(
                f"the scoring service {self.url} answered {len(scores)} score(s) for "
                f"{len(trips)} posted trip(s), not the same trips in the same order"
            )
        answers: list[dict[str, Any]] = scores
        return answers


def _trip_bodies(features: pl.DataFrame) -> list[dict[str, Any]]:
    """Feature rows as ``TripIn`` bodies in the features form (null ids left out)."""
    missing = [c for c in ("trip_id", "vehicle_id", *_FEATURES) if c not in features.columns]
    if missing:
        raise InputDataError(f"trip features lack column(s) to post: {', '.join(missing)}")
    trips: list[dict[str, Any]] = []
    present = [c for c in _IDENTITY if c in features.columns]
    for row in features.select(*present, *_FEATURES).iter_rows(named=True):
        posted: dict[str, Any] = {}
        for name in _FEATURES:
            value = row[name]
            if isinstance(value, float) and math.isnan(value):
                value = None
            if value is None and name not in _NULLABLE:
                raise InputDataError(
                    f"trip {row['trip_id']}: feature {name} is undefined, and the scoring "
                    "service takes it only as a number"
                )
            posted[name] = value
        trip = {k: row[k] for k in _IDENTITY if row.get(k) is not None}
        trip["features"] = posted
        trips.append(trip)
    return trips


def _scored_trips(
    features: pl.DataFrame, answers: list[dict[str, Any]], models: ScoringModels
) -> ScoredTrips:
    """The local feature rows plus the service's answers, as the domain's scored trips."""
    records: dict[str, list[Any]] = {
        name: features[name].to_list() if name in features.columns else [None] * features.height
        for name in FEATURE_SCHEMA
    }
    records["risk_probability"] = [float(a["risk_probability"]) for a in answers]
    records["score"] = [float(a["score"]) for a in answers]
    records["risk_band"] = [a["risk_band"] for a in answers]
    records["reasons"] = [list(a["reasons"]) for a in answers]
    for name in ("model_name", "model_version", "model_role"):
        records[name] = [a[name] for a in answers]
    records["scored_at"] = [datetime.fromisoformat(a["scored_at"]) for a in answers]
    assert list(records) == list(TRIP_RECORD_SCHEMA)

    cards = {
        scorer.model_version: scorer.card
        for scorer in (models.champion, models.challenger)
        if scorer is not None
    }
    alerts: dict[str, list[Any]] = {name: [] for name in (*TRIP_RECORD_SCHEMA, ALERT_COLUMN)}
    for i, answer in enumerate(answers):
        card = _answering_card(cards, str(answer["model_version"]), models.champion.card)
        probability = records["risk_probability"][i]
        if probability >= card.decision_threshold:
            for name in TRIP_RECORD_SCHEMA:
                alerts[name].append(records[name][i])
            alerts[ALERT_COLUMN].append(alert_text(probability, card))
    shadow: dict[str, list[Any]] = {name: [] for name in TRIP_RECORD_SCHEMA}
    # The service logs its rollout decisions itself: none are handed on from here.
    return ScoredTrips(records, shadow, alerts, [], list(range(len(answers))))


def _answering_card(cards: dict[str, ModelCard], version: str, champion: ModelCard) -> ModelCard:
    card = cards.get(version)
    if card is None:
        # The service's aliases moved before this stream's next registry poll: the
        # champion's threshold stands in until then.
        log.warning(
            "the scoring service answered with model version %s, not loaded here yet; "
            "alerting at the champion card's threshold until the next registry poll",
            version,
        )
        return champion
    return card


class RemoteScoring:
    """A :class:`~driverscore.services.stream.models.Scoring` through the service.

    Prepares the pings with the champion card's configs (the registry's champion, polled
    like in-process scoring, so the features are the batch ones), posts the feature rows
    and builds the records from the answers. The stream's rollout ``policy`` is not
    applied: the service's is (``remote_scoring`` refuses a stream-side split).
    """

    def __init__(self, client: ScoringClient) -> None:
        self.client = client

    def __call__(
        self,
        pings: pl.DataFrame,
        models: ScoringModels,
        policy: RolloutPolicy,
        now: datetime,
        /,
    ) -> PingScoring:
        card = models.champion.card
        prepared = prepare_trips(
            pings, card.cleaning_config, card.trip_config, card.feature_config, now, events=True
        )
        features = prepared.features
        answers = self.client.score_features(features) if features.height else []
        scored = _scored_trips(features, answers, models)
        return PingScoring(scored, features, prepared.quarantine, prepared.counts, prepared.pings)

    def close(self) -> None:
        """Closes the service connections."""
        self.client.close()

    def __enter__(self) -> RemoteScoring:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def scoring_client(config: KafkaConfig) -> ScoringClient:
    if config.scoring_url is None:
        raise ConfigError("kafka.scoring_url is not set")
    if not config.scoring_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"kafka.scoring_url '{config.scoring_url}' is not an http:// or https:// URL"
        )
    token = config.scoring_token.get_secret_value() if config.scoring_token else None
    return ScoringClient(
        config.scoring_url,
        token,
        timeout_s=config.scoring_timeout_s,
        max_trips=config.scoring_max_trips,
    )


def remote_scoring(config: KafkaConfig) -> RemoteScoring:
    """The stream's scoring when ``kafka.scoring_url`` is set; refuses a stream-side split."""
    if config.model_alias != CHAMPION:
        raise ConfigError(
            f"kafka.model_alias is '{config.model_alias}', but with kafka.scoring_url the "
            "service decides which model scores; leave model_alias at champion"
        )
    if config.rollout.mode != "champion":
        raise ConfigError(
            f"kafka.rollout.mode is '{config.rollout.mode}', but with kafka.scoring_url the "
            "service applies its own rollout (DRIVERSCORE_SERVICE__ROLLOUT_MODE, PUT "
            "/v1/rollout); leave the stream's at champion"
        )
    return RemoteScoring(scoring_client(config))
