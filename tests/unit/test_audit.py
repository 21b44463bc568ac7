"""The audit log's record of one alias move."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from driverscore.domain.audit import AliasMove


def _move(**changes: object) -> AliasMove:
    fields: dict[str, object] = {
        "at": datetime(2026, 6, 1, 8, 30, tzinfo=UTC),
        "actor": "decision-job",
        "action": "promote",
        "alias": "champion",
        "from_version": "3",
        "to_version": "4",
        "reason": "challenger is better",
        "evidence": {"roc_auc.lower": 0.012, "slices": {"fleet_id=F1.roc_auc.improvement": 0.02}},
    }
    return AliasMove.model_validate({**fields, **changes})


def test_a_move_round_trips_through_json() -> None:
    move = _move()
    assert AliasMove.model_validate_json(move.model_dump_json()) == move


def test_times_are_utc_and_naive_times_are_refused() -> None:
    paris = timezone(timedelta(hours=2))
    assert _move(at=datetime(2026, 6, 1, 10, 30, tzinfo=paris)).at == _move().at
    assert _move().at.tzinfo == UTC
    with pytest.raises(ValidationError, match="timezone-aware"):
        _move(at=datetime(2026, 6, 1, 8, 30))


def test_only_known_actions_and_a_named_actor() -> None:
    with pytest.raises(ValidationError):
        _move(action="delete")
    with pytest.raises(ValidationError):
        _move(actor="")


def test_summary_is_one_line_for_people() -> None:
    assert _move().summary() == (
        "2026-06-01 08:30 promote champion 3 -> 4 by decision-job: challenger is better"
    )
    removed = _move(action="reject", alias="challenger", from_version="4", to_version=None)
    assert "reject challenger 4 -> -" in removed.summary()
