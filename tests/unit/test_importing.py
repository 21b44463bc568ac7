from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from driverscore.domain.schema import PING_SCHEMA
from driverscore.errors import InputDataError
from driverscore.pipelines.importing import import_telemetry, load_mapping

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_gps_only_file_imports_completely(tmp_path: Path) -> None:
    mapping = load_mapping(str(EXAMPLES / "gps_only_kmh.mapping.yaml"), {})
    dest = tmp_path / "out" / "pings.parquet"

    result = import_telemetry(str(EXAMPLES / "gps_only_kmh.csv"), mapping, str(dest), {})

    pings = pl.read_parquet(dest)
    assert result.rows_in == result.rows_out == pings.height > 300
    assert result.rows_rejected == 0 and result.rejects_uri is None
    assert pings.columns == [*PING_SCHEMA, "source"]
    assert set(pings["vehicle_id"]) == {"van-07", "van-12"}
    assert pings["speed_mps"].max() == pytest.approx(80 / 3.6)
    # The example contains a hard brake: 50 km/h to standstill in 4 s (≈ 3.5 m/s²).
    van = pings.filter(pl.col("vehicle_id") == "van-07").sort("ts")
    assert van["speed_mps"].diff().min() == pytest.approx(-12.5 / 3.6)


def test_folder_destination_rejects_file_and_counts(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("ts,vehicle_id,lat,lon\n2024-05-01T08:00:00Z,v1,1,2\nbad,v1,1,2\n")
    (src / "b.csv").write_text("ts,vehicle_id,lat,lon\n2024-05-01T08:00:01Z,v2,1,x\n")
    dest = tmp_path / "pings"

    result = import_telemetry(str(src), None, str(dest), {})

    assert (result.rows_in, result.rows_out, result.rows_rejected) == (3, 1, 2)
    assert sorted(p.name for p in dest.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert result.rejects_uri == str(tmp_path / "pings.rejects.parquet")
    rejects = pl.read_parquet(result.rejects_uri)
    assert rejects["reason"].to_list() == ["unparseable_timestamp", "unparseable_number"]
    assert rejects["row"].to_list() == [2, 1]


def test_a_clean_reimport_removes_stale_parts_and_rejects(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("ts,vehicle_id,lat,lon\n2024-05-01T08:00:00Z,v1,1,2\nbad,v1,1,2\n")
    dest = tmp_path / "pings"
    (dest).mkdir()
    (dest / "part-00007.parquet").write_text("old")
    (dest / "README.txt").write_text("keep me")
    first = import_telemetry(str(src), None, str(dest), {})
    assert first.rejects_uri is not None

    src.write_text("ts,vehicle_id,lat,lon\n2024-05-01T08:00:00Z,v1,1,2\n")
    second = import_telemetry(str(src), None, str(dest), {})

    assert second.rejects_uri is None
    assert not Path(first.rejects_uri).exists()
    assert sorted(p.name for p in dest.iterdir()) == ["README.txt", "part-00000.parquet"]


def test_structural_error_stops_the_import(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("time,vehicle_id,lat,lon\n2024-05-01T08:00:00Z,v1,1,2\n")

    with pytest.raises(InputDataError, match="required field ts not found"):
        import_telemetry(str(src), None, str(tmp_path / "out.parquet"), {})


def test_header_only_file_is_an_error_not_an_empty_import(tmp_path: Path) -> None:
    src = tmp_path / "export.csv"
    src.write_text("ts,vehicle_id,lat,lon\n")
    dest = tmp_path / "pings.parquet"
    with pytest.raises(
        InputDataError, match=r"^no pings in .*export\.csv: the file has a header and no rows$"
    ):
        import_telemetry(str(src), None, str(dest), {})
    assert not dest.exists()


def test_a_header_only_file_beside_data_is_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("ts,vehicle_id,lat,lon\n2024-05-01T08:00:00Z,v1,1,2\n")
    (src / "b.csv").write_text("ts,vehicle_id,lat,lon\n")
    result = import_telemetry(str(src), None, str(tmp_path / "pings.parquet"), {})
    assert (result.rows_in, result.rows_out) == (1, 1)


def test_folder_of_header_only_files_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.csv", "b.csv"):
        (src / name).write_text("ts,vehicle_id,lat,lon\n")
    with pytest.raises(InputDataError, match=r"its 2 files have no rows"):
        import_telemetry(str(src), None, str(tmp_path / "pings"), {})
