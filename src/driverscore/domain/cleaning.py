"""Cleaning: which pings are kept, which are quarantined and why.

Every rejected ping lands in the quarantine frame with a reason code from
:data:`QUARANTINE_REASONS`; nothing is dropped silently, so ``rows_in == kept + quarantined``.
Kept pings come out sorted by ``vehicle_id, ts`` with ``driver_id`` filled and
``speed_mps`` / ``heading_deg`` derived from positions where they were missing.

All work is vectorised over the whole frame, never with per-group loops: the rules run on
integer keys (vehicle codes that order like the ids, ts in microseconds) in numpy, pick
row positions, and the frame is gathered once for the kept rows in sorted order.
Neighbours are the previous / next rows of the sorted keys, masked at vehicle, trip and
gap boundaries. :func:`clean_with_keys` also returns the keys so that trip cutting
(:func:`~driverscore.domain.trips.assign_trips_sorted`) does not recompute them.
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
IntArray = npt.NDArray[np.int64]

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


def canonical_pings(pings: pl.DataFrame) -> pl.DataFrame:
    """Canonical columns in canonical order and types, plus ``source`` when present.

    Unlike :func:`~driverscore.domain.schema.conform_pings` this accepts frames that lack
    required columns (those rows are quarantined, not raised on) and keeps ``source``.
    """
    exprs: list[pl.Expr] = []
    # fill_nan copies the column: only columns that hold a NaN get it.
    floats = [name for name in _NAN_AS_NULL if name in pings.columns]
    with_nan = (
        {
            name
            for name, found in pings.select(
                pl.col(name).cast(pl.Float64).is_nan().any() for name in floats
            )
            .row(0, named=True)
            .items()
            if found
        }
        if floats and pings.height
        else set()
    )
    for name, dtype in PING_SCHEMA.items():
        if name not in pings.columns:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
            continue
        expr = pl.col(name)
        if pings.schema[name] != dtype:
            expr = expr.cast(dtype)
        if name in with_nan:
            expr = expr.fill_nan(None)
        exprs.append(expr)
    if "source" in pings.columns:
        exprs.append(pl.col("source").cast(pl.String))
    return pings.select(exprs)


@dataclass(frozen=True)
class SortKeys:
    """Integer keys of a frame sorted by vehicle, ts, row for row (internal hand-over).

    ``vehicle``: codes that order like ``vehicle_id`` (equal ids, equal codes); ``ts_us``:
    ``ts`` as epoch microseconds; ``trip``: codes equal where ``trip_id`` is equal (nulls
    share one code), or None when no row has a given trip id. Cleaning computes them once
    and trip cutting reuses them instead of comparing strings again.
    """

    vehicle: IntArray
    ts_us: IntArray
    trip: IntArray | None

    def take(self, rows: IntArray | BoolArray) -> SortKeys:
        """The keys of a subset of the rows (indices or mask)."""
        trip = None if self.trip is None else self.trip[rows]
        return SortKeys(self.vehicle[rows], self.ts_us[rows], trip)


#: The code of a null value in :func:`ordinal_codes`.
NULL_CODE: Final = -1


def ordinal_codes(values: pl.Series) -> IntArray:
    """int64 codes that order like the values (nulls first, as -1); equal values, equal codes.

    Only the heads of runs of equal values are ranked: batch frames come grouped by
    vehicle, so this compares one string per row and ranks a few hundred.
    """
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    runs = values.rle().struct.unnest()  # columns len, value: one row per run
    codes = runs["value"].rank("dense").fill_null(0).cast(pl.Int64).to_numpy() - 1
    result: IntArray = np.repeat(codes, runs["len"].to_numpy())
    return result


def ts_us_array(frame: pl.DataFrame) -> IntArray:
    """``ts`` as epoch microseconds in numpy (nulls as the smallest int64)."""
    result: IntArray = frame["ts"].dt.epoch("us").fill_null(np.iinfo(np.int64).min).to_numpy()
    return result


def sort_keys(frame: pl.DataFrame) -> SortKeys:
    """The integer keys of ``frame`` (any order)."""
    trip = frame["trip_id"]
    trip_codes = None if trip.null_count() == len(trip) else ordinal_codes(trip)
    return SortKeys(ordinal_codes(frame["vehicle_id"]), ts_us_array(frame), trip_codes)


def is_sorted_keys(keys: SortKeys) -> bool:
    """Whether rows are ordered by vehicle code, then ts."""
    vehicle, ts = keys.vehicle, keys.ts_us
    if len(vehicle) < 2:
        return True
    step = np.diff(vehicle)
    return bool(np.all((step > 0) | ((step == 0) & (ts[1:] >= ts[:-1]))))


def sort_order(keys: SortKeys) -> IntArray:
    """Stable permutation that sorts rows by vehicle code, then ts.

    One int64 key (vehicle code x ts span + ts offset) when it fits, which numpy's stable
    sort handles fastest on the nearly sorted batch input; a two-key lexsort otherwise.
    """
    vehicle, ts = keys.vehicle, keys.ts_us
    if len(ts) == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = int(ts.min()), int(ts.max())
    span = high - low + 1
    if (int(vehicle.max()) + 2) * span < 2**62:
        key = (vehicle + 1) * span + (ts - low)
        order: IntArray = np.argsort(key, kind="stable")
    else:
        order = np.lexsort((ts, vehicle))
    return order


def neighbour_starts_keys(keys: SortKeys, gap_s: float) -> BoolArray:
    """True where a fix has no usable previous fix (rows sorted by vehicle, ts).

    The previous row is not a neighbour when it belongs to another vehicle or another
    given trip, or lies more than ``gap_s`` earlier.
    """
    n = len(keys.ts_us)
    starts = np.ones(n, dtype=bool)
    if n > 1:
        new = (np.diff(keys.vehicle) != 0) | (np.diff(keys.ts_us) > int(gap_s * 1e6))
        if keys.trip is not None:
            new |= np.diff(keys.trip) != 0
        starts[1:] = new
    return starts


def _parse_utc(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _row_reason_code(config: CleaningConfig, reference_time: datetime) -> pl.Expr:
    """Reasons decided by a row alone as 1-based positions in CLEANING_REASONS, 0 = ok.

    The first failing rule wins.
    """
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
    code = CLEANING_REASONS.index
    return (
        pl.when(missing)
        .then(code("missing_required") + 1)
        .when((ts < earliest) | (ts > latest))
        .then(code("bad_timestamp") + 1)
        .when(bad_coordinates)
        .then(code("invalid_coordinates") + 1)
        .when((speed < 0) | (speed > config.max_speed_mps))
        .then(code("impossible_speed") + 1)
        .otherwise(0)
        .cast(pl.Int64)
    )


def empty_quarantine(columns: pl.Schema) -> pl.DataFrame:
    """An empty quarantine frame for pings with the given columns."""
    schema = dict(columns)
    schema.update({"reason": pl.String(), "stage": pl.String()})
    return pl.DataFrame(schema=schema)


_DEG_TO_M: Final = np.pi / 180.0 * EARTH_RADIUS_M


def _gps_jumps(
    lat: FloatArray, lon: FloatArray, keys: SortKeys, config: CleaningConfig, gap_s: float
) -> BoolArray:
    """Fixes whose implied speed from BOTH neighbours is impossible: isolated spikes.

    One impossible edge alone is not enough: it says that this fix OR its neighbour is
    wrong (or that the clock jumped), and without the other side we cannot tell which.
    Rejecting on one edge would throw away the good fix next to every spike and the first
    fix after every dropout. A spike of two or more consecutive bad fixes is not caught;
    the feature step's plausibility limits keep it from creating events.

    The great-circle step is at most R (|Δφ| + |Δλ|) (meridian, then parallel); only steps
    where that cheap bound could exceed the limit get the haversine, so the decision is
    the haversine's at a fraction of its cost.
    """
    n = len(lat)
    jump = np.zeros(n, dtype=bool)
    if n < 3:
        return jump
    ts = keys.ts_us
    # In place: fewer fresh temporaries (page faults are a large part of the cost).
    bound_deg = np.diff(lat)
    np.abs(bound_deg, out=bound_deg)
    dlon = np.diff(lon)
    np.abs(dlon, out=dlon)
    bound_deg += dlon
    # bound_m >= limit * dt_s, with a margin far above rounding so no fast step is missed.
    per_us = config.max_implied_speed_mps * 1e-6 / (_DEG_TO_M * (1.0 + 1e-6))
    np.multiply(np.diff(ts), per_us, out=dlon)
    steps = np.flatnonzero(bound_deg >= dlon)
    # Neighbours only: same vehicle (and given trip), not farther apart than the gap.
    after = steps + 1
    same = (keys.vehicle[steps] == keys.vehicle[after]) & (
        ts[after] - ts[steps] <= int(gap_s * 1e6)
    )
    if keys.trip is not None:
        same &= keys.trip[steps] == keys.trip[after]
    steps, after = steps[same], after[same]
    if steps.size == 0:
        return jump
    # implied[i]: speed on the step from fix i to fix i + 1 (dt > 0: duplicates are gone).
    implied = step_metres_between(lat[steps], lon[steps], lat[after], lon[after])
    fast = np.zeros(n - 1, dtype=bool)
    fast[steps] = implied / ((ts[after] - ts[steps]) / 1e6) > config.max_implied_speed_mps
    jump[1:-1] = fast[:-1] & fast[1:]
    return jump


def step_metres_between(
    lat1: FloatArray, lon1: FloatArray, lat2: FloatArray, lon2: FloatArray
) -> FloatArray:
    """:func:`step_metres` for explicit pairs of fixes: the same operations, value for value."""
    phi1, phi2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((phi2 - phi1) * 0.5) ** 2 + np.cos(phi1) * np.cos(phi2) * (
        np.sin(np.radians(lon2 - lon1) * 0.5) ** 2
    )
    result: FloatArray = np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0))) * (2.0 * EARTH_RADIUS_M)
    return result


def _derived_motion(
    rows: IntArray,
    need: BoolArray,
    lat: FloatArray,
    lon: FloatArray,
    keys: SortKeys,
    gap_s: float,
) -> tuple[FloatArray, FloatArray]:
    """Speed and heading from positions over a centred window (prev → next fix).

    ``rows``: positions (in the sorted kept rows) that need a value; ``need`` their mask.
    The centred chord averages out the position noise of the middle fix, which on 1 Hz
    GPS would otherwise dominate a fix-to-fix speed. At segment ends the window is
    one-sided; a fix with no neighbour at all keeps a null speed (NaN here).
    """
    n = len(need)
    has_prev = ~neighbour_starts_keys(keys, gap_s)
    has_next = np.append(has_prev[1:], False)
    before = np.where(has_prev[rows], rows - 1, rows)
    after = np.where(has_next[rows], rows + 1, rows)
    t_us = keys.ts_us
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
    return speed, heading


def _is_identity(rows: IntArray, height: int) -> bool:
    return len(rows) == height and (height == 0 or bool(np.all(np.diff(rows) == 1)))


def _gather(frame: pl.DataFrame, rows: IntArray) -> pl.DataFrame:
    """Rows of ``frame`` by position (the frame itself when that is every row in order)."""
    if _is_identity(rows, frame.height):
        return frame
    return frame.gather(pl.Series(rows, dtype=pl.Int64))


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
    return clean_with_keys(pings, config, reference_time, neighbour_gap_s)[0]


def clean_with_keys(
    pings: pl.DataFrame, config: CleaningConfig, reference_time: datetime, neighbour_gap_s: float
) -> tuple[CleaningResult, SortKeys]:
    """:func:`clean_pings`, plus the integer sort keys of the kept rows for trip cutting.

    The rules run on integer keys and numpy arrays and pick row positions; the frame
    itself is gathered once for the kept rows (in sorted order) and once for the rejects.
    """
    frame = canonical_pings(pings)
    rows_in = frame.height
    counts: dict[str, int] = {"rows_in": rows_in}

    code = frame.select(_row_reason_code(config, reference_time)).to_series().to_numpy()
    row_rejects = np.flatnonzero(code)
    all_keys = sort_keys(frame)
    if row_rejects.size:
        rows = np.flatnonzero(code == 0)
        keys = all_keys.take(rows)
    else:
        rows = np.arange(rows_in, dtype=np.int64)
        keys = all_keys

    reordered = 0
    if not is_sorted_keys(keys):
        # A stable sort keeps input order among equal timestamps: "keep the first" works.
        order = sort_order(keys)
        keys = keys.take(order)
        same_vehicle = np.diff(keys.vehicle) == 0
        reordered = int(np.count_nonzero(same_vehicle & (np.diff(order) < 0)))
        rows = rows[order]
    counts["reordered"] = reordered

    duplicate = np.zeros(len(rows), dtype=bool)
    duplicate[1:] = (np.diff(keys.vehicle) == 0) & (np.diff(keys.ts_us) == 0)
    duplicate_rows = rows[duplicate]
    if duplicate_rows.size:
        rows, keys = rows[~duplicate], keys.take(~duplicate)

    lat = frame["lat"].to_numpy()[rows]
    lon = frame["lon"].to_numpy()[rows]
    jumps = _gps_jumps(lat, lon, keys, config, neighbour_gap_s)
    jump_rows = rows[jumps]
    if jump_rows.size:
        rows, keys = rows[~jumps], keys.take(~jumps)

    if not _is_identity(rows, rows_in):
        # A string column in several chunks gathers several times slower than in one;
        # numeric columns gather as fast either way, so only strings are rechunked.
        strings = [name for name, dtype in frame.schema.items() if dtype == pl.String]
        if strings and max(frame.select(strings).n_chunks("all")) > 1:
            frame = frame.with_columns(frame[name].rechunk() for name in strings)
    kept = _gather(frame, rows)
    counts["filled_driver_id"] = kept["driver_id"].null_count()
    counts["derived_speed"] = kept["speed_mps"].null_count()
    counts["derived_heading"] = kept["heading_deg"].null_count()
    fills: list[pl.Expr] = []
    if counts["derived_speed"] or counts["derived_heading"]:
        need = (kept["speed_mps"].is_null() | kept["heading_deg"].is_null()).to_numpy()
        if jump_rows.size:
            lat, lon = lat[~jumps], lon[~jumps]
        speed, heading = _derived_motion(
            np.flatnonzero(need), need, lat, lon, keys, neighbour_gap_s
        )
        fills += [
            pl.col("speed_mps").fill_null(pl.Series(speed).fill_nan(None)),
            pl.col("heading_deg").fill_null(pl.Series(heading).fill_nan(None)),
        ]
    if counts["filled_driver_id"]:
        fills.append(pl.col("driver_id").fill_null(pl.col("vehicle_id")))
    if fills:
        kept = kept.with_columns(fills)

    reject_rows = np.concatenate([row_rejects, duplicate_rows, jump_rows])
    reject_codes = np.concatenate(
        [
            code[row_rejects],
            np.full(duplicate_rows.size, CLEANING_REASONS.index("duplicate") + 1),
            np.full(jump_rows.size, CLEANING_REASONS.index("gps_jump") + 1),
        ]
    ).astype(np.int64)
    if reject_rows.size:
        reasons = pl.Series(CLEANING_REASONS, dtype=pl.String).gather(reject_codes - 1)
        quarantine = _gather(frame, reject_rows).with_columns(
            reasons.alias("reason"), pl.lit(CLEANING_STAGE).alias("stage")
        )
    else:
        quarantine = empty_quarantine(kept.schema)
    per_reason = np.bincount(reject_codes, minlength=len(CLEANING_REASONS) + 1)
    for position, reason in enumerate(CLEANING_REASONS, start=1):
        counts[reason] = int(per_reason[position])
    counts["kept"] = kept.height
    counts["quarantined"] = quarantine.height
    return CleaningResult(kept=kept, quarantine=quarantine, counts=counts), keys
