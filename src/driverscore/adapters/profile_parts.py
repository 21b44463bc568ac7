"""Profile parts in the data store: what every writer of trip records leaves for the monitor.

A part is the mergeable profile (``domain/profiles.py``) of the trips one writer scored
with one model version whose trips ended in one UTC hour. The monitor's window is the
merge of the parts of its hours, never a rescan of the trip records. Layout::

    <root>/profiles/<model_version>/<YYYY-MM-DD>/<HH>-<part_id>.json       the profile part
    <root>/profiles/<model_version>/<YYYY-MM-DD>/<HH>-<part_id>.keys.parquet
    <root>/profiles/<model_version>/sources/scores-<dataset version>.json

A part holds the counts only, not the bin edges: they are the model version's reference
profile's, named by its sha256 (the edges are most of a profile's bytes, and the same for
every part). Parts of the service and the stream processor carry a ``.keys.parquet``
beside them: the trips' key, time and probability columns (:data:`KEY_COLUMNS`), which
estimated and realised performance need row by row; batch scoring's trips have theirs in
the ``scores`` dataset. ``sources/scores-<version>.json`` says a ``scores`` dataset's
trips of that model version are in parts, so the monitor never profiles it again.

Each part is written whole (no reader sees half a part) under a name of its own, so writers
never contend; a part written again under the same name (batch scoring of the same
dataset) replaces itself.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import polars as pl

from driverscore.adapters.storage import DataStore
from driverscore.domain.profiles import TripProfile

__all__ = [
    "KEY_COLUMNS",
    "PART_SCHEMA_VERSION",
    "PROFILES_KIND",
    "ProfilePart",
    "ProfilePartStore",
    "hour_of",
]

PROFILES_KIND: Final = "profiles"
PART_SCHEMA_VERSION: Final = "1"
#: What performance needs of each trip: its key, its times, its probability and its model.
KEY_COLUMNS: Final = (
    "vehicle_id",
    "trip_id",
    "driver_id",
    "start_ts",
    "end_ts",
    "risk_probability",
    "model_version",
    "model_role",
    "scored_at",
)
_SOURCES: Final = "sources"
_PART_SUFFIX: Final = ".json"
_KEYS_SUFFIX: Final = ".keys.parquet"
_UTC_US: Final = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class ProfilePart:
    """One stored part: where it is, what it covers, who wrote it, and its counts."""

    uri: str
    model_version: str
    hour: datetime
    reference_profile_sha256: str
    #: ``{"kind": "scores", "scores": <dataset uri>}`` for batch scoring, or
    #: ``{"kind": "service" | "stream", ...}``.
    source: dict[str, Any]
    rows: int
    counts: dict[str, Any]

    def profile(self, reference: TripProfile) -> TripProfile:
        """The part's profile on the reference's edges (the caller checks the hash)."""
        return TripProfile.from_counts(self.counts, reference.edges)


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC hour holding ``moment``."""
    utc = moment.astimezone(UTC)
    return utc.replace(minute=0, second=0, microsecond=0)


class ProfilePartStore:
    """Profile parts and their trip keys under ``<root>/profiles`` of a data store."""

    def __init__(self, store: DataStore) -> None:
        self.store = store

    def _day_uri(self, version: str, hour: datetime) -> str:
        return self.store.object_uri(PROFILES_KIND, version, hour.strftime("%Y-%m-%d"))

    def write_part(
        self,
        version: str,
        hour: datetime,
        part_id: str,
        profile: TripProfile,
        reference_profile_sha256: str,
        source: Mapping[str, Any],
        keys: pl.DataFrame | None = None,
    ) -> str:
        """Store the profile of ``version``'s trips that ended in ``hour``; ``keys`` (the
        trips' :data:`KEY_COLUMNS`) beside it when the trips are stored nowhere else."""
        hour = hour_of(hour)
        day = self._day_uri(version, hour)
        name = f"{hour:%H}-{part_id}"
        if keys is not None:
            buffer = io.BytesIO()
            keys.select(c for c in KEY_COLUMNS if c in keys.columns).write_parquet(
                buffer, compression="zstd"
            )
            # The keys first: a part the monitor can see always has its keys.
            self.store.write_object(f"{day}/{name}{_KEYS_SUFFIX}", buffer.getvalue())
        part = {
            "part_schema_version": PART_SCHEMA_VERSION,
            "model_version": version,
            "hour": hour.isoformat(),
            "reference_profile_sha256": reference_profile_sha256,
            "source": dict(source),
            "rows": profile.rows,
            "written_at": datetime.now(UTC).isoformat(),
            "profile": profile.counts_to_dict(),
        }
        uri = f"{day}/{name}{_PART_SUFFIX}"
        self.store.write_object(uri, json.dumps(part, sort_keys=True).encode())
        return uri

    def _hour_files(self, version: str, start: datetime, end: datetime, suffix: str) -> list[str]:
        """Files of ``suffix`` whose hour lies in ``[start, end)`` (both on the hour)."""
        found: list[str] = []
        day = hour_of(start).replace(hour=0)
        while day < end:
            for uri in self.store.list_objects(self._day_uri(version, day), suffix):
                name = uri.rsplit("/", 1)[-1]
                if suffix == _PART_SUFFIX and name.endswith(_KEYS_SUFFIX):
                    continue
                hour = day.replace(hour=int(name[:2]))
                if start <= hour < end:
                    found.append(uri)
            day += timedelta(days=1)
        return found

    def parts(self, version: str, start: datetime, end: datetime) -> list[ProfilePart]:
        """The parts of ``version`` for the hours in ``[start, end)`` (on the hour)."""
        out: list[ProfilePart] = []
        for uri in self._hour_files(version, start, end, _PART_SUFFIX):
            data = json.loads(self.store.read_object(uri))
            if str(data.get("part_schema_version")) != PART_SCHEMA_VERSION:
                raise ValueError(
                    f"{uri}: profile part schema {data.get('part_schema_version')!r}; this "
                    f"version reads {PART_SCHEMA_VERSION}"
                )
            out.append(
                ProfilePart(
                    uri=uri,
                    model_version=str(data["model_version"]),
                    hour=datetime.fromisoformat(data["hour"]),
                    reference_profile_sha256=str(data["reference_profile_sha256"]),
                    source=dict(data["source"]),
                    rows=int(data["rows"]),
                    counts=data["profile"],
                )
            )
        return out

    def keys(self, version: str, start: datetime, end: datetime) -> pl.DataFrame:
        """The trip keys stored beside the parts of the hours in ``[start, end)``."""
        frames = [
            pl.read_parquet(io.BytesIO(self.store.read_object(uri)))
            for uri in self._hour_files(version, start, end, _KEYS_SUFFIX)
        ]
        frames = [f for f in frames if f.height]
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames, how="diagonal_relaxed")

    def profiled_scores(self, version: str) -> set[str]:
        """Versions of the ``scores`` datasets whose trips of ``version`` are in parts."""
        folder = self.store.object_uri(PROFILES_KIND, version, _SOURCES)
        names = (u.rsplit("/", 1)[-1] for u in self.store.list_objects(folder, ".json"))
        return {n.removeprefix("scores-").removesuffix(".json") for n in names}

    def mark_scores(self, version: str, scores_version: str, parts: list[str]) -> None:
        """Record that the ``scores`` dataset's trips of ``version`` are in ``parts``."""
        uri = self.store.object_uri(
            PROFILES_KIND, version, _SOURCES, f"scores-{scores_version}.json"
        )
        body = {"scores_version": scores_version, "model_version": version, "parts": parts}
        self.store.write_object(uri, json.dumps(body, sort_keys=True).encode())
