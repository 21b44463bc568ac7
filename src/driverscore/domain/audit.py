"""The audit log of alias moves: who or what moved which alias, when, why, on what evidence.

Every move of a serving alias (``champion``, ``challenger``, ``previous``) and every change
of the rollout policy, by a job or a person, is one :class:`AliasMove`. The registry keeps
the recent ones in registered-model tags and the data store keeps all of them
(``audit/``, one JSON line per move); ``driverscore models status`` shows them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["AliasAction", "AliasMove"]

AliasAction = Literal["register", "promote", "reject", "rollback", "rollout"]


class AliasMove(BaseModel):
    """One move of an alias (or of the rollout policy, ``alias="rollout"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at: datetime = Field(description="When the move was made (UTC).")
    actor: str = Field(
        min_length=1,
        description=("decision-job, rollback-watch, training-job, or the person who moved it."),
    )
    action: AliasAction
    alias: str = Field(min_length=1, description="The alias moved, or 'rollout'.")
    from_version: str | None = Field(description="Version the alias pointed to before.")
    to_version: str | None = Field(description="Version it points to now; None: removed.")
    reason: str = Field(description="Why, in words.")
    evidence: dict[str, Any] = Field(
        default_factory=dict, description="The numbers the decision used."
    )

    @field_validator("at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # Naive times would compare wrongly with the UTC times around them.
        if value.tzinfo is None:
            raise ValueError("at must be timezone-aware (UTC)")
        return value.astimezone(UTC)

    def summary(self) -> str:
        """One line for people: ``2026-12-02 08:00 promote champion 3 -> 4 by decision-job``."""
        moved = f"{self.from_version or '-'} -> {self.to_version or '-'}"
        return (
            f"{self.at:%Y-%m-%d %H:%M} {self.action} {self.alias} {moved} by {self.actor}: "
            f"{self.reason}"
        )
