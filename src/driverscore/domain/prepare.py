"""prepare_trips: cleaning, trip cutting and trip features in one call, used by every engine.

Batch runs it per partition (file or vehicle-hash bucket), the stream processor on the
pings of one closed trip, the REST service on one posted trip: the same code, so a trip
gets the same features on every path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

import numpy as np
import polars as pl

from driverscore.domain.cleaning import QUARANTINE_REASONS, clean_with_keys
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.features import (
    FEATURE_COLUMNS,
    features_and_events_in_trip_order,
    features_in_trip_order,
    trip_features,
    trip_features_and_events,
)
from driverscore.domain.trips import assign_trips_sorted

__all__ = [
    "FEATURE_COLUMNS",
    "QUARANTINE_REASONS",
    "PreparedTrips",
    "prepare_trips",
]

_STAGES: Final = ("cleaning", "trips")


@dataclass(frozen=True)
class PreparedTrips:
    """Kept pings with ``trip_id``, one feature row per trip, all quarantined rows, counts."""

    pings: pl.DataFrame
    features: pl.DataFrame
    quarantine: pl.DataFrame
    counts: dict[str, int]


def prepare_trips(
    pings: pl.DataFrame,
    cleaning: CleaningConfig,
    trips: TripConfig,
    features: FeatureConfig,
    reference_time: datetime,
    *,
    events: bool = False,
) -> PreparedTrips:
    """Clean canonical pings, cut them into trips and compute one feature row per trip.

    With ``events``, the kept pings carry the fixes' event flags
    (``features.EVENT_COLUMNS``) from the same feature pass: what the stream draws its
    trips' routes with. Without, they keep the cleaned columns only (batch writes them).

    Cleaning never looks across a gap longer than ``trips.gap_s``, so a trip's features
    are the same whether its pings come alone or among millions of others.

    Counts: ``rows_in == kept + quarantined`` overall, the same per stage under
    ``cleaning.*`` and ``trips.*``, one count per quarantine reason, ``trips`` (kept
    trips, i.e. feature rows) and ``reordered``.
    """
    cleaned, keys = clean_with_keys(pings, cleaning, reference_time, trips.gap_s)
    # The kept pings come sorted with their integer keys: trip cutting reuses them.
    cut, starts = assign_trips_sorted(cleaned.kept, keys, trips)
    # Each trip is a run of rows in time order: trip cutting names every run of a given id
    # apart (id~k), so a (vehicle, trip id) pair heads one run only; checked on the heads.
    heads = cut.pings.select("vehicle_id", "trip_id").gather(pl.Series(starts, dtype=pl.Int64))
    kept = cut.pings
    if not heads.is_duplicated().any():
        first = np.zeros(cut.pings.height, dtype=bool)
        first[starts] = True
        if events:
            rows, kept = features_and_events_in_trip_order(cut.pings, first, features)
        else:
            rows = features_in_trip_order(cut.pings, first, features)
    elif events:
        rows, kept = trip_features_and_events(cut.pings, features)
    else:
        rows = trip_features(cut.pings, features)

    parts = [frame for frame in (cleaned.quarantine, cut.quarantine) if frame.height]
    quarantine = pl.concat(parts, how="vertical") if parts else cleaned.quarantine
    counts: dict[str, int] = {
        "rows_in": cleaned.counts["rows_in"],
        "kept": cut.counts["kept"],
        "quarantined": cleaned.counts["quarantined"] + cut.counts["quarantined"],
        "trips": rows.height,
        "reordered": cleaned.counts["reordered"],
    }
    for reason in QUARANTINE_REASONS:
        counts[reason] = cleaned.counts.get(reason, 0)
    counts["short_trip"] = cut.counts["quarantined"]
    for stage, stage_counts in zip(_STAGES, (cleaned.counts, cut.counts), strict=True):
        for name, value in stage_counts.items():
            counts[f"{stage}.{name}"] = value
    return PreparedTrips(pings=kept, features=rows, quarantine=quarantine, counts=counts)
