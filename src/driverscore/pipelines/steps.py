"""The batch pipeline's steps: plain functions with typed inputs and outputs.

`driverscore train` calls them in process; the Dagster definitions wrap the very same
functions as assets. Each step reads and writes versioned datasets through a
:class:`DataStore`, so a run is reproducible from the hashes it records.
"""

from __future__ import annotations

import math
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import driverscore
from driverscore.adapters.readers import list_sources, no_rows_error, read_table
from driverscore.adapters.storage import DatasetRef, DataStore
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.mapping import ColumnMapping, apply_mapping
from driverscore.domain.prepare import prepare_trips
from driverscore.errors import GateFailedError, InputDataError
from driverscore.settings import Settings

#: Pings per processing partition: bounds memory whatever the input size.
PINGS_PER_PARTITION = 4_000_000

ProgressFn = Callable[[str], None]


def _no_progress(_: str) -> None:
    return None


@dataclass(frozen=True)
class IngestedTelemetry:
    """Raw sources snapshotted and converted to canonical pings."""

    raw: DatasetRef
    canonical: DatasetRef
    rejected_rows: int
    rejects: pl.DataFrame


@dataclass(frozen=True)
class PreparedDataset:
    """Cleaned pings, trip features and everything set aside, with the quality report."""

    cleaned: DatasetRef
    features: DatasetRef
    quarantine: DatasetRef
    quality: dict[str, Any]
    quality_uri: str


@dataclass(frozen=True)
class DomainConfigs:
    """The cleaning, trip and feature parameters a run uses.

    Training takes them from the settings; scoring takes them from the model card, so a
    trip is always featurised exactly as the model saw trips in training.
    """

    cleaning: CleaningConfig
    trips: TripConfig
    features: FeatureConfig

    @classmethod
    def from_settings(cls, settings: Settings) -> DomainConfigs:
        return cls(cleaning=settings.cleaning, trips=settings.trips, features=settings.features)


@dataclass(frozen=True)
class RunContext:
    """What every step of one run shares."""

    settings: Settings
    store: DataStore
    run_id: str
    reference_time: datetime
    progress: ProgressFn = field(default=_no_progress)

    @classmethod
    def start(
        cls, settings: Settings, reference_time: datetime, progress: ProgressFn | None = None
    ) -> RunContext:
        """A new run on the settings' data store, named by its reference time."""
        return cls(
            settings=settings,
            store=DataStore(settings.resolved_data_uri, settings.storage_options()),
            run_id=new_run_id(reference_time),
            reference_time=reference_time,
            progress=progress or _no_progress,
        )


def new_run_id(reference_time: datetime) -> str:
    return f"{reference_time:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    commit = "unknown"
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
        if out.returncode == 0:
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{driverscore.__version__}+{commit}"


def ingest(
    ctx: RunContext, source_uri: str, mapping: ColumnMapping | None = None
) -> IngestedTelemetry:
    """Snapshot the raw sources and convert them to canonical pings, one part per source."""
    options = ctx.settings.storage_options()
    sources = list_sources(source_uri, options)
    ctx.progress(f"snapshot {len(sources)} raw file(s)")
    raw = ctx.store.snapshot_raw(sources)
    rejects: list[pl.DataFrame] = []
    rows_read: list[int] = []

    def parts() -> Iterator[pl.DataFrame]:
        for source in sources:
            ctx.progress(f"read {Path(source).name}")
            frame = read_table(
                source,
                mapping.format if mapping else None,
                options,
                delimiter=mapping.delimiter if mapping else ",",
            )
            rows_read.append(frame.height)
            mapped = apply_mapping(frame, mapping or ColumnMapping(), source)
            if mapped.rejected.height:
                rejects.append(mapped.rejected)
            yield mapped.pings

    canonical = ctx.store.write_dataset("canonical", parts())
    if sum(rows_read) == 0:
        raise no_rows_error(source_uri, sources)
    rejected = pl.concat(rejects, how="diagonal_relaxed") if rejects else pl.DataFrame()
    return IngestedTelemetry(
        raw=raw, canonical=canonical, rejected_rows=rejected.height, rejects=rejected
    )


def prepare(
    ctx: RunContext, ingested: IngestedTelemetry, configs: DomainConfigs | None = None
) -> PreparedDataset:
    """Clean, cut trips and compute features, partition by partition (vehicle hash buckets).

    Every vehicle lands in exactly one partition, so trips are cut exactly as they would
    be on the whole data, while memory stays bounded by the partition size.
    """
    configs = configs or DomainConfigs.from_settings(ctx.settings)
    partitions = max(1, math.ceil(ingested.canonical.rows / PINGS_PER_PARTITION))
    features: list[pl.DataFrame] = []
    quarantine: list[pl.DataFrame] = []
    counts: Counter[str] = Counter()
    kept_per_source: Counter[str] = Counter()

    def cleaned_parts() -> Iterator[pl.DataFrame]:
        for bucket in range(partitions):
            ctx.progress(f"clean, trips and features: partition {bucket + 1}/{partitions}")
            pings = _read_partition(ctx.store, ingested.canonical, bucket, partitions)
            prepared = prepare_trips(
                pings,
                configs.cleaning,
                configs.trips,
                configs.features,
                reference_time=ctx.reference_time,
            )
            counts.update(prepared.counts)
            if "source" in prepared.pings.columns:
                for source, n in prepared.pings.group_by("source").len().iter_rows():
                    kept_per_source[str(source)] += int(n)
            features.append(prepared.features)
            quarantine.append(prepared.quarantine)
            yield prepared.pings

    cleaned = ctx.store.write_dataset("cleaned", cleaned_parts())
    feature_frame = pl.concat(features, how="vertical") if features else pl.DataFrame()
    feature_frame = (
        feature_frame.sort("trip_id", "vehicle_id") if feature_frame.height else feature_frame
    )
    quarantine_frame = with_import_rejects(
        pl.concat(quarantine, how="diagonal_relaxed") if quarantine else pl.DataFrame(),
        ingested.rejects,
    )
    features_ref = ctx.store.write_dataset("features", feature_frame, name="features")
    quarantine_ref = ctx.store.write_dataset("quarantine", quarantine_frame, name="quarantine")
    quality = quality_report(
        rows_in=ingested.canonical.rows + ingested.rejected_rows,
        kept=cleaned.rows,
        quarantine=quarantine_frame,
        trips=feature_frame.height,
        counts=dict(counts),
        kept_per_source=dict(kept_per_source),
    )
    quality["datasets"] = {
        "raw": ingested.raw.version,
        "canonical": ingested.canonical.version,
        "cleaned": cleaned.version,
        "features": features_ref.version,
        "quarantine": quarantine_ref.version,
    }
    quality_uri = ctx.store.write_json("reports", ctx.run_id, "quality.json", quality)
    return PreparedDataset(
        cleaned=cleaned,
        features=features_ref,
        quarantine=quarantine_ref,
        quality=quality,
        quality_uri=quality_uri,
    )


def _read_partition(
    store: DataStore, canonical: DatasetRef, bucket: int, partitions: int
) -> pl.DataFrame:
    frames: list[pl.DataFrame] = []
    for part in store.scan_dataset(canonical):
        if partitions > 1:
            part = part.filter(pl.col("vehicle_id").hash(seed=0) % partitions == bucket)
        frames.append(part)
    if not frames:
        raise InputDataError(f"{canonical.uri}: no pings to process — check the source path")
    return pl.concat(frames, how="vertical_relaxed")


def with_import_rejects(quarantine: pl.DataFrame, rejects: pl.DataFrame) -> pl.DataFrame:
    """Import rejects join the quarantine: one place lists every row that was set aside."""
    if rejects.height == 0:
        return quarantine
    import_rows = rejects.with_columns(pl.lit("import").alias("stage"))
    return pl.concat([quarantine, import_rows], how="diagonal_relaxed")


def quality_report(
    *,
    rows_in: int,
    kept: int,
    quarantine: pl.DataFrame,
    trips: int,
    counts: dict[str, int],
    kept_per_source: dict[str, int] | None,
) -> dict[str, Any]:
    """Counts per rule and per source; ``rows_in == rows_kept + rows_quarantined`` holds."""
    per_rule: dict[str, int] = {}
    per_source: dict[str, dict[str, int]] = {}
    if quarantine.height:
        for row in quarantine.group_by("reason").len().sort("reason").iter_rows(named=True):
            per_rule[str(row["reason"])] = int(row["len"])
        if "source" in quarantine.columns:
            grouped = quarantine.group_by(["source", "reason"]).len().sort(["source", "reason"])
            for row in grouped.iter_rows(named=True):
                per_source.setdefault(str(row["source"]), {})[str(row["reason"])] = int(row["len"])
    return {
        "rows_in": rows_in,
        "rows_kept": kept,
        "rows_quarantined": quarantine.height,
        "balanced": rows_in == kept + quarantine.height,
        "trips": trips,
        "quarantined_per_rule": per_rule,
        "quarantined_per_source": per_source,
        "kept_per_source": kept_per_source or {},
        "stage_counts": counts,
    }


def require_passing(report_passed: bool, failures: list[str]) -> None:
    if not report_passed:
        raise GateFailedError("candidate failed the validation gate: " + "; ".join(failures))


def as_float32_matrix(frame: pl.DataFrame, columns: list[str]) -> np.ndarray:
    """Model input matrix in the model's column order; nulls become NaN (the model handles them)."""
    return frame.select([pl.col(c).cast(pl.Float32) for c in columns]).to_numpy().astype(np.float32)
