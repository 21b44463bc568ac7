"""Cleaning: which pings are kept, which are quarantined and why.

Every rejected ping lands in the quarantine frame with a reason code from
:data:`QUARANTINE_REASONS`; nothing is dropped silently, so ``rows_in == kept + quarantined``.
Kept pings come out sorted by ``vehicle_id, ts`` with ``driver_id`` filled and
``speed_mps`` / ``heading_deg`` derived from positions where they were missing.

All work is vectorised over the whole frame: neighbours are found with ``shift`` on the
sorted frame and masked at vehicle, trip and gap boundaries, never with per-group loops.
The same function is called with the pings of one trip (stream, REST) and with millions
of pings (batch); the boundary masks make both give identical rows for that trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl

from driverscore.domain.config import CleaningConfig
from driverscore.domain.schema import PING_SCHEMA, REQUIRED_PING_COLUMNS

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: Mean Earth radius (IUGG), metres.
EARTH_RADIUS_M: Final = 6_371_008.8

#: Neighbours farther apart than this are not used to judge or derive a fix. Batch callers
#: pass their trip gap (see :func:`driverscore.domain.prepare.prepare_trips`) so that no
#: cleaning decision ever looks across a trip boundary.
DEFAULT_NEIGHBOUR_GAP_S: Final = 300.0

#: Every reason code a quarantined row can carry, with what it means.
QUARANTINE_REASONS: Final[dict[str, str]] = {
    "missing_required": "ts, vehicle_id, lat or lon is null.",
    "bad_timestamp": "ts is before earliest_ts or after the reference time plus max_future_s.",
    "invalid_coordinates": "lat outside -90..90, lon outside -180..180, NaN, or exactly (0, 0).",
    "impossible_speed": "speed_mps is below 0 or above max_speed_mps.",
    "duplicate": "another fix of the same vehicle has the same ts; the first one is kept.",
    "gps_jump": "the implied speed from both the previous and the next fix is impossible.",
    "short_trip": "the trip is shorter than min_duration_s, min_distance_km or min_pings.",
}

#: Reason codes decided by :func:`clean_pings`, in the order they are checked.
CLEANING_REASONS: Final = (
    "missing_required",
    "bad_timestamp",
    "invalid_coordinates",
    "impossible_speed",
    "duplicate",
    "gps_jump",
)

#: Stage name written to the quarantine's ``stage`` column by this module.
CLEANING_STAGE: Final = "cleaning"

# Optional measurements where NaN (common in CSV exports) means "not measured".
_NAN_AS_NULL: Final = (
    "speed_mps",
    "heading_deg",
    "accel_long_mps2",
    "accel_lat_mps2",
    "speed_limit_mps",
)


@dataclass(frozen=True)
class CleaningResult:
    """Kept pings (sorted by vehicle, ts), quarantined pings with reasons, and counts."""

    kept: pl.DataFrame
    quarantine: pl.DataFrame
    counts: dict[str, int]


def haversine_m(
    lat1: FloatArray, lon1: FloatArray, lat2: FloatArray, lon2: FloatArray
) -> FloatArray:
    """Great-circle distance in metres between WGS84 points given in degrees (arrays)."""
    phi1, phi2 = np.radians(lat1), np.radians(lat2)
    half_dphi = (phi2 - phi1) * 0.5
    half_dlmb = np.radians(lon2 - lon1) * 0.5
    a = np.sin(half_dphi) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin(half_dlmb) ** 2
    # clip: rounding can push `a` a hair above 1 for antipodal points.
    result: FloatArray = np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0))) * (2.0 * EARTH_RADIUS_M)
    return result


def step_metres(lat: FloatArray, lon: FloatArray) -> FloatArray:
    """Great-circle distance from each fix to the next one in the arrays (length n - 1).

    The haversine formula of :func:`haversine_m`; the cosine of each latitude is computed
    once instead of twice, because trigonometry dominates the cost of cleaning.
    """
    phi = np.radians(lat)
    cos_phi = np.cos(phi)
    a = np.sin(np.diff(phi) * 0.5) ** 2 + cos_phi[:-1] * cos_phi[1:] * (
        np.sin(np.radians(np.diff(lon)) * 0.5) ** 2
    )
    result: FloatArray = np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0))) * (2.0 * EARTH_RADIUS_M)
    return result


def bearing_deg(
    lat1: FloatArray, lon1: FloatArray, lat2: FloatArray, lon2: FloatArray
) -> FloatArray:
    """Initial bearing from point 1 to point 2, degrees clockwise from north, 0..360."""
    phi1, phi2 = np.radians(lat1), np.radians(lat2)
    dlmb = np.radians(lon2 - lon1)
    y = np.sin(dlmb) * np.cos(phi2)
    x = np.cos(phi1) * np.sin(phi2) - np.sin(phi1) * np.cos(phi2) * np.cos(dlmb)
    result: FloatArray = (np.degrees(np.arctan2(y, x)) + 360.0) % 360.0
    return result


def epoch_us() -> pl.Expr:
    """``ts`` as integer microseconds: exact, so time differences carry no rounding."""
    return pl.col("ts").dt.epoch("us")


def key_starts(key: str) -> pl.Expr:
    """True on the first row of each run of equal ``key`` values (and on row 0)."""
    return pl.col(key).ne_missing(pl.col(key).shift(1))


def is_sorted_by(frame: pl.DataFrame, key: str) -> bool:
    """Whether ``frame`` is ordered by ``key`` then ``ts`` (nulls never sort correctly).

    One string comparison per row finds the runs; the order of the keys is then checked
    on the run heads only.
    """
    if frame.height < 2:
        return True
    ts = pl.col("ts")
    starts = key_starts(key)
    check = frame.select(
        (starts | (ts >= ts.shift(1))).all().alias("ts_ordered"),
        pl.col(key).filter(starts).alias("heads").implode(),
    )
    if not check["ts_ordered"].item():
        return False
    heads = check["heads"].explode()
    return bool(heads.null_count() == 0 and (heads.slice(1) > heads.slice(0, len(heads) - 1)).all())


def canonical_pings(pings: pl.DataFrame) -> pl.DataFrame:
    """Canonical columns in canonical order and types, plus ``source`` when present.

    Unlike :func:`~driverscore.domain.schema.conform_pings` this accepts frames that lack
    required columns (those rows are quarantined, not raised on) and keeps ``source``.
    """
    exprs: list[pl.Expr] = []
    for name, dtype in PING_SCHEMA.items():
        if name not in pings.columns:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
            continue
        expr = pl.col(name)
        if pings.schema[name] != dtype:
            expr = expr.cast(dtype)
        if name in _NAN_AS_NULL:
            expr = expr.fill_nan(None)
        exprs.append(expr)
    if "source" in pings.columns:
        exprs.append(pl.col("source").cast(pl.String))
    return pings.select(exprs)


def neighbour_starts(frame: pl.DataFrame, gap_s: float) -> BoolArray:
    """True where a fix has no usable previous fix, on a frame sorted by vehicle, ts.

    The previous row is not a neighbour when it belongs to another vehicle or another
    given trip, or lies more than ``gap_s`` earlier: a fix is never judged by, or derived
    from, a fix across a trip boundary.
    """
    starts = frame.select(
        key_starts("vehicle_id")
        | key_starts("trip_id")
        | (epoch_us().diff() > int(gap_s * 1e6)).fill_null(True)
    )
    result: BoolArray = starts.to_series().to_numpy()
    return result


def seconds_between(frame: pl.DataFrame) -> FloatArray:
    """Seconds from each fix to the next row (length n - 1), exact to the microsecond."""
    t_us = frame["ts"].dt.epoch("us").to_numpy()
    result: FloatArray = np.diff(t_us) / 1e6
    return result


def _parse_utc(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _row_reason(config: CleaningConfig, reference_time: datetime) -> pl.Expr:
    """Reasons decided by a row alone, first failing rule wins."""
    reference = (
        reference_time.replace(tzinfo=UTC)
        if reference_time.tzinfo is None
        else reference_time.astimezone(UTC)
    )
    earliest = _parse_utc(config.earliest_ts)
    latest = reference + timedelta(seconds=config.max_future_s)
    lat, lon, speed, ts = pl.col("lat"), pl.col("lon"), pl.col("speed_mps"), pl.col("ts")
    missing = pl.any_horizontal(pl.col(name).is_null() for name in REQUIRED_PING_COLUMNS)
    # NaN compares greater than every number in Polars, so NaN coordinates fail is_between.
    bad_coordinates = (
        ~lat.is_between(-90.0, 90.0) | ~lon.is_between(-180.0, 180.0) | ((lat == 0) & (lon == 0))
    )
    return (
        pl.when(missing)
        .then(pl.lit("missing_required"))
        .when((ts < earliest) | (ts > latest))
        .then(pl.lit("bad_timestamp"))
        .when(bad_coordinates)
        .then(pl.lit("invalid_coordinates"))
        .when((speed < 0) | (speed > config.max_speed_mps))
        .then(pl.lit("impossible_speed"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def _with_reason(frame: pl.DataFrame, reason: str | pl.Expr, stage: str) -> pl.DataFrame:
    reason_expr = pl.lit(reason) if isinstance(reason, str) else reason
    return frame.with_columns(reason_expr.alias("reason"), pl.lit(stage).alias("stage"))


def empty_quarantine(columns: pl.Schema) -> pl.DataFrame:
    """An empty quarantine frame for pings with the given columns."""
    schema = dict(columns)
    schema.update({"reason": pl.String(), "stage": pl.String()})
    return pl.DataFrame(schema=schema)


def _gps_jumps(frame: pl.DataFrame, config: CleaningConfig, gap_s: float) -> pl.Series:
    """Fixes whose implied speed from BOTH neighbours is impossible: isolated spikes.

    One impossible edge alone is not enough: it says that this fix OR its neighbour is
    wrong (or that the clock jumped), and without the other side we cannot tell which.
    Rejecting on one edge would throw away the good fix next to every spike and the first
    fix after every dropout. A spike of two or more consecutive bad fixes is not caught;
    the feature step's plausibility limits keep it from creating events.
    """
    n = frame.height
    if n < 3:
        return pl.Series(np.zeros(n, dtype=bool))
    lat, lon = frame["lat"].to_numpy(), frame["lon"].to_numpy()
    # implied[i]: speed on the step from fix i to fix i + 1; dt > 0 as duplicates are gone.
    implied = step_metres(lat, lon) / seconds_between(frame)
    fast = (implied > config.max_implied_speed_mps) & ~neighbour_starts(frame, gap_s)[1:]
    jump = np.zeros(n, dtype=bool)
    jump[1:-1] = fast[:-1] & fast[1:]
    return pl.Series(jump)


def _derive_motion(frame: pl.DataFrame, gap_s: float) -> pl.DataFrame:
    """Fill null speed and heading from positions over a centred window (prev → next fix).

    The centred chord averages out the position noise of the middle fix, which on 1 Hz
    GPS would otherwise dominate a fix-to-fix speed. At segment ends the window is
    one-sided; a fix with no neighbour at all keeps a null speed. Only the rows that need
    it are computed.
    """
    need_speed = frame["speed_mps"].is_null().to_numpy()
    need_heading = frame["heading_deg"].is_null().to_numpy()
    rows = np.flatnonzero(need_speed | need_heading)
    if rows.size == 0:
        return frame
    n = frame.height
    has_prev = ~neighbour_starts(frame, gap_s)
    has_next = np.append(has_prev[1:], False)
    before = np.where(has_prev[rows], rows - 1, rows)
    after = np.where(has_next[rows], rows + 1, rows)
    lat, lon = frame["lat"].to_numpy(), frame["lon"].to_numpy()
    t_us = frame["ts"].dt.epoch("us").to_numpy()
    span_s = (t_us[after] - t_us[before]) / 1e6
    moved = span_s > 0
    speed = np.full(n, np.nan)
    heading = np.full(n, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        speed[rows] = np.where(
            moved, haversine_m(lat[before], lon[before], lat[after], lon[after]) / span_s, np.nan
        )
    heading[rows] = np.where(
        moved, bearing_deg(lat[before], lon[before], lat[after], lon[after]), np.nan
    )
    return frame.with_columns(
        pl.col("speed_mps").fill_null(pl.Series(speed).fill_nan(None)),
        pl.col("heading_deg").fill_null(pl.Series(heading).fill_nan(None)),
    )


def clean_pings(
    pings: pl.DataFrame,
    config: CleaningConfig,
    reference_time: datetime,
    *,
    neighbour_gap_s: float = DEFAULT_NEIGHBOUR_GAP_S,
) -> CleaningResult:
    """Apply the cleaning rules to canonical pings (any order, any number of vehicles).

    Rules, each a reason code in the quarantine (first failing rule wins):
    ``missing_required``, ``bad_timestamp``, ``invalid_coordinates``, ``impossible_speed``,
    ``duplicate`` (same vehicle and ts, the first in input order is kept) and ``gps_jump``
    (an isolated position spike). Out-of-order rows are re-sorted, not rejected, and
    counted as ``reordered``. ``driver_id`` defaults to ``vehicle_id``; missing
    ``speed_mps`` and ``heading_deg`` are derived from positions.

    ``neighbour_gap_s``: fixes farther apart in time are not neighbours for the jump test
    and the derivations; pass the trip gap so no decision crosses a trip boundary.

    Returns kept pings sorted by ``vehicle_id, ts`` (canonical columns, plus ``source``
    when the input had it), the quarantine (same columns + ``reason`` + ``stage``) and
    counts with ``rows_in == kept + quarantined``.
    """
    frame = canonical_pings(pings)
    rows_in = frame.height
    counts: dict[str, int] = {"rows_in": rows_in}
    rejected: list[pl.DataFrame] = []

    frame = frame.with_columns(_row_reason(config, reference_time).alias("reason"))
    row_rejects = frame["reason"].is_not_null()
    if row_rejects.any():
        rejected.append(
            frame.filter(row_rejects).with_columns(pl.lit(CLEANING_STAGE).alias("stage"))
        )
        frame = frame.filter(~row_rejects)
    frame = frame.drop("reason")

    reordered = 0
    if not is_sorted_by(frame, "vehicle_id"):
        # A stable sort keeps input order among equal timestamps: "keep the first" works.
        frame = frame.with_row_index("_input_row").sort(["vehicle_id", "ts"], maintain_order=True)
        vehicle = pl.col("vehicle_id")
        arrived_early = (vehicle == vehicle.shift(1)) & (
            pl.col("_input_row") < pl.col("_input_row").shift(1)
        )
        reordered = int(frame.select(arrived_early.sum()).item())
        frame = frame.drop("_input_row")
    counts["reordered"] = reordered

    vehicle, ts = pl.col("vehicle_id"), pl.col("ts")
    duplicate = frame.select(
        ((vehicle == vehicle.shift(1)) & (ts == ts.shift(1))).fill_null(False)
    ).to_series()
    if duplicate.any():
        rejected.append(_with_reason(frame.filter(duplicate), "duplicate", CLEANING_STAGE))
        frame = frame.filter(~duplicate)

    jumps = _gps_jumps(frame, config, neighbour_gap_s)
    if jumps.any():
        rejected.append(_with_reason(frame.filter(jumps), "gps_jump", CLEANING_STAGE))
        frame = frame.filter(~jumps)

    counts["filled_driver_id"] = frame["driver_id"].null_count()
    counts["derived_speed"] = frame["speed_mps"].null_count()
    counts["derived_heading"] = frame["heading_deg"].null_count()
    frame = _derive_motion(frame, neighbour_gap_s)
    if counts["filled_driver_id"]:
        frame = frame.with_columns(pl.col("driver_id").fill_null(pl.col("vehicle_id")))

    quarantine = pl.concat(rejected, how="vertical") if rejected else empty_quarantine(frame.schema)
    reason_counts = dict(quarantine["reason"].value_counts().iter_rows()) if rejected else {}
    for reason in CLEANING_REASONS:
        counts[reason] = int(reason_counts.get(reason, 0))
    counts["kept"] = frame.height
    counts["quarantined"] = quarantine.height
    return CleaningResult(kept=frame, quarantine=quarantine, counts=counts)
