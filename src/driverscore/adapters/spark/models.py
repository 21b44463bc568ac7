"""The models a Spark job scores with, as the driver ships them and the executors load them.

The driver broadcasts each model's ONNX export and model card once (:class:`ShippedModel`);
an executor's Python worker builds the scorer the first time a task needs it and keeps it
for the tasks after (:func:`executor_scorer`). The cache is keyed by the ONNX bytes' digest
*and* the card: a model re-registered with another card (thresholds, score mapping, feature
configuration) over the same export must never be scored with the stale card.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Final

from driverscore.adapters.onnx_model import OnnxRiskModel
from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import ModelCard, TripScorer
from driverscore.domain.trip_scoring import ScoringModels

__all__ = ["ShippedModel", "ShippedScoring", "executor_scorer"]

#: Scorers kept per Python worker; a run uses one or two, a long-lived worker a few more.
_CACHE_SIZE: Final = 8


@dataclass(frozen=True)
class ShippedModel:
    """One model version as it travels to the executors: pickle-free bytes and text."""

    onnx: bytes
    card_json: str
    model_name: str
    model_version: str
    role: str
    #: SHA-256 of ``onnx``, computed once on the driver.
    onnx_digest: str

    @classmethod
    def of(
        cls, onnx: bytes, card: ModelCard, model_name: str, model_version: str, role: str
    ) -> ShippedModel:
        return cls(
            onnx=onnx,
            card_json=card.to_json(),
            model_name=model_name,
            model_version=model_version,
            role=role,
            onnx_digest=hashlib.sha256(onnx).hexdigest(),
        )

    @property
    def cache_key(self) -> tuple[str, str, str, str, str]:
        return (self.onnx_digest, self.card_json, self.model_name, self.model_version, self.role)


@dataclass(frozen=True)
class ShippedScoring:
    """What an executor needs to score trips as ``driverscore score`` does on one machine."""

    champion: ShippedModel
    challenger: ShippedModel | None
    policy_json: str

    def models(self) -> ScoringModels:
        challenger = self.challenger
        return ScoringModels(
            executor_scorer(self.champion),
            executor_scorer(challenger) if challenger is not None else None,
        )

    def policy(self) -> RolloutPolicy:
        return RolloutPolicy.model_validate_json(self.policy_json)


_scorers: dict[tuple[str, str, str, str, str], TripScorer] = {}
_lock = threading.Lock()


def executor_scorer(shipped: ShippedModel) -> TripScorer:
    """The scorer of ``shipped`` in this process, built once per (model bytes, card)."""
    key = shipped.cache_key
    with _lock:
        scorer = _scorers.get(key)
        if scorer is None:
            model = OnnxRiskModel(shipped.onnx)
            scorer = TripScorer(
                model.predict_proba,
                ModelCard.from_json(shipped.card_json),
                shipped.model_name,
                shipped.model_version,
                shipped.role,
            )
            if len(_scorers) >= _CACHE_SIZE:
                _scorers.pop(next(iter(_scorers)))
            _scorers[key] = scorer
        return scorer
