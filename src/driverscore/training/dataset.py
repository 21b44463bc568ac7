"""Training data: check the claims, join them onto trips, and split by time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import polars as pl

from driverscore.domain.mapping import parse_iso_timestamps
from driverscore.errors import InputDataError

__all__ = [
    "LABEL_COLUMN",
    "LABEL_REASONS",
    "LABEL_STAGE",
    "REASON_DUPLICATE",
    "CheckedLabels",
    "check_labels",
    "label_trips",
    "time_split",
]

LABEL_COLUMN = "incident"

_TRIP_COLUMNS = ("trip_id", "vehicle_id", "start_ts", "end_ts")
_INCIDENT_COLUMNS = ("vehicle_id", "incident_ts", "reported_at")
_UTC_US: Final = pl.Datetime("us", "UTC")

REASON_DUPLICATE: Final = "duplicate"

#: Why a claim row is set aside, in the order the rules are checked (first failing wins).
#: Every reason but ``duplicate`` loses a claim, and counts against the rejected share.
LABEL_REASONS: Final[dict[str, str]] = {
    "missing_vehicle_id": "vehicle_id is empty.",
    "unparseable_incident_ts": "incident_ts is not an ISO-8601 time (or a typed timestamp).",
    "missing_incident_ts": "incident_ts is empty.",
    "unparseable_reported_at": "reported_at is not an ISO-8601 time (or a typed timestamp).",
    "missing_reported_at": "reported_at is empty.",
    "reported_before_incident": "reported_at is earlier than incident_ts.",
    REASON_DUPLICATE: (
        "another claim of the same vehicle has the same incident_ts; the first reported is kept."
    ),
}

#: Stage name of label rows in a quarantine (pings use ``import`` and ``cleaning``).
LABEL_STAGE: Final = "labels"

#: ISO-8601 spellings claims files use that the ping layouts do not read: a date alone
#: (midnight UTC) and minutes with an offset. Both were read before claims were checked,
#: so they still are.
_CLAIM_EXTRA_LAYOUTS: Final = ("%Y-%m-%d", "%Y-%m-%dT%H:%M%:z", "%Y-%m-%dT%H:%M%z")


@dataclass(frozen=True)
class CheckedLabels:
    """Claims that can be used, the rows set aside with a reason, and their counts.

    ``incidents`` has the input's columns with ``vehicle_id`` as trimmed text and both
    times in UTC. ``rejected`` holds every other row: ``source``, ``row`` (1-based data
    row), ``reason``, ``column`` and ``value`` (the field the reason is about, as written),
    ``raw`` (the whole row as JSON) and ``stage``. ``labels_in == kept + rejected``.
    """

    source: str
    incidents: pl.DataFrame
    rejected: pl.DataFrame

    @property
    def labels_in(self) -> int:
        return self.incidents.height + self.rejected.height

    def counts(self) -> dict[str, int]:
        """Rows set aside per reason, in rule order; reasons that did not occur are left out."""
        found = dict(self.rejected.group_by("reason").len().iter_rows())
        return {reason: int(found[reason]) for reason in LABEL_REASONS if reason in found}

    @property
    def duplicates(self) -> int:
        return self.counts().get(REASON_DUPLICATE, 0)

    @property
    def rejected_share(self) -> float:
        """Share of claim rows that were lost; a duplicate loses nothing, so it is not counted."""
        if self.labels_in == 0:
            return 0.0
        return (self.rejected.height - self.duplicates) / self.labels_in

    def report(self) -> dict[str, object]:
        """Counts for the quality report and the run manifest."""
        rejected = {k: v for k, v in self.counts().items() if k != REASON_DUPLICATE}
        return {
            "labels_source": self.source,
            "labels_in": self.labels_in,
            "labels_kept": self.incidents.height,
            "labels_duplicate": self.duplicates,
            "labels_rejected": rejected,
            "labels_rejected_share": round(self.rejected_share, 6),
        }


def _trimmed(series: pl.Series) -> pl.Series:
    text = series.cast(pl.String).str.strip_chars()
    return pl.select(
        pl.when(text.str.len_chars() == 0).then(None).otherwise(text).alias(series.name)
    ).to_series()


def _claim_time(series: pl.Series, source: str) -> tuple[pl.Series, pl.Series]:
    """(UTC times, True where a value was written but is not a time)."""
    name = series.name
    dtype = series.dtype
    none_failed = pl.repeat(False, series.len(), eager=True)
    if isinstance(dtype, pl.Datetime):
        # A typed timestamp without a zone is UTC, as the claims contract says.
        utc = (
            series.dt.replace_time_zone("UTC")
            if dtype.time_zone is None
            else series.dt.convert_time_zone("UTC")
        )
        return utc.cast(_UTC_US), none_failed
    if dtype == pl.Null:
        return series.cast(_UTC_US), none_failed
    if dtype != pl.String:
        raise InputDataError(
            f"{source}: column '{name}' has type {dtype}; expected a UTC timestamp"
        )
    text = _trimmed(series)
    values = parse_iso_timestamps(text)
    for layout in _CLAIM_EXTRA_LAYOUTS:
        if values.null_count() == text.null_count():
            break
        extra = text.str.replace(r"[Zz]$", "+00:00").str.to_datetime(
            layout, strict=False, time_unit="us", time_zone="UTC"
        )
        values = pl.select(pl.coalesce(values, extra)).to_series()
    return values.alias(name), text.is_not_null() & values.is_null()


def check_labels(claims: pl.DataFrame, source: str) -> CheckedLabels:
    """Split a claims table (as read, CSV columns still text) into usable and rejected rows.

    Rules, each a reason of :data:`LABEL_REASONS` (first failing rule wins): vehicle_id
    present; incident_ts and reported_at present and ISO-8601 (with an offset or ``Z``,
    else UTC; ``T`` or a space; or a date alone) or typed timestamps; reported_at not
    before incident_ts; one claim per vehicle and incident_ts (the first reported is kept).
    Times after the reference time are not rejected: a backtest with a past reference
    time sees later claims, and :func:`label_trips` leaves them out as not yet known.

    A text such as ``08/01/2026 15:41`` is rejected rather than guessed: day-first and
    month-first readings differ by months, and either guess would label the wrong trip.
    """
    missing = [c for c in _INCIDENT_COLUMNS if c not in claims.columns]
    if missing:
        raise InputDataError(
            f"{source}: labels lack column(s) {', '.join(missing)}; expected "
            "vehicle_id, incident_ts, reported_at (UTC)"
        )
    vehicle = _trimmed(claims.get_column("vehicle_id"))
    incident, incident_bad = _claim_time(claims.get_column("incident_ts"), source)
    reported, reported_bad = _claim_time(claims.get_column("reported_at"), source)
    checked = pl.DataFrame(
        [
            pl.Series("_row", range(1, claims.height + 1), dtype=pl.Int64),
            vehicle.alias("_vehicle"),
            incident.alias("_incident"),
            reported.alias("_reported"),
            incident_bad.alias("_incident_bad"),
            reported_bad.alias("_reported_bad"),
        ]
    )
    reason = (
        pl.when(pl.col("_vehicle").is_null())
        .then(pl.lit("missing_vehicle_id"))
        .when(pl.col("_incident_bad"))
        .then(pl.lit("unparseable_incident_ts"))
        .when(pl.col("_incident").is_null())
        .then(pl.lit("missing_incident_ts"))
        .when(pl.col("_reported_bad"))
        .then(pl.lit("unparseable_reported_at"))
        .when(pl.col("_reported").is_null())
        .then(pl.lit("missing_reported_at"))
        .when(pl.col("_reported") < pl.col("_incident"))
        .then(pl.lit("reported_before_incident"))
    )
    checked = checked.with_columns(reason.alias("_reason"))
    # Of the claims of one vehicle at one instant, the first reported is when the incident
    # became known; the later reports add nothing to the label.
    later_reports = (
        checked.filter(pl.col("_reason").is_null())
        .sort(["_vehicle", "_incident", "_reported", "_row"])
        .filter(~pl.struct("_vehicle", "_incident").is_first_distinct())
        .get_column("_row")
    )
    checked = checked.with_columns(
        pl.when(pl.col("_row").is_in(later_reports.implode()))
        .then(pl.lit(REASON_DUPLICATE))
        .otherwise(pl.col("_reason"))
        .alias("_reason")
    )
    keep = checked.get_column("_reason").is_null()

    incidents = claims.with_columns(
        vehicle.alias("vehicle_id"), incident.alias("incident_ts"), reported.alias("reported_at")
    ).filter(keep)
    return CheckedLabels(
        source=source,
        incidents=incidents,
        rejected=_rejected_rows(claims, checked, ~keep, source),
    )


#: The field each reason is about: its text goes to the quarantine's ``value`` column.
_REASON_COLUMN: Final[dict[str, str]] = {
    "missing_vehicle_id": "vehicle_id",
    "unparseable_incident_ts": "incident_ts",
    "missing_incident_ts": "incident_ts",
    "unparseable_reported_at": "reported_at",
    "missing_reported_at": "reported_at",
    "reported_before_incident": "reported_at",
    REASON_DUPLICATE: "incident_ts",
}


def _rejected_rows(
    claims: pl.DataFrame, checked: pl.DataFrame, rejected: pl.Series, source: str
) -> pl.DataFrame:
    bad = claims.filter(rejected)
    reasons = checked.get_column("_reason").filter(rejected)
    columns = reasons.replace_strict(_REASON_COLUMN, return_dtype=pl.String)
    original = {name: bad.get_column(name).cast(pl.String) for name in _INCIDENT_COLUMNS}
    value = pl.select(
        pl.when(columns == "vehicle_id")
        .then(original["vehicle_id"])
        .when(columns == "incident_ts")
        .then(original["incident_ts"])
        .otherwise(original["reported_at"])
    ).to_series()
    raw_json = pl.struct(bad.columns).struct.json_encode() if bad.columns else pl.lit("{}")
    return pl.DataFrame(
        [
            pl.Series("source", [source] * bad.height, dtype=pl.String),
            checked.get_column("_row").filter(rejected),
            reasons.alias("reason"),
            columns.alias("column"),
            value.alias("value"),
            bad.select(raw_json.alias("raw")).to_series(),
            pl.Series("stage", [LABEL_STAGE] * bad.height, dtype=pl.String),
        ]
    ).rename({"_row": "row"})


def _require(frame: pl.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputDataError(f"{what} lack column(s): {', '.join(missing)}")


def label_trips(
    features: pl.DataFrame,
    incidents: pl.DataFrame,
    reference_time: datetime,
    maturity_days: float,
) -> pl.DataFrame:
    """Trip feature rows with an ``incident`` column (0/1), mature trips only.

    A trip is positive when an incident of its vehicle has ``incident_ts`` within
    ``[start_ts, end_ts]`` and was reported by ``reference_time``: a claim reported later
    was not known when the model was trained, and counting it would leak the future.
    Trips that ended after ``reference_time - maturity_days`` are dropped because their
    claims may still be on the way, so a 0 there would often be a wrong label.

    Each incident is matched with an as-of join to the latest trip of its vehicle that
    started at or before it (trips of one vehicle do not overlap), which is
    O((trips + incidents) log) instead of a trips × incidents cross join.
    """
    if reference_time.tzinfo is None:
        raise ValueError("reference_time must be timezone-aware (UTC)")
    if maturity_days < 0:
        raise ValueError("maturity_days must be >= 0")
    _require(features, _TRIP_COLUMNS, "trip features")
    _require(incidents, _INCIDENT_COLUMNS, "incident labels")

    cutoff = reference_time - timedelta(days=maturity_days)
    ts_type = pl.Datetime("us", "UTC")
    trips = features.with_columns(
        pl.col("start_ts").cast(ts_type), pl.col("end_ts").cast(ts_type)
    ).filter(pl.col("end_ts") <= cutoff)

    known = (
        incidents.select(
            pl.col("vehicle_id").cast(pl.String),
            pl.col("incident_ts").cast(ts_type),
            pl.col("reported_at").cast(ts_type),
        )
        .filter(
            (pl.col("reported_at") <= reference_time)
            & pl.col("incident_ts").is_not_null()
            & pl.col("vehicle_id").is_not_null()
        )
        .sort("incident_ts")
    )
    windows = (
        trips.select(
            pl.col("trip_id"),
            pl.col("vehicle_id").cast(pl.String),
            pl.col("start_ts"),
            pl.col("end_ts").alias("_trip_end"),
        )
        .filter(pl.col("start_ts").is_not_null())
        .sort("start_ts")
    )
    matched = (
        known.join_asof(
            windows,
            left_on="incident_ts",
            right_on="start_ts",
            by="vehicle_id",
            strategy="backward",
            # Both sides are sorted just above; polars cannot verify it within ``by`` groups.
            check_sortedness=False,
        )
        .filter(pl.col("trip_id").is_not_null() & (pl.col("incident_ts") <= pl.col("_trip_end")))
        # A trip is (vehicle, trip id): devices number trips 1, 2, 3... on every vehicle.
        .select("vehicle_id", "trip_id")
        .unique()
        .with_columns(pl.lit(1, dtype=pl.Int8).alias(LABEL_COLUMN))
    )
    trips = trips.with_columns(pl.col("vehicle_id").cast(pl.String))
    return trips.join(matched, on=["vehicle_id", "trip_id"], how="left").with_columns(
        pl.col(LABEL_COLUMN).fill_null(0).cast(pl.Int8)
    )


def time_split(
    labelled: pl.DataFrame, validation_fraction: float
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, holdout): the newest ``validation_fraction`` of trips by ``end_ts`` is held out.

    Holding out the newest trips (not a random sample) measures what matters in production:
    how the model does on trips that come after everything it learned from.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError("validation_fraction must be between 0 and 1")
    # A trip is (vehicle, trip id): the vehicle breaks ties of trip ids shared by vehicles.
    keys = ["end_ts", "trip_id", *(["vehicle_id"] if "vehicle_id" in labelled.columns else [])]
    ordered = labelled.sort(keys)
    n = ordered.height
    n_holdout = round(n * validation_fraction)
    if n >= 2:
        n_holdout = min(max(n_holdout, 1), n - 1)
    n_train = n - n_holdout
    return ordered.head(n_train), ordered.tail(n - n_train)
