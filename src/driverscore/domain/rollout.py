"""Champion/challenger rollout rules: which model answers a trip, and who else scores it.

Pure code (no I/O, no clock): the REST service and the stream processor call the same
rules, so a driver lands on the same model whichever path scores their trips.

- ``champion``: only the champion scores.
- ``canary``: a fixed share of drivers, chosen by a hash of the driver id, is answered by
  the challenger; the rest by the champion. The model that does not answer scores the
  trip too (role ``shadow``, prediction log only), so both are compared on the same
  trips. The choice is sticky: a driver stays on the same side for as long as the
  percentage and salt stay the same, and raising the percentage only moves drivers from
  champion to challenger, never back.
- ``shadow``: both score every trip; the champion answers, the challenger's score is only
  logged (role ``shadow``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BUCKETS",
    "RolloutDecision",
    "RolloutMode",
    "RolloutPolicy",
    "canary_bucket",
    "decide",
]

RolloutMode = Literal["champion", "canary", "shadow"]
Role = Literal["champion", "challenger", "shadow"]

#: Drivers are hashed into this many buckets; a percentage selects the lowest buckets, so
#: canary shares are exact to 0.01 percentage points.
BUCKETS: Final = 10_000


class RolloutPolicy(BaseModel):
    """How traffic is split between the champion and the challenger."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: RolloutMode = Field(
        "champion",
        description=(
            "champion: champion only; canary: challenger_percent of drivers answered by the "
            "challenger; shadow: both score, champion answers, challenger is logged."
        ),
    )
    challenger_percent: float = Field(
        0.0,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="Canary: share of drivers (percent, 0-100) answered by the challenger.",
    )
    salt: str = Field(
        "driverscore",
        max_length=200,
        description="Mixed into the driver hash; a new salt reshuffles who is in the canary.",
    )


@dataclass(frozen=True, slots=True)
class RolloutDecision:
    """Who answers a trip and whether the other model scores it as well."""

    answered_by: Literal["champion", "challenger"]
    #: True when the model that does not answer also scores the trip (role ``shadow``, its
    #: score kept in the prediction log): canary and shadow mode.
    shadow: bool
    #: Role written into the answering score record.
    role: Role


def canary_bucket(driver_id: str, salt: str) -> int:
    """Stable bucket 0..BUCKETS-1 of a driver: SHA-256, so no process or seed changes it."""
    digest = hashlib.sha256(f"{salt}\x00{driver_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def decide(policy: RolloutPolicy, driver_id: str, has_challenger: bool) -> RolloutDecision:
    """The rollout decision for one trip of ``driver_id``.

    Without a challenger every trip goes to the champion, whatever the mode.
    """
    if not has_challenger or policy.mode == "champion":
        return RolloutDecision("champion", shadow=False, role="champion")
    if policy.mode == "shadow":
        return RolloutDecision("champion", shadow=True, role="champion")
    threshold = round(policy.challenger_percent / 100.0 * BUCKETS)
    if canary_bucket(driver_id, policy.salt) < threshold:
        return RolloutDecision("challenger", shadow=True, role="challenger")
    return RolloutDecision("champion", shadow=True, role="champion")
