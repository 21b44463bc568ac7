from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from driverscore.adapters.readers import list_sources, read_table, read_text, table_format
from driverscore.errors import InputDataError

FRAME = pl.DataFrame(
    {"ts": ["2024-05-01T08:00:00Z", "2024-05-01T08:00:01Z"], "speed": [1.5, 2.0], "id": [7, 8]}
)


def test_csv_columns_are_read_as_text_for_the_mapping(tmp_path: Path) -> None:
    path = tmp_path / "pings.csv"
    FRAME.write_csv(path)

    frame = read_table(str(path), None, {})

    assert frame.schema == pl.Schema({"ts": pl.String, "speed": pl.String, "id": pl.String})
    assert frame["speed"].to_list() == ["1.5", "2.0"]


def test_csv_with_another_delimiter_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "pings.csv"
    path.write_bytes("\ufeffts;speed\n2024-05-01T08:00:00Z;1,5\n".encode())

    frame = read_table(str(path), "csv", {}, delimiter=";")

    assert frame.columns == ["ts", "speed"]
    assert frame["speed"].to_list() == ["1,5"]


def test_parquet_round_trip_keeps_types(tmp_path: Path) -> None:
    path = tmp_path / "pings.parquet"
    FRAME.write_parquet(path)

    assert read_table(str(path), None, {}).equals(FRAME)


@pytest.mark.parametrize("name", ["pings.jsonl", "pings.ndjson", "pings.json"])
def test_json_lines_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    FRAME.write_ndjson(path)

    assert read_table(str(path), None, {}).equals(FRAME)


def test_json_array_files_are_read_too(tmp_path: Path) -> None:
    path = tmp_path / "pings.json"
    FRAME.write_json(path)

    assert read_table(str(path), None, {}).equals(FRAME)


def test_json_lines_with_mixed_value_types_become_text(tmp_path: Path) -> None:
    path = tmp_path / "pings.jsonl"
    path.write_text('{"speed": 1.5}\n{"speed": "n/a"}\n')

    assert read_table(str(path), None, {})["speed"].to_list() == ["1.5", "n/a"]


def test_gzip_compressed_csv(tmp_path: Path) -> None:
    path = tmp_path / "pings.csv.gz"
    path.write_bytes(gzip.compress(b"a,b\n1,2\n"))

    assert table_format(str(path)) == "csv"
    assert read_table(str(path), None, {})["b"].to_list() == ["2"]


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match=r"nope\.csv: file not found — check the path$"):
        read_table(str(tmp_path / "nope.csv"), None, {})


def test_empty_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")

    with pytest.raises(InputDataError, match="file is empty"):
        read_table(str(path), None, {})


def test_unreadable_parquet_names_file_and_format(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_text("this is not parquet")

    with pytest.raises(InputDataError) as caught:
        read_table(str(path), None, {})

    assert str(caught.value).startswith(f"{path}: cannot be read as parquet (")
    assert "\n" not in str(caught.value)


def test_unknown_extension_asks_for_a_format(tmp_path: Path) -> None:
    path = tmp_path / "pings.xlsx"
    path.write_text("x")

    with pytest.raises(InputDataError, match="set format: csv, parquet or jsonl"):
        read_table(str(path), None, {})


def test_explicit_format_overrides_the_extension(tmp_path: Path) -> None:
    path = tmp_path / "export.dat"
    path.write_text("a,b\n1,2\n")

    assert read_table(str(path), "csv", {}).columns == ["a", "b"]


def test_list_sources_file_folder_and_glob(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ["a.csv", "b/c.parquet", "b/d.jsonl", "notes.md", "_SUCCESS", ".hidden.csv"]:
        (tmp_path / name).write_text("x")

    assert list_sources(str(tmp_path / "a.csv"), {}) == [str(tmp_path / "a.csv")]
    assert list_sources(str(tmp_path), {}) == [
        str(tmp_path / "a.csv"),
        str(tmp_path / "b" / "c.parquet"),
        str(tmp_path / "b" / "d.jsonl"),
    ]
    assert list_sources(str(tmp_path / "b" / "*.parquet"), {}) == [str(tmp_path / "b/c.parquet")]


def test_list_sources_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="no such file or folder"):
        list_sources(str(tmp_path / "missing"), {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no data files found"):
        list_sources(str(tmp_path / "empty"), {})


def test_read_text_strips_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_bytes("\ufeffcolumns: {}\n".encode())

    assert read_text(str(path), {}) == "columns: {}\n"
