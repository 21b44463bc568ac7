"""The drift reference of a model version: the profile of the trips it learned from.

Fitted once, at training (and, for a champion registered before profiles existed, once
from the features dataset its lineage names), then stored beside the model card as
``reference_profile.json``; monitoring never recomputes it (ARCHITECTURE rule 3). The
profiled columns come from the card (its model inputs, then the risk probability and the
score), so a model with other features gets a reference of those features.
"""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl

from driverscore.domain.profiles import (
    CATEGORICAL_COLUMNS,
    SCORE_COLUMNS,
    SLICE_COLUMNS,
    ProfileEdges,
    TripProfile,
    profile_trips,
)
from driverscore.domain.scoring import TripScorer

__all__ = ["fit_reference_profile", "profiled_columns"]


def profiled_columns(scorer: TripScorer) -> list[str]:
    """Numeric columns of a model's profiles: its inputs (from the card), then the score."""
    return [*scorer.card.feature_names, *SCORE_COLUMNS]


def fit_reference_profile(trips: pl.DataFrame, scorer: TripScorer) -> TripProfile:
    """Score ``trips`` (trip feature rows) with ``scorer``, fit the edges, profile them.

    The trips are scored rather than taken with their logged scores so that the score's
    reference is the model's own, whatever scored them before.
    """
    records = scorer.score_trips(trips, datetime.now(UTC))
    edges = ProfileEdges.fit(records, profiled_columns(scorer), CATEGORICAL_COLUMNS, SLICE_COLUMNS)
    return profile_trips(records, edges)
