from __future__ import annotations

import json
from datetime import UTC, datetime

import polars as pl
import pytest

from driverscore.domain.mapping import (
    REASON_UNPARSEABLE_NUMBER,
    REASON_UNPARSEABLE_TIMESTAMP,
    REJECTED_SCHEMA,
    ColumnMapping,
    apply_mapping,
)
from driverscore.domain.schema import PING_SCHEMA
from driverscore.errors import ConfigError, InputDataError

MAPPING_YAML = """
format: csv
columns:
  ts: timestamp
  vehicle_id: unit_id
  lat: latitude
  lon: longitude
  speed_mps: speed_kph
units:
  ts: iso
  speed_mps: km/h
defaults:
  fleet_id: fleet-a
"""


def _raw(**overrides: list[str]) -> pl.DataFrame:
    columns = {
        "timestamp": ["2024-05-01T10:00:00+02:00", "2024-05-01T10:00:01+02:00"],
        "unit_id": ["v1", "v1"],
        "latitude": ["52.5", "52.5001"],
        "longitude": ["13.4", "13.4"],
        "speed_kph": ["36", "72"],
    }
    columns.update(overrides)
    return pl.DataFrame(columns)


def _mapping(text: str = MAPPING_YAML) -> ColumnMapping:
    return ColumnMapping.from_yaml_text(text, where="mapping.yaml")


def _canonical(**columns: list[object]) -> pl.DataFrame:
    base: dict[str, list[object]] = {
        "ts": ["2024-05-01T08:00:00Z"],
        "vehicle_id": ["v1"],
        "lat": ["52.5"],
        "lon": ["13.4"],
    }
    base.update(columns)
    return pl.DataFrame(base)


def test_mapped_columns_become_canonical_pings_in_si_units_and_utc() -> None:
    result = apply_mapping(_raw(), _mapping(), "trips.csv")

    assert result.pings.columns == [*PING_SCHEMA, "source"]
    assert result.pings["ts"].to_list() == [
        datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC),
        datetime(2024, 5, 1, 8, 0, 1, tzinfo=UTC),
    ]
    assert result.pings["speed_mps"].to_list() == pytest.approx([10.0, 20.0])
    assert result.pings["fleet_id"].to_list() == ["fleet-a", "fleet-a"]
    assert result.pings["source"].to_list() == ["trips.csv", "trips.csv"]
    assert result.rejected.height == 0
    assert dict(result.rejected.schema) == REJECTED_SCHEMA


@pytest.mark.parametrize(
    ("unit", "value", "expected_mps"),
    [
        ("m/s", "10", 10.0),
        ("km/h", "36", 10.0),
        ("kph", "36", 10.0),
        ("mph", "10", 4.4704),
        ("knots", "10", 5.144444),
    ],
)
def test_speed_units_convert_to_metres_per_second(
    unit: str, value: str, expected_mps: float
) -> None:
    mapping = _mapping(f"units: {{speed_mps: {unit}, speed_limit_mps: {unit}}}")
    frame = _canonical(speed_mps=[value], speed_limit_mps=[value])

    pings = apply_mapping(frame, mapping, "x.csv").pings

    assert pings["speed_mps"][0] == pytest.approx(expected_mps, rel=1e-6)
    assert pings["speed_limit_mps"][0] == pytest.approx(expected_mps, rel=1e-6)


def test_g_converts_to_metres_per_second_squared() -> None:
    mapping = _mapping("units: {accel_long_mps2: g, accel_lat_mps2: g}")
    frame = _canonical(accel_long_mps2=["-0.5"], accel_lat_mps2=["0.1"])

    pings = apply_mapping(frame, mapping, "x.csv").pings

    assert pings["accel_long_mps2"][0] == pytest.approx(-4.903325)
    assert pings["accel_lat_mps2"][0] == pytest.approx(0.980665)


@pytest.mark.parametrize(
    ("unit", "value"),
    [("epoch_s", "1714550400"), ("epoch_s", "1714550400.0"), ("epoch_ms", "1714550400000")],
)
def test_epoch_timestamps_in_seconds_or_milliseconds(unit: str, value: str) -> None:
    pings = apply_mapping(_canonical(ts=[value]), _mapping(f"units: {{ts: {unit}}}"), "x").pings

    assert pings["ts"][0] == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def test_numeric_epoch_columns_from_parquet_or_json_are_read_too() -> None:
    frame = _canonical(ts=[1714550400])
    pings = apply_mapping(frame, _mapping("units: {ts: epoch_s}"), "x.parquet").pings

    assert pings["ts"][0] == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def test_without_a_mapping_ts_may_be_iso_or_epoch_milliseconds() -> None:
    frame = _canonical(
        ts=["2024-05-01T10:00:00+02:00", "1714550401000"],
        vehicle_id=["v1", "v1"],
        lat=["1", "1"],
        lon=["2", "2"],
    )

    pings = apply_mapping(frame, None, "x.csv").pings

    assert pings["ts"].to_list() == [
        datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC),
        datetime(2024, 5, 1, 8, 0, 1, tzinfo=UTC),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01T10:00:00+02:00",
        "2024-05-01T10:00:00.000+0200",
        "2024-05-01T08:00:00Z",
        "2024-05-01 08:00:00Z",
        "2024-05-01T04:00:00-04:00",
        "2024-05-01T08:00:00",
    ],
)
def test_iso_offsets_are_honoured_and_naive_times_are_utc(text: str) -> None:
    pings = apply_mapping(_canonical(ts=[text]), _mapping("units: {ts: iso}"), "x").pings

    assert pings["ts"][0] == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def test_naive_times_take_the_configured_timezone() -> None:
    mapping = _mapping("timezone: Europe/Berlin\nunits: {ts: iso}")

    pings = apply_mapping(_canonical(ts=["2024-05-01T10:00:00"]), mapping, "x").pings

    assert pings["ts"][0] == datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def test_naive_parquet_datetimes_take_the_configured_timezone() -> None:
    frame = _canonical(ts=[datetime(2024, 1, 15, 9, 0)])
    mapping = _mapping("timezone: Europe/Berlin")

    pings = apply_mapping(frame, mapping, "x.parquet").pings

    assert pings["ts"][0] == datetime(2024, 1, 15, 8, 0, tzinfo=UTC)


def test_missing_mapped_column_names_file_column_and_fix() -> None:
    with pytest.raises(InputDataError) as caught:
        apply_mapping(_raw().drop("speed_kph"), _mapping(), "trips.csv")

    message = str(caught.value)
    assert message == (
        "trips.csv: column 'speed_kph' (mapped to speed_mps) not found; columns are: "
        "timestamp, unit_id, latitude, longitude — fix the mapping file"
    )
    assert "\n" not in message


def test_missing_required_field_without_mapping_says_how_to_map_it() -> None:
    with pytest.raises(InputDataError, match=r"x\.csv: required field lat not found"):
        apply_mapping(_canonical().drop("lat"), None, "x.csv")


def test_unparseable_values_reject_their_row_with_a_reason_and_keep_the_rest() -> None:
    raw = _raw(
        timestamp=["2024-05-01T10:00:00+02:00", "yesterday", "2024-05-01T10:00:02+02:00"],
        unit_id=["v1", "v1", "v1"],
        latitude=["52.5", "52.5", "north"],
        longitude=["13.4", "13.4", "13.4"],
        speed_kph=["36", "36", "36"],
    )

    result = apply_mapping(raw, _mapping(), "trips.csv")

    assert result.pings.height == 1
    assert result.rejected["row"].to_list() == [2, 3]
    assert result.rejected["reason"].to_list() == [
        REASON_UNPARSEABLE_TIMESTAMP,
        REASON_UNPARSEABLE_NUMBER,
    ]
    assert result.rejected["source"].to_list() == ["trips.csv", "trips.csv"]
    original = json.loads(result.rejected["raw"][1])
    assert original["latitude"] == "north"
    assert original["unit_id"] == "v1"


def test_empty_cells_are_missing_values_not_rejections() -> None:
    raw = _raw(speed_kph=["", " "])

    result = apply_mapping(raw, _mapping(), "trips.csv")

    assert result.rejected.height == 0
    assert result.pings["speed_mps"].to_list() == [None, None]


def test_a_column_where_nothing_parses_is_a_file_error() -> None:
    with pytest.raises(InputDataError, match=r"column 'speed_kph' \(mapped to speed_mps\)"):
        apply_mapping(_raw(speed_kph=["fast", "slow"]), _mapping(), "trips.csv")


def test_epoch_seconds_declared_as_milliseconds_is_explained() -> None:
    with pytest.raises(InputDataError, match="set units: ts: epoch_s"):
        apply_mapping(_canonical(ts=["1714550400"]), _mapping("units: {ts: epoch_ms}"), "x")


def test_numbers_mapped_as_iso_text_is_a_file_error() -> None:
    with pytest.raises(InputDataError, match="epoch_s or epoch_ms"):
        apply_mapping(_canonical(ts=[1714550400]), _mapping("units: {ts: iso}"), "x")


def test_defaults_fill_absent_columns_and_empty_cells_in_the_source_unit() -> None:
    mapping = _mapping(
        "units: {speed_limit_mps: km/h}\ndefaults: {speed_limit_mps: 36, client_id: acme}"
    )
    frame = _canonical(
        ts=["2024-05-01T08:00:00Z", "2024-05-01T08:00:01Z"],
        vehicle_id=["v1", "v1"],
        lat=["1", "1"],
        lon=["2", "2"],
        client_id=["", "other"],
    )

    pings = apply_mapping(frame, mapping, "x").pings

    assert pings["speed_limit_mps"].to_list() == pytest.approx([10.0, 10.0])
    assert pings["client_id"].to_list() == ["acme", "other"]


def test_unmapped_canonical_columns_are_taken_by_name() -> None:
    mapping = _mapping("columns: {speed_mps: v}\nunits: {speed_mps: km/h}")

    pings = apply_mapping(_canonical(v=["36"], heading_deg=["90"]), mapping, "x").pings

    assert pings["speed_mps"][0] == pytest.approx(10.0)
    assert pings["heading_deg"][0] == 90.0


def test_numeric_ids_become_text() -> None:
    pings = apply_mapping(_canonical(vehicle_id=[17]), None, "x.parquet").pings

    assert pings["vehicle_id"].to_list() == ["17"]


def test_rows_in_equal_rows_out_plus_rejected() -> None:
    raw = _raw(
        timestamp=["2024-05-01T10:00:00+02:00", "bad", "2024-05-01T10:00:02+02:00", "x"],
        unit_id=["v1"] * 4,
        latitude=["1", "1", "1", "1"],
        longitude=["2", "2", "?", "2"],
        speed_kph=["1", "1", "1", "1"],
    )

    result = apply_mapping(raw, _mapping(), "x")

    assert result.pings.height + result.rejected.height == raw.height


def test_unknown_field_in_mapping_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as caught:
        _mapping("columns: {speed: v}")

    message = str(caught.value)
    assert message.startswith("mapping.yaml: columns: unknown field 'speed'")
    assert "speed_mps" in message and "vehicle_id" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("units: {speed_mps: furlongs}", "use one of: m/s, km/h, mph, knots"),
        ("units: {lat: rad}", "lat has no unit to convert"),
        ("units: {ts: epoch_us}", "use one of: auto, iso, epoch_s, epoch_ms"),
        ("timezone: Mars/Olympus", "unknown time zone"),
        ("format: xlsx", "format"),
        ("colums: {}", "colums"),
        ("columns: [a, b", "not valid YAML"),
        ("- a\n- b", "YAML object"),
    ],
)
def test_bad_mapping_files_are_one_line_config_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _mapping(text)

    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_format_aliases_and_empty_mapping() -> None:
    assert _mapping("format: ndjson").format == "jsonl"
    assert _mapping("").columns == {}


def test_local_times_skipped_by_daylight_saving_reject_their_row() -> None:
    mapping = _mapping("timezone: Europe/Berlin\nunits: {ts: iso}")
    frame = _canonical(
        ts=["2024-03-31T02:30:00", "2024-03-31T03:30:00"],
        vehicle_id=["v1", "v1"],
        lat=["1", "1"],
        lon=["2", "2"],
    )

    result = apply_mapping(frame, mapping, "x")

    assert result.pings["ts"].to_list() == [datetime(2024, 3, 31, 1, 30, tzinfo=UTC)]
    assert result.rejected["reason"].to_list() == [REASON_UNPARSEABLE_TIMESTAMP]


def test_a_header_only_file_maps_to_empty_frames() -> None:
    raw = pl.DataFrame(schema=dict.fromkeys(["ts", "vehicle_id", "lat", "lon"], pl.String))

    result = apply_mapping(raw, None, "x.csv")

    assert result.pings.height == 0 and result.rejected.height == 0
    assert dict(result.rejected.schema) == REJECTED_SCHEMA
