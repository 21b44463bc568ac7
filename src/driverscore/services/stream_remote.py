"""The stream's trips scored through the scoring service (`driverscore serve`) over REST.

Features stay local: a closed session's pings go through the same ``prepare_trips`` with
the champion card's cleaning, trip and feature configs as in-process scoring (and batch).
Only the scoring moves: the feature rows of one batch of closed trips are posted, in the
features form of ``TripIn``, in one ``POST /v1/score:batch`` request (split at
``scoring_max_trips``), and the answers become the same score-record frame
:meth:`TripScorer.score_trips` returns, so trip outputs, alerts, Kafka messages and the
embedded sinks do not change. The model name, version and role of each record are the
service's: its champion/challenger split is the one applied (the stream's own ``rollout``
setting must stay at ``champion``).

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
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import polars as pl

from driverscore.domain.scoring import SCORE_RECORD_COLUMNS, TripScorer
from driverscore.errors import ConfigError, InputDataError, ScoringServiceError
from driverscore.services.api.schemas import TripFeaturesIn
from driverscore.services.stream import ModelSource, StreamModels
from driverscore.settings import KafkaConfig, Settings

__all__ = ["RemoteModels", "RemoteScorer", "ScoringClient", "remote_models"]

log = logging.getLogger(__name__)

BATCH_ROUTE: Final = "/v1/score:batch"
_IDENTITY: Final = ("trip_id", "vehicle_id", "driver_id", "fleet_id", "client_id")
#: The posted feature fields (model inputs plus start/end), as the service's schema has them.
_FEATURES: Final = tuple(TripFeaturesIn.model_fields)
#: Features the service's schema allows to be null (unknown); every other one is required.
_NULLABLE: Final = frozenset(
    name for name, field in TripFeaturesIn.model_fields.items() if not field.is_required()
)
_EXCERPT: Final = 300


def _excerpt(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "…"


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

    def score_features(self, features: pl.DataFrame) -> pl.DataFrame:
        """Trip feature rows → trip score records, as :meth:`TripScorer.score_trips` builds them.

        The features are the rows ``prepare_trips`` made; the records are those rows plus the
        service's probability, score, band, reasons, model name/version/role and scoring
        time, in the same order and with the same columns and types.
        """
        base = features.drop([c for c in SCORE_RECORD_COLUMNS if c in features.columns])
        trips = _trip_bodies(base)
        answers: list[dict[str, Any]] = []
        for start in range(0, len(trips), self.max_trips):
            chunk = trips[start : start + self.max_trips]
            answers.extend(self._post(chunk))
        return _records(base, answers)

    def _post(self, trips: list[dict[str, Any]]) -> list[dict[str, Any]]:
        body = orjson.dumps({"trips": trips})
        problem = ""
        for attempt in range(self.tries):
            if attempt:
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._client.post(BATCH_ROUTE, content=body)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "scoring service %s unreachable (try %d of %d): %s",
                    self.url,
                    attempt + 1,
                    self.tries,
                    problem,
                )
                continue
            status = response.status_code
            if status >= 500 or status == 429:
                problem = f"HTTP {status}: {_excerpt(response)}"
                log.warning(
                    "scoring service %s failed (try %d of %d): %s",
                    self.url,
                    attempt + 1,
                    self.tries,
                    problem,
                )
                continue
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
        raise ScoringServiceError(
            f"the scoring service {self.url} did not score {len(trips)} trip(s) after "
            f"{self.tries} tries ({problem}); nothing was committed, the trips are scored "
            "again once it answers"
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
        sent = [t["trip_id"] for t in trips]
        got = [s.get("trip_id") if isinstance(s, dict) else None for s in scores]
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


def _records(base: pl.DataFrame, answers: list[dict[str, Any]]) -> pl.DataFrame:
    """The feature rows plus the answered score columns, typed as ``score_trips`` types them."""
    probabilities: npt.NDArray[np.float64] = np.array(
        [a["risk_probability"] for a in answers], dtype=np.float64
    )
    scores: npt.NDArray[np.float64] = np.array([a["score"] for a in answers], dtype=np.float64)
    return base.with_columns(
        pl.Series("risk_probability", probabilities, dtype=pl.Float64),
        pl.Series("score", scores, dtype=pl.Float64),
        pl.Series("risk_band", [a["risk_band"] for a in answers], dtype=pl.String),
        pl.Series("reasons", [list(a["reasons"]) for a in answers], dtype=pl.List(pl.String)),
        pl.Series("model_name", [a["model_name"] for a in answers], dtype=pl.String),
        pl.Series("model_version", [a["model_version"] for a in answers], dtype=pl.String),
        pl.Series("model_role", [a["model_role"] for a in answers], dtype=pl.String),
        pl.Series(
            "scored_at",
            [datetime.fromisoformat(a["scored_at"]) for a in answers],
            dtype=pl.Datetime("us", "UTC"),
        ),
    ).select(*base.columns, *SCORE_RECORD_COLUMNS)


def _not_in_process(_x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    raise RuntimeError("this scorer scores through the scoring service, not in-process")


class RemoteScorer(TripScorer):
    """The champion's card (configs, name, version) with its scoring done by the service.

    A :class:`TripScorer` to the stream: ``TripScoringStep`` prepares features with
    ``card``'s configs and calls :meth:`score_trips`, which posts them. The local ONNX
    model is never called.
    """

    def __init__(self, client: ScoringClient, local: TripScorer) -> None:
        super().__init__(
            _not_in_process, local.card, local.model_name, local.model_version, local.model_role
        )
        self.client = client
        self.local = local

    def score_trips(self, features: pl.DataFrame, scored_at: datetime) -> pl.DataFrame:
        """Posted to the service; ``scored_at`` is the service's, like the model that answers."""
        if scored_at.tzinfo is None:
            raise ValueError("scored_at must be timezone-aware (UTC)")
        return self.client.score_features(features)


class RemoteModels:
    """A :class:`ModelSource` whose champion scores through the service.

    ``cards`` (the registry's champion, polled like in-process scoring) gives the configs
    the features are computed with; no challenger or shadow is handed to the stream: the
    service applies its own split and names the answering model in every record.
    """

    def __init__(self, cards: ModelSource, client: ScoringClient) -> None:
        self.cards = cards
        self.client = client
        self._remote: RemoteScorer | None = None

    def current(self) -> StreamModels:
        champion = self.cards.current().champion
        if self._remote is None or self._remote.local is not champion:
            self._remote = RemoteScorer(self.client, champion)
        return StreamModels(self._remote)

    def close(self) -> None:
        """Closes the service connections (the registry source needs no closing)."""
        self.client.close()

    def __enter__(self) -> RemoteModels:
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


def remote_models(settings: Settings) -> RemoteModels:
    """The stream's models when ``kafka.scoring_url`` is set: registry cards, service scores."""
    from driverscore.adapters.registry import CHAMPION
    from driverscore.pipelines.training_run import open_registry
    from driverscore.services.api.holder import ModelHolder
    from driverscore.services.stream import PolledModels

    config = settings.kafka
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
    client = scoring_client(config)
    cards = PolledModels(ModelHolder(lambda: open_registry(settings)), config.poll_interval_s)
    return RemoteModels(cards, client)
