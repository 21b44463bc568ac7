"""REST request → the one scoring path (``services/api/scoring.py``), without a server."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pytest
from test_trip_scoring import CHAMPION, NOW, trips

from driverscore.domain.rollout import RolloutPolicy
from driverscore.domain.scoring import TripScorer
from driverscore.services.api.holder import LoadedModels
from driverscore.services.api.schemas import TripIn
from driverscore.services.api.scoring import InvalidTripsError, score_posted_trips

INPUTS = CHAMPION.card.feature_names


def models(scorer: TripScorer) -> LoadedModels:
    return LoadedModels(
        champion=scorer,
        challenger=None,
        shadow=None,
        champion_loaded_at=NOW,
        challenger_loaded_at=None,
        run_metrics={},
        tags={},
    )


def posted(n: int) -> list[TripIn]:
    rows = trips(n).to_dicts()
    return [
        TripIn.model_validate(
            {
                "trip_id": r["trip_id"],
                "vehicle_id": r["vehicle_id"],
                "driver_id": r["driver_id"],
                "features": {k: r[k] for k in INPUTS},
            }
        )
        for r in rows
    ]


def test_posted_features_score_as_the_domain_does() -> None:
    batch = score_posted_trips(
        posted(3), ["trips.0.", "trips.1.", "trips.2."], models(CHAMPION), RolloutPolicy(), NOW
    )
    assert [s.trip_id for s in batch.scores] == ["T0", "T1", "T2"]
    assert [r.decision_id for r in batch.records] == [s.decision_id for s in batch.scores]
    assert all(s.model_role == "champion" for s in batch.scores)


def test_a_model_output_that_is_not_a_number_is_a_clear_error_not_a_low_band() -> None:
    def broken(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return np.full(x.shape[0], np.nan)

    scorer = TripScorer(broken, CHAMPION.card, "m", "7", "champion")
    with pytest.raises(InvalidTripsError) as caught:
        score_posted_trips(posted(1), [""], models(scorer), RolloutPolicy(), datetime.now(UTC))
    (problem,) = caught.value.problems
    assert problem.field == "features"
    assert "model 7 gave no finite risk" in problem.message
    assert caught.value.set_aside_reasons == ["non_finite_output"]
