"""Trip features: THE one definition, called by batch, the stream processor and the REST service.

:func:`trip_features` turns cleaned pings that carry a ``trip_id`` into one row per trip
(the table in ``docs/design.md``; column order :data:`FEATURE_COLUMNS`). It is written
for throughput and for parity at once:

- the frame is sorted once (skipped when already in trip order); every per-step quantity
  is a ``shift`` difference masked at trip starts, so no value ever mixes two trips;
- trips are aggregated by one ``group_by`` at the end, over contiguous rows, so a trip's
  features do not depend on which other trips were in the frame.

Time shares are time-weighted: a fix's state holds until the next fix, and steps longer
than ``max_dt_s`` (dropouts) carry no weight. Accelerations beyond
``max_plausible_accel_mps2`` are glitches: they are neither events nor part of the jerk.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import polars as pl

from driverscore.domain.cleaning import BoolArray, epoch_us, haversine_m
from driverscore.domain.config import FeatureConfig
from driverscore.domain.schema import PING_SCHEMA

#: Model inputs and their monotone direction: +1 means risk never falls when the feature rises,
#: 0 means no constraint. The order is the model's input order.
MODEL_FEATURES: Final[dict[str, int]] = {
    "distance_km": 1,
    "avg_speed_kmh": 0,
    "p95_speed_kmh": 0,
    "speed_std_kmh": 1,
    "hard_brake_per_100km": 1,
    "harsh_accel_per_100km": 1,
    "harsh_corner_per_100km": 1,
    "speeding_share": 1,
    "night_share": 1,
    "idle_share": 0,
    "jerk_rms_mps3": 1,
}

_UTC_US: Final = pl.Datetime("us", "UTC")

#: The trip feature row: column names and types, in output order.
FEATURE_SCHEMA: Final[dict[str, pl.DataType]] = {
    "trip_id": pl.String(),
    "vehicle_id": pl.String(),
    "driver_id": pl.String(),
    "fleet_id": pl.String(),
    "client_id": pl.String(),
    "start_ts": _UTC_US,
    "end_ts": _UTC_US,
    "ping_count": pl.Int64(),
    "duration_s": pl.Float64(),
    "distance_km": pl.Float64(),
    "avg_speed_kmh": pl.Float64(),
    "max_speed_kmh": pl.Float64(),
    "p95_speed_kmh": pl.Float64(),
    "speed_std_kmh": pl.Float64(),
    "hard_brake_count": pl.Int64(),
    "harsh_accel_count": pl.Int64(),
    "harsh_corner_count": pl.Int64(),
    "hard_brake_per_100km": pl.Float64(),
    "harsh_accel_per_100km": pl.Float64(),
    "harsh_corner_per_100km": pl.Float64(),
    "speeding_share": pl.Float64(),
    "night_share": pl.Float64(),
    "idle_share": pl.Float64(),
    "stop_count": pl.Int64(),
    "jerk_rms_mps3": pl.Float64(),
    "event_source": pl.String(),
}

#: Output column order of :func:`trip_features`.
FEATURE_COLUMNS: Final = tuple(FEATURE_SCHEMA)

_MPS_TO_KMH: Final = 3.6

# Per-trip sums are taken over integers in fixed point: an integer sum is exact in any
# order, while a float sum depends on how the values are split into blocks (memory
# alignment, chunks, threads). This is what makes a trip's features bit-identical whether
# it is alone in the frame or among millions. Resolutions: 1 µm, 1 µs, 1 mm/s, 1 mm/s³.
_UM_PER_M: Final = 1_000_000
_MILLI: Final = 1000.0
# Polars divides a column by a scalar as a multiplication by the reciprocal, except for a
# one-row column, where it divides: a trip alone would then differ in the last bit from
# the same trip among others. Every scalar division here is therefore written as an
# explicit multiplication by the reciprocal.
#: Jerk is clipped to ±1000 m/s³ before squaring so that sums cannot overflow int64;
#: physical jerk of a road vehicle stays far below.
_MAX_JERK_MM: Final = 1_000_000
_IDENTITY: Final = ("trip_id", "vehicle_id", "driver_id", "fleet_id", "client_id")


def empty_features() -> pl.DataFrame:
    """An empty trip feature frame."""
    return pl.DataFrame(schema=FEATURE_SCHEMA)


def _in_trip_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows grouped by trip (each trip contiguous) and in time order within each trip.

    Batch input arrives sorted by vehicle, ts, where trips are already contiguous; checking
    that costs two linear passes, a sort costs far more.
    """
    trip, ts = pl.col("trip_id"), pl.col("ts")
    first = trip.ne_missing(trip.shift(1))
    check = frame.select(
        (first | (ts >= ts.shift(1))).all().alias("ordered"),
        (trip.filter(first).n_unique() == first.sum()).alias("contiguous"),
    )
    if check["ordered"].item() and check["contiguous"].item():
        return frame
    return frame.sort(["trip_id", "ts"], maintain_order=True)


def _local_hour(config: FeatureConfig) -> pl.Expr:
    """Local clock hour 0..24: the IANA zone when configured, else mean solar time."""
    if config.timezone is not None:
        local = pl.col("ts").dt.convert_time_zone(config.timezone)
        return (
            local.dt.hour().cast(pl.Float64)
            + local.dt.minute().cast(pl.Float64) * (1.0 / 60.0)
            + local.dt.second().cast(pl.Float64) * (1.0 / 3600.0)
        )
    # Mean solar time: UTC shifted by 4 minutes (240 s) per degree of longitude east.
    # Integer microseconds: exact, and integer modulo is much cheaper than float modulo.
    local_us = epoch_us() + (pl.col("lon") * 240e6).cast(pl.Int64)
    return (local_us % 86_400_000_000).cast(pl.Float64) * (1.0 / 3.6e9)


def _is_night(config: FeatureConfig) -> pl.Expr:
    hour = _local_hour(config)
    start, end = config.night_start_hour, config.night_end_hour
    if start > end:  # the window wraps midnight, e.g. 22 → 5
        return (hour >= start) | (hour < end)
    return (hour >= start) & (hour < end)


def _event_starts(exceeds: pl.Expr, first: pl.Expr) -> pl.Expr:
    """1 on the first row of each contiguous run of exceedance within a trip, else 0."""
    hit = exceeds.fill_null(False)
    return (hit & (first | ~hit.shift(1).fill_null(False))).cast(pl.Int64)


def _plausible(accel: pl.Expr, config: FeatureConfig) -> pl.Expr:
    return pl.when(accel.abs() <= config.max_plausible_accel_mps2).then(accel)


def _step_columns(frame: pl.DataFrame, config: FeatureConfig) -> tuple[pl.LazyFrame, list[str]]:
    """Per-row quantities on a frame in trip order; every ``shift`` is masked at trip starts.

    ``frame`` carries ``first`` (trip start), ``trip_no`` and ``chord_m`` (see
    :func:`_trip_structure`). One lazy query in stages that name shared intermediates
    (valid step, speed of the previous fix), so that Polars computes each once, fuses the
    rest and runs it with the per-trip aggregation in one go.
    """
    speed, heading = pl.col("speed_mps"), pl.col("heading_deg")
    first_, dt_ok_, moving_ = pl.col("first"), pl.col("dt_ok"), pl.col("moving")
    speed_prev_, mean_speed_ = pl.col("speed_prev"), pl.col("mean_speed")
    dt = pl.when(~first_).then(epoch_us().diff().cast(pl.Float64) * 1e-6)
    stage1 = (
        frame.lazy()
        .select(
            "trip_no",
            "first",
            "chord_m",
            *(pl.col(name) for name in _IDENTITY),
            "ts",
            "speed_mps",
            "heading_deg",
            "speed_limit_mps",
            "accel_long_mps2",
            "accel_lat_mps2",
            _is_night(config).alias("night"),
        )
        .with_columns(
            pl.when((dt > 0) & (dt <= config.max_dt_s)).then(dt).alias("dt_ok"),
            pl.when(~first_).then(epoch_us().diff()).alias("dt_us"),
            speed.shift(1).alias("speed_prev"),
            ((speed + speed.shift(1)) * 0.5).alias("mean_speed"),
            (speed >= config.idle_speed_mps).fill_null(False).alias("moving"),
            (speed < config.idle_speed_mps).fill_null(False).alias("stopped"),
        )
    )

    # Longitudinal acceleration from the IMU and from GPS speed; lateral from the IMU and
    # from speed x yaw rate (heading change wrapped to ±180°; cornering from GPS heading is
    # noise at walking pace, hence the minimum speed). Each trip picks its source per axis
    # at aggregation time, so a source is only computed when some trip can use it.
    turn = heading - heading.shift(1)
    turn_deg = turn - 360.0 * (turn * (1.0 / 360.0)).round()  # wrapped to ±180°, no float modulo
    sources: dict[str, tuple[pl.Expr, pl.Expr]] = {}
    all_imu = frame["accel_long_mps2"].null_count() == 0 == frame["accel_lat_mps2"].null_count()
    if not all_imu:
        sources["gps"] = (
            (speed - speed_prev_) / dt_ok_,
            pl.when(mean_speed_ >= config.min_corner_speed_mps).then(
                mean_speed_ * turn_deg.radians() / dt_ok_
            ),
        )
    has_imu = min(frame["accel_long_mps2"].null_count(), frame["accel_lat_mps2"].null_count())
    if has_imu < frame.height:
        sources["imu"] = (pl.col("accel_long_mps2"), pl.col("accel_lat_mps2"))
    stage2 = stage1.with_columns(
        expr
        for name, (longitudinal, lateral) in sources.items()
        for expr in (
            _plausible(longitudinal, config).alias(f"long_{name}"),
            _plausible(lateral, config).abs().alias(f"lat_{name}"),
        )
    )

    event_exprs: list[pl.Expr] = []
    for name in sources:
        longitudinal, lateral = pl.col(f"long_{name}"), pl.col(f"lat_{name}")
        # Jerk between consecutive accelerations of one trip, only while moving.
        jerk = pl.when(moving_ & ~first_).then((longitudinal - longitudinal.shift(1)) / dt_ok_)
        event_exprs += [
            _event_starts(longitudinal <= -config.hard_brake_mps2, first_).alias(f"brake_{name}"),
            _event_starts(longitudinal >= config.harsh_accel_mps2, first_).alias(f"accel_{name}"),
            _event_starts(lateral >= config.harsh_corner_mps2, first_).alias(f"corner_{name}"),
            _fixed(jerk, _MILLI).clip(-_MAX_JERK_MM, _MAX_JERK_MM).pow(2).alias(f"jerk2_{name}"),
        ]

    # A fix's state holds until the next fix of the trip (the next row's step).
    weight = pl.when(dt_ok_.is_not_null()).then(pl.col("dt_us")).shift(-1).fill_null(0)
    limit = pl.col("speed_limit_mps")
    limited_moving = moving_ & limit.is_not_null()
    speeding = limited_moving & (speed > limit + config.speeding_tolerance_mps)
    integrable = dt_ok_.is_not_null() & speed.is_not_null() & speed_prev_.is_not_null()
    steps = stage2.select(
        "trip_no",
        *(pl.col(name) for name in _IDENTITY),
        "ts",
        "speed_mps",
        pl.when(moving_).then(_fixed(speed, _MILLI)).alias("moving_mm"),
        pl.when(moving_).then(_fixed(speed, _MILLI).pow(2)).alias("moving_mm2"),
        pl.when(first_)
        .then(0.0)
        .when(integrable)
        .then(mean_speed_ * dt_ok_)
        .otherwise(pl.col("chord_m"))
        .alias("step_m"),
        *event_exprs,
        (pl.col("stopped") & ~first_ & moving_.shift(1).fill_null(False))
        .cast(pl.Int64)
        .alias("stops"),
        weight.alias("w"),
        (weight * pl.col("stopped")).alias("w_idle"),
        (weight * pl.col("night")).alias("w_night"),
        (weight * limited_moving).alias("w_limited"),
        (weight * speeding).alias("w_speeding"),
        pl.col("accel_long_mps2").is_not_null().alias("has_imu_long"),
        pl.col("accel_lat_mps2").is_not_null().alias("has_imu_lat"),
    )
    return steps, list(sources)


def _fixed(value: pl.Expr, scale: float) -> pl.Expr:
    return (value * scale).round().cast(pl.Int64)


def _trip_structure(frame: pl.DataFrame, first: BoolArray, max_dt_s: float) -> pl.DataFrame:
    """``frame`` plus ``first`` (trip start), ``trip_no`` (sorted) and ``chord_m``.

    ``chord_m`` is the great-circle length of the steps that cannot be integrated from
    speed (dropouts longer than ``max_dt_s``, steps without speed), 0 elsewhere; they are
    rare, so the trigonometry runs on those rows only, in numpy.
    """
    n = frame.height
    t_us = frame["ts"].dt.epoch("us").to_numpy()
    speed_known = frame["speed_mps"].is_not_null().to_numpy()
    dt_us = np.zeros(n, dtype=np.int64)
    dt_us[1:] = np.diff(t_us)
    # the same test as dt_ok in _step_columns: 0 < dt <= max_dt_s, dt in float seconds
    dt_s = dt_us.astype(np.float64) * 1e-6
    integrable = (dt_s > 0) & (dt_s <= max_dt_s) & speed_known
    integrable[1:] &= speed_known[:-1]
    rows = np.flatnonzero(~first & ~integrable)
    chord_m = np.zeros(n)
    if rows.size:
        lat, lon = frame["lat"].to_numpy(), frame["lon"].to_numpy()
        chord_m[rows] = haversine_m(lat[rows - 1], lon[rows - 1], lat[rows], lon[rows])
    # Sorted by construction; the flag lets group_by slice instead of hashing.
    trip_no = pl.Series("trip_no", np.cumsum(first, dtype=np.uint32)).set_sorted()
    return frame.with_columns(pl.Series("first", first), trip_no, pl.Series("chord_m", chord_m))


def trip_features(pings: pl.DataFrame, config: FeatureConfig) -> pl.DataFrame:
    """One feature row per trip (the table in ``docs/design.md``), sorted by ``trip_id``.

    ``pings``: cleaned canonical pings with a non-null ``trip_id`` and ``speed_mps`` (see
    :func:`~driverscore.domain.cleaning.clean_pings`), one or many trips, any order.
    Events come from ``accel_long_mps2`` / ``accel_lat_mps2`` for a trip that has them
    (per axis), else from GPS speed and heading; ``event_source`` names the source of the
    longitudinal events. Features that are undefined for a trip are null (for example
    ``speeding_share`` when no speed limit is known while moving).
    """
    if pings.height == 0:
        return empty_features()
    if pings["trip_id"].null_count():
        raise ValueError("trip_features needs a trip_id on every ping; run assign_trips first")
    missing = [name for name in PING_SCHEMA if name not in pings.columns]
    frame = _in_trip_order(
        pings.with_columns(pl.lit(None, dtype=PING_SCHEMA[name]).alias(name) for name in missing)
    )
    trip = frame["trip_id"]
    first = trip.ne_missing(trip.shift(1)).fill_null(True).to_numpy()
    return features_in_trip_order(frame, first, config)


def features_in_trip_order(
    frame: pl.DataFrame, first: BoolArray, config: FeatureConfig
) -> pl.DataFrame:
    """:func:`trip_features` on canonical pings whose trips are runs of consecutive rows
    in time order, ``first`` marking the first row of each (what trip cutting produces).
    """
    if frame.height == 0:
        return empty_features()
    steps, sources = _step_columns(_trip_structure(frame, first, config.max_dt_s), config)
    trips = (
        steps.with_columns(_fixed(pl.col("step_m"), _UM_PER_M).alias("step_um"))
        .group_by("trip_no", maintain_order=True)
        .agg(
            *(pl.col(name).first() for name in _IDENTITY),
            pl.col("ts").first().alias("start_ts"),
            pl.col("ts").last().alias("end_ts"),
            pl.len().alias("ping_count"),
            pl.col("speed_mps").max().alias("max_speed"),
            pl.col("speed_mps").quantile(0.95, interpolation="linear").alias("p95_speed"),
            *(
                pl.col(f"{kind}_{source}").sum()
                for source in sources
                for kind in ("brake", "accel", "corner")
            ),
            *(pl.col(f"jerk2_{source}").count().alias(f"jerk_n_{source}") for source in sources),
            pl.col("stops").sum(),
            *(pl.col(f"jerk2_{source}").sum() for source in sources),
            pl.col("step_um").sum(),
            pl.col("moving_mm").count().alias("moving_n"),
            pl.col("moving_mm").sum(),
            pl.col("moving_mm2").sum(),
            *(pl.col(name).sum() for name in ("w", "w_idle", "w_night", "w_limited", "w_speeding")),
            pl.col("has_imu_long").any().alias("imu_long"),
            pl.col("has_imu_lat").any().alias("imu_lat"),
        )
        .sort("trip_no")
        .collect()
    )

    def by_source(name: str, axis: str = "imu_long") -> pl.Expr:
        if sources == ["gps"] or sources == ["imu"]:
            return pl.col(f"{name}_{sources[0]}")
        return pl.when(pl.col(axis)).then(pl.col(f"{name}_imu")).otherwise(pl.col(f"{name}_gps"))

    trips = trips.with_columns(
        by_source("brake").alias("brake"),
        by_source("accel").alias("accel"),
        by_source("corner", "imu_lat").alias("corner"),
        by_source("jerk2").alias("jerk2_sum"),
        by_source("jerk_n").alias("jerk2_count"),
        pl.col("imu_long").alias("imu"),
    )

    distance_km = pl.col("step_um").cast(pl.Float64) * 1e-9
    moving_n = pl.col("moving_n").cast(pl.Float64)
    mean_mm = pl.col("moving_mm") / moving_n
    # Variance from exact integer sums; clipped at 0 against rounding of the difference.
    std_mm = (pl.col("moving_mm2") / moving_n - mean_mm * mean_mm).clip(lower_bound=0.0).sqrt()
    duration_s = (pl.col("end_ts") - pl.col("start_ts")).dt.total_microseconds().cast(
        pl.Float64
    ) * 1e-6

    def per_100km(count: str) -> pl.Expr:
        return pl.when(distance_km > 0).then(pl.col(count) / distance_km * 100.0).otherwise(0.0)

    def share(part: str, whole: str) -> pl.Expr:
        return pl.when(pl.col(whole) > 0).then(pl.col(part) / pl.col(whole))

    return (
        trips.select(
            *_IDENTITY,
            "start_ts",
            "end_ts",
            "ping_count",
            duration_s.alias("duration_s"),
            distance_km.alias("distance_km"),
            pl.when(duration_s > 0)
            .then(distance_km / (duration_s * (1.0 / 3600.0)))
            .alias("avg_speed_kmh"),
            (pl.col("max_speed") * _MPS_TO_KMH).alias("max_speed_kmh"),
            (pl.col("p95_speed") * _MPS_TO_KMH).alias("p95_speed_kmh"),
            (pl.when(moving_n > 0).then(std_mm * (_MPS_TO_KMH / _MILLI))).alias("speed_std_kmh"),
            pl.col("brake").alias("hard_brake_count"),
            pl.col("accel").alias("harsh_accel_count"),
            pl.col("corner").alias("harsh_corner_count"),
            per_100km("brake").alias("hard_brake_per_100km"),
            per_100km("accel").alias("harsh_accel_per_100km"),
            per_100km("corner").alias("harsh_corner_per_100km"),
            share("w_speeding", "w_limited").alias("speeding_share"),
            share("w_night", "w").alias("night_share"),
            share("w_idle", "w").alias("idle_share"),
            pl.col("stops").alias("stop_count"),
            pl.when(pl.col("jerk2_count") > 0)
            .then((pl.col("jerk2_sum") / pl.col("jerk2_count")).sqrt() * (1.0 / _MILLI))
            .alias("jerk_rms_mps3"),
            pl.when(pl.col("imu"))
            .then(pl.lit("imu"))
            .otherwise(pl.lit("gps"))
            .alias("event_source"),
        )
        .cast(FEATURE_SCHEMA)  # type: ignore[arg-type]
        .sort("trip_id")
    )
