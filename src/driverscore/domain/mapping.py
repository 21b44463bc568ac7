"""Column mapping: telemetry in any column layout and units -> canonical pings.

A mapping file says which source column holds each canonical field, in which unit, and
which constant fills a field the source does not have. :func:`apply_mapping` turns a raw
table (as read, CSV columns still text) into canonical pings plus the rows that could not
be read. A value that does not parse in one row rejects that row with a reason; a problem
with the file as a whole (a mapped column missing, a column where nothing parses) is an
:class:`~driverscore.errors.InputDataError` naming the file, the column and the fix.

Pure: the YAML arrives as text; reading files is the caller's business.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from typing import Final, Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from driverscore.domain.schema import PING_SCHEMA, REQUIRED_PING_COLUMNS, conform_pings
from driverscore.errors import ConfigError, InputDataError

__all__ = [
    "REASON_UNPARSEABLE_NUMBER",
    "REASON_UNPARSEABLE_TIMESTAMP",
    "REJECTED_SCHEMA",
    "ColumnMapping",
    "MappedPings",
    "apply_mapping",
    "parse_iso_timestamps",
]

REASON_UNPARSEABLE_TIMESTAMP: Final = "unparseable_timestamp"
REASON_UNPARSEABLE_NUMBER: Final = "unparseable_number"

#: Rows that could not be read: where from, which data row (1-based), why, and the
#: original values as a JSON object so nothing about the row is lost.
REJECTED_SCHEMA: Final[dict[str, pl.DataType]] = {
    "source": pl.String(),
    "row": pl.Int64(),
    "reason": pl.String(),
    "raw": pl.String(),
}

_TIME_UNITS: Final = ("auto", "iso", "epoch_s", "epoch_ms")
#: Factors to m/s. A knot is one nautical mile (1852 m) per hour; a mile is 1609.344 m.
_SPEED_UNITS: Final[dict[str, float]] = {
    "m/s": 1.0,
    "km/h": 1000.0 / 3600.0,
    "mph": 1609.344 / 3600.0,
    "knots": 1852.0 / 3600.0,
}
#: Standard gravity, the conventional value accelerometers report "g" against.
_STANDARD_GRAVITY_MPS2: Final = 9.80665
_ACCEL_UNITS: Final[dict[str, float]] = {"m/s2": 1.0, "g": _STANDARD_GRAVITY_MPS2}
_UNIT_ALIASES: Final[dict[str, str]] = {
    "mps": "m/s",
    "kmh": "km/h",
    "kph": "km/h",
    "km/hr": "km/h",
    "kn": "knots",
    "kt": "knots",
    "knot": "knots",
    "m/s^2": "m/s2",
    "m/s²": "m/s2",
    "mps2": "m/s2",
    "epoch": "epoch_s",
    "unix": "epoch_s",
    "unix_ms": "epoch_ms",
}
_SPEED_FIELDS: Final = ("speed_mps", "speed_limit_mps")
_ACCEL_FIELDS: Final = ("accel_long_mps2", "accel_lat_mps2")
_STRING_FIELDS: Final = tuple(n for n, t in PING_SCHEMA.items() if t == pl.String())
_NUMBER_FIELDS: Final = tuple(n for n, t in PING_SCHEMA.items() if t == pl.Float64())

#: Epoch values above this are milliseconds, below are seconds: 1e11 s is the year 5138,
#: 1e11 ms is March 1973. Used only to explain a wrong ``units: ts:`` setting.
_EPOCH_S_MS_BOUNDARY: Final = 1e11

_ISO_WITH_OFFSET: Final = ("%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M:%S%.f%z")
#: Whole seconds first: Polars parses that exact layout on a fast path.
_ISO_NAIVE: Final = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M")
_MAX_COLUMNS_LISTED: Final = 30
_MIN_VALUES_FOR_COLUMN_ERROR: Final = 2
_LAYOUT_SAMPLE_SIZE: Final = 64


def _valid_names() -> str:
    return ", ".join(PING_SCHEMA)


class ColumnMapping(BaseModel):
    """How a source table maps onto canonical pings (see ``docs/telemetry.md``).

    Canonical fields not listed under ``columns`` are taken from a source column of the
    same name when there is one. ``defaults`` fill a field the source lacks (or its empty
    values), written in the field's source unit.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["csv", "parquet", "jsonl"] | None = Field(
        default=None, description="File format; by default from the file extension."
    )
    delimiter: str = Field(
        default=",", min_length=1, max_length=1, description="CSV field separator."
    )
    timezone: str = Field(
        default="UTC", description="Zone of timestamps written without an offset."
    )
    columns: dict[str, str] = Field(default_factory=dict)
    units: dict[str, str] = Field(default_factory=dict)
    defaults: dict[str, str | int | float] = Field(default_factory=dict)

    @field_validator("format", mode="before")
    @classmethod
    def _format_alias(cls, value: object) -> object:
        if isinstance(value, str) and value.lower() in ("ndjson", "json", "jsonl"):
            return "jsonl"
        return value.lower() if isinstance(value, str) else value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin)"
            ) from exc
        return value

    @field_validator("columns", "defaults")
    @classmethod
    def _canonical_keys(cls, value: dict[str, object]) -> dict[str, object]:
        for name in value:
            if name not in PING_SCHEMA:
                raise ValueError(f"unknown field {name!r}; valid fields are: {_valid_names()}")
        return value

    @field_validator("units")
    @classmethod
    def _known_units(cls, value: dict[str, str]) -> dict[str, str]:
        normalised: dict[str, str] = {}
        for name, raw_unit in value.items():
            unit = _UNIT_ALIASES.get(str(raw_unit).strip().lower(), str(raw_unit).strip().lower())
            allowed: tuple[str, ...]
            if name == "ts":
                allowed = _TIME_UNITS
            elif name in _SPEED_FIELDS:
                allowed = tuple(_SPEED_UNITS)
            elif name in _ACCEL_FIELDS:
                allowed = tuple(_ACCEL_UNITS)
            elif name in PING_SCHEMA:
                raise ValueError(f"{name} has no unit to convert (it is taken as documented)")
            else:
                raise ValueError(f"unknown field {name!r}; valid fields are: {_valid_names()}")
            if unit not in allowed:
                raise ValueError(f"unit {raw_unit!r} for {name}; use one of: {', '.join(allowed)}")
            normalised[name] = unit
        return normalised

    @classmethod
    def from_yaml_text(cls, text: str, where: str) -> ColumnMapping:
        """Parse a mapping file's text; ``where`` names the file in error messages."""
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{where}: not valid YAML{at} — fix the mapping file") from None
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ConfigError(
                f"{where}: a mapping file is a YAML object with columns/units/defaults"
            )
        try:
            return cls.model_validate(document)
        except ValidationError as exc:
            first = exc.errors()[0]
            location = ".".join(str(part) for part in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise ConfigError(f"{where}: {location}: {message}{more}") from None

    def unit(self, name: str) -> str:
        if name in self.units:
            return self.units[name]
        if name == "ts":
            return "auto"
        if name in _SPEED_FIELDS:
            return "m/s"
        if name in _ACCEL_FIELDS:
            return "m/s2"
        return ""


@dataclass(frozen=True, slots=True)
class MappedPings:
    """Canonical pings (plus ``source``) and the rows that could not be read."""

    pings: pl.DataFrame
    rejected: pl.DataFrame


@dataclass(frozen=True, slots=True)
class _Parsed:
    values: pl.Series
    #: True where the source held a value that did not parse.
    failed: pl.Series


def _list_columns(columns: list[str]) -> str:
    shown = ", ".join(columns[:_MAX_COLUMNS_LISTED])
    if len(columns) > _MAX_COLUMNS_LISTED:
        shown += f", … ({len(columns)} in all)"
    return shown or "(none)"


def _as_text(series: pl.Series) -> pl.Series:
    """Trimmed text with empty cells as null: an empty CSV cell is a missing value."""
    text = series.str.strip_chars()
    return pl.select(
        pl.when(text.str.len_chars() == 0).then(None).otherwise(text).alias(series.name)
    ).to_series()


def _parse_number(series: pl.Series, label: str) -> _Parsed:
    dtype = series.dtype
    if dtype.is_numeric() or dtype == pl.Boolean or dtype == pl.Null:
        values = series.cast(pl.Float64)
        failed = pl.repeat(False, series.len(), eager=True)
    elif dtype == pl.String:
        text = _as_text(series)
        values = text.cast(pl.Float64, strict=False)
        failed = text.is_not_null() & values.is_null()
    else:
        raise InputDataError(f"{label} holds {dtype} values, not numbers — map a numeric column")
    # NaN is how many writers spell "no reading"; treat it like an empty cell.
    return _Parsed(values.fill_nan(None), failed)


def _parse_text(series: pl.Series, label: str) -> pl.Series:
    dtype = series.dtype
    if dtype.is_nested() or dtype == pl.Binary:
        raise InputDataError(f"{label} holds {dtype} values, not text — map a text column")
    return _as_text(series.cast(pl.String))


def _epoch_to_utc(seconds_or_ms: pl.Series, unit: str, label: str) -> pl.Series:
    finite = seconds_or_ms.filter(seconds_or_ms.is_finite())
    if finite.len() > 0:
        median = finite.abs().median()
        median = float(median) if isinstance(median, int | float) else 0.0
        if unit == "epoch_s" and median > _EPOCH_S_MS_BOUNDARY:
            raise InputDataError(
                f"{label}: values look like epoch milliseconds, not seconds"
                " — set units: ts: epoch_ms"
            )
        if unit in ("epoch_ms", "auto") and 0 < median < _EPOCH_S_MS_BOUNDARY:
            raise InputDataError(
                f"{label}: values look like epoch seconds, not milliseconds"
                " — set units: ts: epoch_s"
            )
    micros_per_unit = 1e6 if unit == "epoch_s" else 1e3
    # Out-of-range and non-finite values become null here and are reported as unparseable.
    micros = (seconds_or_ms * micros_per_unit).round(0).cast(pl.Int64, strict=False)
    return micros.cast(pl.Datetime("us", "UTC"))


def _parse_iso_as(text: pl.Series, fmt: str, zone: str) -> pl.Series:
    if fmt in _ISO_WITH_OFFSET:
        return text.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
    naive = text.str.to_datetime(fmt, strict=False, time_unit="us")
    # Local times that do not exist (spring forward) cannot be placed: reject them;
    # ambiguous ones (fall back) take the earlier instant.
    local = naive.dt.replace_time_zone(zone, ambiguous="earliest", non_existent="null")
    return local.dt.convert_time_zone("UTC")


def _layouts_by_fit(text: pl.Series, zone: str) -> list[str]:
    """ISO layouts, the ones that read a sample of the values first.

    A failing parse costs as much as a successful one, so a file of naive times should
    not first be run through every layout with an offset.
    """
    sample = text.drop_nulls().head(_LAYOUT_SAMPLE_SIZE)
    layouts = [*_ISO_WITH_OFFSET, *_ISO_NAIVE]
    fit = {fmt: _parse_iso_as(sample, fmt, zone).null_count() for fmt in layouts}
    return sorted(layouts, key=lambda fmt: fit[fmt])


def _parse_iso(text: pl.Series, zone: str) -> pl.Series:
    # A trailing Z and a space instead of T are common ISO-8601 spellings; chrono wants
    # a numeric offset and a T. The checks keep the regexes off files that need neither.
    if text.str.contains(" ", literal=True).any():
        text = text.str.replace(r"^(\d{4}-\d{2}-\d{2}) ", "${1}T")
    if text.str.ends_with("Z").any() or text.str.ends_with("z").any():
        text = text.str.replace(r"[Zz]$", "+00:00")
    result = pl.Series(text.name, [None] * text.len(), dtype=pl.Datetime("us", "UTC"))
    # Each layout is tried only on the values no earlier layout could read: a file in one
    # layout costs one parse, not one per layout.
    for fmt in _layouts_by_fit(text, zone):
        pending = (result.is_null() & text.is_not_null()).arg_true()
        if pending.len() == 0:
            break
        result = result.scatter(pending, _parse_iso_as(text.gather(pending), fmt, zone))
    return result


def parse_iso_timestamps(text: pl.Series, zone: str = "UTC") -> pl.Series:
    """ISO-8601 text as UTC timestamps, read exactly as ping ``ts`` text is read.

    Values are trimmed; a value with an offset or ``Z`` keeps it, a naive one is in
    ``zone``. Empty cells and values that do not parse come back null: callers that need
    to tell the two apart compare with the input.
    """
    return _parse_iso(_as_text(text.cast(pl.String)), zone)


def _parse_timestamp(series: pl.Series, unit: str, zone: str, label: str) -> _Parsed:
    dtype = series.dtype
    no_failures = pl.repeat(False, series.len(), eager=True)
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            series = series.dt.replace_time_zone(zone, ambiguous="earliest", non_existent="null")
        values = series.dt.convert_time_zone("UTC").cast(pl.Datetime("us", "UTC"))
        return _Parsed(values, series.is_null() & no_failures)
    if dtype == pl.Date:
        return _parse_timestamp(series.cast(pl.Datetime("us")), unit, zone, label)
    if dtype.is_numeric() or dtype == pl.Null:
        if unit == "iso" and dtype != pl.Null:
            raise InputDataError(
                f"{label} holds numbers, not ISO-8601 text — set units: ts: epoch_s or epoch_ms"
            )
        return _Parsed(_epoch_to_utc(series.cast(pl.Float64), unit, label), no_failures)
    if dtype != pl.String:
        raise InputDataError(f"{label} holds {dtype} values, not timestamps — map a time column")
    text = _as_text(series)
    if unit in ("epoch_s", "epoch_ms"):
        values = _epoch_to_utc(text.cast(pl.Float64, strict=False), unit, label)
    elif unit == "iso":
        values = _parse_iso(text, zone)
    else:
        # Without a declared unit the wire contract allows ISO-8601 or epoch milliseconds.
        numbers = text.cast(pl.Float64, strict=False)
        from_epoch = (
            _epoch_to_utc(numbers, "auto", label)
            if numbers.null_count() < numbers.len()
            else numbers.cast(pl.Datetime("us", "UTC"))
        )
        # Only the values that are not numbers are tried as ISO-8601 text.
        not_numbers = pl.select(pl.when(numbers.is_null()).then(text)).to_series()
        values = pl.select(pl.coalesce(from_epoch, _parse_iso(not_numbers, zone))).to_series()
    return _Parsed(values.alias(series.name), text.is_not_null() & values.is_null())


def _check_not_all_failed(parsed: _Parsed, original: pl.Series, label: str, what: str) -> None:
    failures = int(parsed.failed.sum())
    # A wrong mapping shows as a column where nothing parses; a lone value that does not
    # parse is just a bad row, so it takes at least two values to call it the column.
    if failures < _MIN_VALUES_FOR_COLUMN_ERROR or failures < original.len() - original.null_count():
        return
    example = original.filter(parsed.failed)[0]
    hint = (
        "check units: ts (iso, epoch_s, epoch_ms) and timezone in the mapping file"
        if what == "timestamp"
        else "check which column is mapped there"
    )
    raise InputDataError(f"{label}: no value parses as a {what} (first: {example!r}) — {hint}")


def _source_series(raw: pl.DataFrame, name: str, mapping: ColumnMapping, source: str) -> pl.Series:
    mapped = mapping.columns.get(name)
    if mapped is not None:
        if mapped not in raw.columns:
            raise InputDataError(
                f"{source}: column {mapped!r} (mapped to {name}) not found; columns are: "
                f"{_list_columns(raw.columns)} — fix the mapping file"
            )
        return raw.get_column(mapped)
    if name in raw.columns:
        return raw.get_column(name)
    if name in mapping.defaults:
        return pl.Series(name, [str(mapping.defaults[name])] * raw.height, dtype=pl.String)
    if name in REQUIRED_PING_COLUMNS:
        raise InputDataError(
            f"{source}: required field {name} not found; columns are: "
            f"{_list_columns(raw.columns)} — map it under columns: in a mapping file"
        )
    return pl.Series(name, [None] * raw.height, dtype=pl.Null)


def _parse_field(name: str, original: pl.Series, mapping: ColumnMapping, label: str) -> _Parsed:
    if name == "ts":
        parsed = _parse_timestamp(original, mapping.unit(name), mapping.timezone, label)
        _check_not_all_failed(parsed, original, label, "timestamp")
        return parsed
    if name in _NUMBER_FIELDS:
        parsed = _parse_number(original, label)
        _check_not_all_failed(parsed, original, label, "number")
        factor = _SPEED_UNITS.get(mapping.unit(name)) or _ACCEL_UNITS.get(mapping.unit(name))
        if factor is None or factor == 1.0:
            return parsed
        return _Parsed(parsed.values * factor, parsed.failed)
    return _Parsed(_parse_text(original, label), pl.repeat(False, original.len(), eager=True))


def apply_mapping(raw: pl.DataFrame, mapping: ColumnMapping | None, source: str) -> MappedPings:
    """Map a raw table onto canonical pings; rows with unreadable values go to ``rejected``.

    ``mapping=None`` expects canonical column names and units, ``ts`` as ISO-8601 or epoch
    milliseconds. ``source`` names the input in the output and in error messages.
    """
    mapping = mapping if mapping is not None else ColumnMapping()
    columns: list[pl.Series] = []
    timestamp_failed = pl.repeat(False, raw.height, eager=True)
    number_failed = pl.repeat(False, raw.height, eager=True)
    for name in PING_SCHEMA:
        mapped_from = mapping.columns.get(name, name)
        label = f"{source}: column {mapped_from!r}" + (
            f" (mapped to {name})" if mapped_from != name else ""
        )
        parsed = _parse_field(name, _source_series(raw, name, mapping, source), mapping, label)
        values = parsed.values
        if name in mapping.defaults:
            # Defaults are written in the field's source unit, so they take the same parser;
            # they also fill the empty cells of a column the source does have.
            filler = pl.Series(name, [str(mapping.defaults[name])] * raw.height, dtype=pl.String)
            default = _parse_field(name, filler, mapping, f"{source}: default for {name}")
            values = pl.select(pl.coalesce(values, default.values)).to_series()
        if name == "ts":
            timestamp_failed = parsed.failed
        else:
            number_failed = number_failed | parsed.failed
        columns.append(values.alias(name))

    failed = timestamp_failed | number_failed
    pings = conform_pings(pl.DataFrame(columns).filter(~failed)).with_columns(
        pl.lit(source, dtype=pl.String).alias("source")
    )
    # Rejects are usually few: select them first, then encode only those rows as JSON.
    bad_rows = raw.filter(failed)
    raw_json = pl.struct(raw.columns).struct.json_encode() if raw.columns else pl.lit("{}")
    rejected = bad_rows.select(
        pl.lit(source, dtype=pl.String).alias("source"),
        pl.Series("row", failed.arg_true() + 1, dtype=pl.Int64),
        pl.Series("reason", timestamp_failed.filter(failed), dtype=pl.Boolean).replace_strict(
            {True: REASON_UNPARSEABLE_TIMESTAMP, False: REASON_UNPARSEABLE_NUMBER},
            return_dtype=pl.String,
        ),
        raw_json.alias("raw"),
    )
    return MappedPings(pings=pings, rejected=rejected.cast(pl.Schema(REJECTED_SCHEMA)))
