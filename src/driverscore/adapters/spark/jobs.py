"""Import, prepare and score on Spark: the same domain functions, run on the executors.

Nothing here re-implements a domain rule. Spark reads the files, numbers each source's
rows and shuffles pings by vehicle; the executors hand Arrow batches to the very
:func:`~driverscore.domain.mapping.apply_mapping` and vehicle groups to the very
:func:`~driverscore.domain.prepare.prepare_trips` the embedded engine calls, with the
run's reference time and configurations fixed on the driver and shipped as JSON. To score,
the groups call :func:`~driverscore.domain.trip_scoring.score_trip_pings` with the models'
ONNX exports and cards, broadcast once (``adapters/spark/models.py``).

Results travel back as an *envelope*: one row per output frame of a task (``kind``,
``rows``, ``payload`` = the frame as Arrow IPC), so a frame keeps its exact Polars types
(no round trip through Spark's type system). Pings never travel in it: the executors
write canonical and cleaned pings into a staging folder of the data store and send back
each part's name and content digest, for the driver to commit.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import polars as pl
import pyarrow as pa

from driverscore.adapters.prediction_log import PREDICTION_LOG_SCHEMA, records_frame
from driverscore.adapters.spark.models import ShippedScoring
from driverscore.adapters.spark.session import spark_path
from driverscore.adapters.storage import DataStore, StagedPart
from driverscore.domain.config import CleaningConfig, FeatureConfig, TripConfig
from driverscore.domain.features import EVENT_COLUMNS
from driverscore.domain.mapping import ColumnMapping, apply_mapping
from driverscore.domain.prepare import prepare_trips
from driverscore.domain.routes import ROUTE_SCHEMA, trip_routes
from driverscore.domain.schema import PING_SCHEMA
from driverscore.domain.trip_scoring import (
    ALERT_COLUMN,
    SET_ASIDE_NON_FINITE,
    SET_ASIDE_SCHEMA,
    TRIP_RECORD_SCHEMA,
    score_trip_pings,
)
from driverscore.errors import InputDataError

if TYPE_CHECKING:
    from pyspark import Broadcast
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "SparkImport",
    "SparkPrepared",
    "SparkScores",
    "StagingArea",
    "import_on_spark",
    "in_scoring_order",
    "prepare_on_spark",
    "score_on_spark",
]

_ENVELOPE_DDL: Final = "kind string, rows long, payload binary"
_ENVELOPE: Final = pa.schema(
    [("kind", pa.string()), ("rows", pa.int64()), ("payload", pa.binary())]
)
_SOURCE: Final = "_source"
_BLOCK: Final = "_block"
_BUCKET: Final = "_bucket"
#: A job's output frames by kind (``cleaned``-part names, ``features``, ``scores`` …).
Frames = dict[str, list[pl.DataFrame]]
#: The canonical pings as imported: the ping contract plus where each ping came from.
_CANONICAL: Final[dict[str, pl.DataType]] = {**PING_SCHEMA, "source": pl.String()}


def _ipc(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_ipc(buffer, compression="lz4")
    return buffer.getvalue()


def _from_ipc(payload: bytes) -> pl.DataFrame:
    return pl.read_ipc(io.BytesIO(payload))


def _envelope(items: list[tuple[str, pl.DataFrame]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "kind": [kind for kind, _ in items],
            "rows": [frame.height for _, frame in items],
            "payload": [_ipc(frame) for _, frame in items],
        },
        schema=_ENVELOPE,
    )


def _canonical_types(frame: pl.DataFrame) -> pl.DataFrame:
    """Spark hands strings and timestamps back in its own Arrow flavours: cast to the contract."""
    return frame.with_columns(
        pl.col(name).cast(dtype) for name, dtype in _CANONICAL.items() if name in frame.columns
    )


@dataclass(frozen=True)
class StagingArea:
    """Where executors write a dataset's parts: a staging folder of the run's data store.

    Parts then travel from the executors to the store directly; the driver gets their
    names and content digests (a few hundred bytes each) and commits the dataset.
    """

    root_uri: str
    storage_options: dict[str, Any]
    staging: str

    def stage(self, stem: str, frame: pl.DataFrame) -> tuple[str, pl.DataFrame]:
        """Write ``frame`` as a part and return the envelope item that names it."""
        part = DataStore(self.root_uri, self.storage_options).stage_part(self.staging, stem, frame)
        return (_PART, pl.DataFrame({"json": [json.dumps(asdict(part))]}))


#: Envelope kind of a part staged by an executor (its StagedPart as JSON).
_PART: Final = "part"


def _staged_parts(frames: Frames) -> list[StagedPart]:
    """The parts the executors staged, in part-name order (their partition and batch)."""
    parts = [StagedPart(**json.loads(frame.item(0, "json"))) for frame in frames.get(_PART, [])]
    return sorted(parts, key=lambda part: part.name)


def _task_partition() -> int:
    from pyspark import TaskContext

    context = TaskContext.get()
    return context.partitionId() if context is not None else 0


# -- executor side ---------------------------------------------------------------------


def _map_sources(
    batches: Iterator[pa.RecordBatch], mapping_json: str, area: StagingArea
) -> Iterator[pa.RecordBatch]:
    """mapInArrow: raw rows of one or more sources -> canonical ping parts (staged in the
    data store) and rejects.

    A partition reads whole file splits, each in file order, so a row's position within
    its split is a running count; the driver adds the rows of the splits before it
    (``blocks``) to name a rejected row by its row in the source, as the embedded engine does.
    """
    mapping = ColumnMapping.model_validate_json(mapping_json)
    partition = _task_partition()
    seen: Counter[tuple[str, int]] = Counter()
    parts = 0
    for batch in batches:
        raw = pl.from_arrow(batch)
        assert isinstance(raw, pl.DataFrame)
        items: list[tuple[str, pl.DataFrame]] = []
        splits = raw.partition_by(_SOURCE, _BLOCK, as_dict=True, maintain_order=True)
        for (source, block), part in splits.items():
            key = (str(source), int(block))
            before = seen[key]
            seen[key] += part.height
            mapped = apply_mapping(part.drop(_SOURCE, _BLOCK), mapping, key[0])
            # Named by partition and order: a retried task rewrites the same parts.
            items.append(area.stage(f"part-{partition:06d}-{parts:06d}", mapped.pings))
            parts += 1
            if mapped.rejected.height:
                items.append(
                    (
                        "rejects",
                        mapped.rejected.with_columns(
                            pl.col("row") + before, pl.lit(key[1], dtype=pl.Int64).alias(_BLOCK)
                        ),
                    )
                )
        yield _envelope(items)
    blocks = pl.DataFrame(
        {
            "source": [source for source, _ in seen],
            _BLOCK: [block for _, block in seen],
            "rows": list(seen.values()),
        },
        schema={"source": pl.String(), _BLOCK: pl.Int64(), "rows": pl.Int64()},
    )
    yield _envelope([("blocks", blocks)])


def _group_preparer(
    configs_json: str,
    reference_time_iso: str,
    area: StagingArea,
    scoring: Broadcast[ShippedScoring] | None = None,
) -> Callable[[pa.Table], pa.Table]:
    # A one-argument function: applyInArrow tells the (table) and (key, table) forms apart
    # by the number of parameters.
    def prepare_group(table: pa.Table) -> pa.Table:
        return _prepare_group(table, configs_json, reference_time_iso, area, scoring)

    return prepare_group


def _prepare_group(
    table: pa.Table,
    configs_json: str,
    reference_time_iso: str,
    area: StagingArea,
    scoring: Broadcast[ShippedScoring] | None = None,
) -> pa.Table:
    """applyInArrow: one group of whole vehicles -> cleaned pings (a part staged in the
    data store), features, quarantine, counts; with ``scoring``, also the group's score
    records, alerts, set-asides, prediction-log rows and routes, scored on the one
    scoring path."""
    started = time.perf_counter()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    group = int(frame.item(0, _BUCKET)) if frame.height else 0
    pings = _canonical_types(frame.drop(_BUCKET))
    reference_time = datetime.fromisoformat(reference_time_iso)
    scored_items: list[tuple[str, pl.DataFrame]] = []
    if scoring is None:
        configs = json.loads(configs_json)
        prepared = prepare_trips(
            pings,
            CleaningConfig.model_validate(configs["cleaning"]),
            TripConfig.model_validate(configs["trips"]),
            FeatureConfig.model_validate(configs["features"]),
            reference_time=reference_time,
        )
        cleaned, features = prepared.pings, prepared.features
        quarantine, stage_counts = prepared.quarantine, prepared.counts
    else:
        # The function the stream and the embedded runner score pings with: trips cut with
        # the champion card's configurations, each model fed its own card's features.
        shipped = scoring.value
        result = score_trip_pings(pings, shipped.models(), shipped.policy(), reference_time)
        # Its pings carry the champion's event flags (what routes are drawn with); the
        # cleaned dataset holds the cleaned columns only, as the prepare step writes it.
        flagged, features = result.pings, result.features
        cleaned = flagged.drop(EVENT_COLUMNS, strict=False)
        quarantine, stage_counts = result.quarantine, result.counts
        scored = result.scored
        scored_items = [
            ("scores", scored.records_frame()),
            ("alerts", scored.alerts_frame()),
            ("set_aside", scored.set_aside_frame()),
            ("decisions", records_frame(scored.decisions)),
            # A group holds whole vehicles, so whole trips: its routes are the trips'
            # routes, their points flagged by the champion's events as embedded scoring does.
            ("routes", trip_routes(flagged)),
        ]
    kept_per_source: dict[str, int] = {}
    if "source" in cleaned.columns:
        for source, n in cleaned.group_by("source").len().iter_rows():
            kept_per_source[str(source)] = int(n)
    # The group's own cost (Arrow in, prepare_trips and scoring, frames out): what a
    # cluster projection scales from (bench/bench_spark.py).
    seconds = time.perf_counter() - started
    summary = {
        "counts": stage_counts,
        "kept_per_source": kept_per_source,
        "pings": pings.height,
        "seconds": seconds,
    }
    counts = pl.DataFrame({"json": [json.dumps(summary)]})
    batch = _envelope(
        [
            area.stage(f"part-{group:06d}", cleaned),
            ("features", features),
            ("quarantine", quarantine),
            ("counts", counts),
            *scored_items,
        ]
    )
    return pa.Table.from_batches([batch])


def _unpack(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow: envelope rows of canonical pings -> the pings as Spark rows."""
    for batch in batches:
        for payload in batch.column("payload").to_pylist():
            frame = _from_ipc(payload).select(list(_CANONICAL))
            yield from frame.to_arrow(compat_level=pl.CompatLevel.oldest()).to_batches()


# -- driver side -----------------------------------------------------------------------


def _collect(envelope: DataFrame) -> Frames:
    """Every output frame of a job, by kind, in partition order.

    One action, so Spark runs the job's tasks side by side (``toLocalIterator`` ran them
    one partition after another). The pings stay in the data store, written by the
    executors: what comes back is small (parts' digests, features, quarantine, scores).
    """
    frames: Frames = {}
    for row in envelope.collect():
        frames.setdefault(str(row["kind"]), []).append(_from_ipc(row["payload"]))
    return frames


def _spark_canonical_ddl() -> str:
    types = {pl.String(): "string", pl.Float64(): "double"}
    columns = [
        f"`{name}` {'timestamp' if name == 'ts' else types[dtype]}"
        for name, dtype in _CANONICAL.items()
    ]
    return ", ".join(columns)


@dataclass
class SparkImport:
    """Sources read by Spark and mapped on the executors; payloads stay cached until closed."""

    frames: Frames

    def canonical_parts(self) -> list[StagedPart]:
        """The canonical ping parts the executors staged, for the driver to commit."""
        return _staged_parts(self.frames)

    def rejects(self) -> pl.DataFrame:
        """Rejected rows, numbered within their source and in the embedded engine's order."""
        parts = self.frames.get("rejects", [])
        if not parts:
            return pl.DataFrame()
        rejects = pl.concat(parts, how="diagonal_relaxed")
        blocks = (
            pl.concat(self.frames["blocks"])
            .group_by("source", _BLOCK)
            .agg(pl.col("rows").sum())
            .sort("source", _BLOCK)
            .with_columns(
                (pl.col("rows").cum_sum() - pl.col("rows")).over("source").alias("_offset")
            )
        )
        numbered = rejects.join(blocks, on=["source", _BLOCK], how="left").with_columns(
            pl.col("row") + pl.col("_offset")
        )
        return numbered.select(rejects.drop(_BLOCK).columns).sort("source", "row")


def import_on_spark(
    spark: SparkSession,
    sources: list[str],
    fmt: str,
    mapping: ColumnMapping | None,
    area: StagingArea,
    *,
    delimiter: str = ",",
) -> SparkImport:
    """Read ``sources`` (all of one format) with Spark and map them to canonical pings.

    CSV columns are read as text (as the embedded reader does); a rejected row is named by
    its 1-based row within its source, as the embedded engine names it, without a shuffle.
    """
    from pyspark.sql import functions as sf

    reader = spark.read
    paths = [spark_path(uri) for uri in sources]
    if fmt == "csv":
        tsv = delimiter == "," and all(
            uri.lower().split(".gz")[0].endswith(".tsv") for uri in sources
        )
        frame = reader.options(
            header="true", inferSchema="false", sep="\t" if tsv else delimiter
        ).csv(paths)
    elif fmt == "parquet":
        frame = reader.parquet(*paths)
    else:
        frame = reader.json(paths)
    # The name the embedded engine gives a source (store_uri), in Spark SQL: no Python per row.
    path = sf.url_decode(sf.col("_metadata.file_path"))
    source_name = sf.regexp_replace(sf.regexp_replace(path, "^s3a://", "s3://"), "^file:/+", "/")
    numbered = frame.withColumn(_SOURCE, source_name).withColumn(
        _BLOCK, sf.col("_metadata.file_block_start")
    )
    mapped = numbered.mapInArrow(
        partial(
            _map_sources,
            mapping_json=(mapping or ColumnMapping()).model_dump_json(),
            area=area,
        ),
        _ENVELOPE_DDL,
    )
    return SparkImport(frames=_collect(mapped))


@dataclass
class SparkPrepared:
    """What the executors prepared; the small outputs are collected once, on first use."""

    frames: Frames
    groups: int
    #: The models broadcast to the executors, when they scored too.
    scoring: Broadcast[ShippedScoring] | None = None

    def cleaned_parts(self) -> list[StagedPart]:
        """The cleaned ping parts the executors staged, for the driver to commit."""
        return _staged_parts(self.frames)

    def _collect(self, kind: str) -> list[pl.DataFrame]:
        return self.frames.get(kind, [])

    def features(self) -> pl.DataFrame:
        frames = self._collect("features")
        return pl.concat(frames, how="vertical") if frames else pl.DataFrame()

    def quarantine(self) -> pl.DataFrame:
        frames = self._collect("quarantine")
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()

    def counts(self) -> tuple[Counter[str], Counter[str]]:
        """Stage counts summed over the groups, and kept pings per source."""
        counts: Counter[str] = Counter()
        kept: Counter[str] = Counter()
        for frame in self._collect("counts"):
            loaded = json.loads(frame.item(0, "json"))
            counts.update(loaded["counts"])
            kept.update(loaded["kept_per_source"])
        return counts, kept

    def group_costs(self) -> list[tuple[int, float]]:
        """(pings, seconds in the executor's Python) of every vehicle group."""
        return [
            (int(loaded["pings"]), float(loaded["seconds"]))
            for loaded in (json.loads(f.item(0, "json")) for f in self._collect("counts"))
        ]

    def scores(self) -> SparkScores:
        """What the executors scored, in the order the embedded engine gives it."""
        return SparkScores(
            records=in_scoring_order(self._concat("scores", TRIP_RECORD_SCHEMA)),
            alerts=in_scoring_order(
                self._concat("alerts", {**TRIP_RECORD_SCHEMA, ALERT_COLUMN: pl.String()})
            ),
            set_aside=in_scoring_order(self._concat("set_aside", SET_ASIDE_SCHEMA)),
            decisions=in_scoring_order(self._concat("decisions", PREDICTION_LOG_SCHEMA)),
            routes=self._concat("routes", ROUTE_SCHEMA).sort("vehicle_id", "trip_id"),
        )

    def _concat(self, kind: str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
        frames = [frame for frame in self._collect(kind) if frame.height]
        return pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=schema)

    def close(self) -> None:
        if self.scoring is not None:
            self.scoring.unpersist()


@dataclass(frozen=True)
class SparkScores:
    """Trip scores made on the executors, collected on the driver (one row per trip)."""

    #: Answer records (:data:`TRIP_RECORD_SCHEMA`).
    records: pl.DataFrame
    #: Answer records that alert, with the ``alert`` text.
    alerts: pl.DataFrame
    #: Trips not scored, with the reason (:data:`SET_ASIDE_SCHEMA`).
    set_aside: pl.DataFrame
    #: Prediction-log rows (:data:`PREDICTION_LOG_SCHEMA`), aligned with ``records``.
    decisions: pl.DataFrame
    #: The trips' thinned routes (:data:`ROUTE_SCHEMA`), sorted by vehicle and trip.
    routes: pl.DataFrame


def in_scoring_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows of per-trip outputs in the order embedded scoring gives them.

    Embedded scoring walks the trips sorted by ``trip_id``, ``vehicle_id``; its set-asides
    list the trips with invalid features first, then those whose model output was not a
    probability (a trip is set aside once at most). Scored groups arrive in any order.
    """
    if frame.height == 0:
        return frame
    keys: list[pl.Expr] = [pl.col("trip_id"), pl.col("vehicle_id")]
    if "reason" in frame.columns:
        keys.insert(0, pl.col("reason") == SET_ASIDE_NON_FINITE)
    return frame.sort(keys, nulls_last=False, maintain_order=True)


def prepare_on_spark(
    spark: SparkSession,
    canonical_uris: list[str],
    *,
    cleaning: CleaningConfig,
    trips: TripConfig,
    features: FeatureConfig,
    reference_time: datetime,
    total_pings: int,
    pings_per_group: int,
    area: StagingArea,
) -> SparkPrepared:
    """Prepare canonical ping parts on the executors, vehicle group by vehicle group.

    Pings are shuffled by a hash of ``vehicle_id`` into groups of about
    ``pings_per_group`` pings (at least one per core), so a vehicle's pings meet in one
    group whichever files and partitions they came from, and each group goes to
    ``prepare_trips`` whole.
    """
    configs = json.dumps(
        {
            "cleaning": cleaning.model_dump(mode="json"),
            "trips": trips.model_dump(mode="json"),
            "features": features.model_dump(mode="json"),
        }
    )
    bucketed, groups = _vehicle_groups(spark, canonical_uris, total_pings, pings_per_group)
    prepared = bucketed.groupBy(_BUCKET).applyInArrow(
        _group_preparer(configs, reference_time.isoformat(), area), _ENVELOPE_DDL
    )
    return SparkPrepared(frames=_collect(prepared), groups=groups)


def score_on_spark(
    spark: SparkSession,
    canonical_uris: list[str],
    scoring: ShippedScoring,
    *,
    reference_time: datetime,
    total_pings: int,
    pings_per_group: int,
    area: StagingArea,
) -> SparkPrepared:
    """Prepare and score canonical ping parts on the executors, vehicle group by group.

    The models' ONNX exports and cards are broadcast once; each executor builds their
    scorers once (``adapters/spark/models.py``) and scores its groups with the function
    the stream and the embedded runner use, the champion card's configurations cutting
    the trips. Only score records, set-asides and prediction-log rows need the driver.
    """
    shipped = spark.sparkContext.broadcast(scoring)
    bucketed, groups = _vehicle_groups(spark, canonical_uris, total_pings, pings_per_group)
    scored = bucketed.groupBy(_BUCKET).applyInArrow(
        _group_preparer("", reference_time.isoformat(), area, shipped), _ENVELOPE_DDL
    )
    try:
        frames = _collect(scored)
    except BaseException:
        shipped.unpersist()
        raise
    return SparkPrepared(frames=frames, groups=groups, scoring=shipped)


def _vehicle_groups(
    spark: SparkSession, canonical_uris: list[str], total_pings: int, pings_per_group: int
) -> tuple[DataFrame, int]:
    """The canonical pings with their vehicle group (a hash of ``vehicle_id``)."""
    from pyspark.sql import functions as sf

    groups = max(spark.sparkContext.defaultParallelism, math.ceil(total_pings / pings_per_group))
    pings = spark.read.schema(_spark_canonical_ddl()).parquet(*map(spark_path, canonical_uris))
    bucketed = pings.withColumn(_BUCKET, sf.pmod(sf.xxhash64("vehicle_id"), sf.lit(groups)))
    return bucketed, groups


def input_error(exc: BaseException) -> InputDataError | None:
    """A user error raised on an executor (a column that does not parse) as the driver's
    one-line error, or None when the failure is something else."""
    text = str(exc)
    marker = "driverscore.errors.InputDataError: "
    if marker not in text:
        return None
    return InputDataError(text.split(marker, 1)[1].splitlines()[0].strip())
