"""The ingest and prepare steps on the Spark engine: same inputs, outputs and datasets.

Each returns what its embedded twin in :mod:`driverscore.pipelines.steps` returns, so the
steps after them (labels, training, scoring, the Dagster assets) do not know which engine
ran. The datasets are written through the same :class:`DataStore`, whose versions hash
content, not files: both engines give the same versions for the same input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

from driverscore.adapters.readers import list_sources, no_rows_error, table_format
from driverscore.adapters.spark.jobs import (
    SparkPrepared,
    SparkScores,
    StagingArea,
    import_on_spark,
    input_error,
    prepare_on_spark,
    score_on_spark,
)
from driverscore.adapters.spark.models import ShippedScoring
from driverscore.domain.mapping import ColumnMapping
from driverscore.errors import InputDataError
from driverscore.pipelines.steps import (
    DomainConfigs,
    IngestedTelemetry,
    PreparedDataset,
    RunContext,
    ingest,
    prepare,
    quality_report,
    with_import_rejects,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "ENGINES",
    "Engine",
    "ingest_and_prepare",
    "ingest_prepare_and_score_spark",
    "ingest_spark",
    "prepare_spark",
    "score_spark",
]

#: Where the prepare step runs: in this process (Polars) or on Spark.
Engine = Literal["embedded", "spark"]
ENGINES: tuple[Engine, ...] = ("embedded", "spark")


@contextmanager
def _executor_errors() -> Iterator[None]:
    """A user error raised on an executor reaches the command as its one line."""
    try:
        yield
    except Exception as exc:
        error = input_error(exc)
        if error is None:
            raise
        raise error from None


@contextmanager
def _staging_area(ctx: RunContext) -> Iterator[StagingArea]:
    """A staging folder of the run's data store for the executors' parts, removed after."""
    staging = ctx.store.new_staging()
    try:
        yield StagingArea(ctx.store.root_uri, ctx.settings.storage_options(), staging)
    finally:
        ctx.store.discard_staging(staging)


def ingest_spark(
    ctx: RunContext, spark: SparkSession, source_uri: str, mapping: ColumnMapping | None = None
) -> IngestedTelemetry:
    """Snapshot the raw sources, read them with Spark and map them on the executors."""
    options = ctx.settings.storage_options()
    sources = list_sources(source_uri, options)
    formats = {table_format(s, mapping.format if mapping else None) for s in sources}
    if len(formats) > 1:
        raise InputDataError(
            f"{source_uri}: files of several formats ({', '.join(sorted(formats))}) — the "
            "Spark engine reads one format per run; split them or set format: in the mapping"
        )
    ctx.progress(f"snapshot {len(sources)} raw file(s)")
    raw = ctx.store.snapshot_raw(sources)
    ctx.progress(f"read and map {len(sources)} file(s) on Spark")
    with _executor_errors(), _staging_area(ctx) as area:
        job = import_on_spark(
            spark,
            sources,
            formats.pop(),
            mapping,
            area,
            delimiter=mapping.delimiter if mapping else ",",
        )
        # The executors wrote the pings; only their parts' names and digests come here.
        canonical = ctx.store.commit_staged("canonical", area.staging, job.canonical_parts())
        rejected = job.rejects()
    if canonical.rows + rejected.height == 0:
        raise no_rows_error(source_uri, sources)
    return IngestedTelemetry(
        raw=raw, canonical=canonical, rejected_rows=rejected.height, rejects=rejected
    )


def prepare_spark(
    ctx: RunContext,
    spark: SparkSession,
    ingested: IngestedTelemetry,
    configs: DomainConfigs | None = None,
) -> PreparedDataset:
    """Clean, cut trips and compute features on the executors, vehicle group by group."""
    configs = configs or DomainConfigs.from_settings(ctx.settings)
    _require_pings(ingested)
    ctx.progress("clean, trips and features on Spark")
    with _executor_errors(), _staging_area(ctx) as area:
        job = prepare_on_spark(
            spark,
            ctx.store.part_uris(ingested.canonical),
            cleaning=configs.cleaning,
            trips=configs.trips,
            features=configs.features,
            reference_time=ctx.reference_time,
            total_pings=ingested.canonical.rows,
            pings_per_group=ctx.settings.spark.pings_per_group,
            area=area,
        )
        try:
            return _write_prepared(ctx, ingested, job, area)
        finally:
            job.close()


def score_spark(
    ctx: RunContext,
    spark: SparkSession,
    ingested: IngestedTelemetry,
    scoring: ShippedScoring,
) -> tuple[PreparedDataset, SparkScores]:
    """Clean, cut trips, compute features and score them on the executors.

    The prepared datasets are the ones :func:`prepare_spark` writes with the champion
    card's configurations; the scores come back to the driver, small, for the caller to
    write as embedded scoring does.
    """
    _require_pings(ingested)
    ctx.progress("clean, trips, features and scores on Spark")
    with _executor_errors(), _staging_area(ctx) as area:
        job = score_on_spark(
            spark,
            ctx.store.part_uris(ingested.canonical),
            scoring,
            reference_time=ctx.reference_time,
            total_pings=ingested.canonical.rows,
            pings_per_group=ctx.settings.spark.pings_per_group,
            area=area,
        )
        try:
            scores = job.scores()
            prepared = _write_prepared(ctx, ingested, job, area)
        finally:
            job.close()
    return prepared, scores


def _require_pings(ingested: IngestedTelemetry) -> None:
    if ingested.canonical.rows == 0:
        raise InputDataError(
            f"{ingested.canonical.uri}: no pings to process — check the source path"
        )


def _write_prepared(
    ctx: RunContext, ingested: IngestedTelemetry, job: SparkPrepared, area: StagingArea
) -> PreparedDataset:
    """Write what the executors prepared as the embedded prepare step writes it; the
    cleaned pings are already in the store, staged by the executors."""
    cleaned = ctx.store.commit_staged("cleaned", area.staging, job.cleaned_parts())
    feature_frame = job.features()
    quarantine = job.quarantine()
    counts, kept_per_source = job.counts()
    costs = job.group_costs()
    if feature_frame.height:
        feature_frame = feature_frame.sort("trip_id", "vehicle_id")
    quarantine_frame = with_import_rejects(quarantine, ingested.rejects)
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
    quality["engine"] = "spark"
    # Where the executors' time went: the groups' own cost, apart from Spark's overhead.
    quality["spark"] = {
        "groups": len(costs),
        "executor_seconds": round(sum(seconds for _, seconds in costs), 3),
        "slowest_group_s": round(max((seconds for _, seconds in costs), default=0.0), 3),
        "largest_group_pings": max((pings for pings, _ in costs), default=0),
    }
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


def ingest_prepare_and_score_spark(
    ctx: RunContext, pings_uri: str, mapping: ColumnMapping | None, scoring: ShippedScoring
) -> tuple[IngestedTelemetry, PreparedDataset, SparkScores]:
    """Ingest, prepare and score on Spark; the session is built here, once."""
    from driverscore.adapters.spark.session import spark_session

    ctx.progress("start Spark")
    spark = spark_session(ctx.settings)
    ingested = ingest_spark(ctx, spark, pings_uri, mapping)
    prepared, scores = score_spark(ctx, spark, ingested, scoring)
    return ingested, prepared, scores


def ingest_and_prepare(
    ctx: RunContext,
    engine: Engine,
    pings_uri: str,
    mapping: ColumnMapping | None,
    configs: DomainConfigs | None = None,
) -> tuple[IngestedTelemetry, PreparedDataset]:
    """The ingest and prepare steps on ``engine``; the Spark session is built here, once."""
    if engine == "embedded":
        ingested = ingest(ctx, pings_uri, mapping)
        return ingested, prepare(ctx, ingested, configs)
    from driverscore.adapters.spark.session import spark_session

    ctx.progress("start Spark")
    spark = spark_session(ctx.settings)
    ingested = ingest_spark(ctx, spark, pings_uri, mapping)
    return ingested, prepare_spark(ctx, spark, ingested, configs)
