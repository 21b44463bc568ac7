"""Prediction log sinks: buffered Parquet parts and the in-memory double."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from driverscore.adapters.prediction_log import (
    PREDICTION_LOG_SCHEMA,
    MemoryPredictionLog,
    ParquetPredictionLog,
    PredictionRecord,
)


def _record(i: int, challenger: bool) -> PredictionRecord:
    return PredictionRecord(
        decision_id=f"d{i}",
        logged_at=datetime(2026, 1, 1, tzinfo=UTC),
        trip_id=f"t{i}",
        driver_id=f"driver{i}",
        vehicle_id=f"v{i}",
        rollout_mode="canary" if challenger else "champion",
        answered_by="champion",
        model_name="m",
        champion_version="1",
        champion_score=80.0 + i,
        champion_probability=0.01,
        challenger_version="2" if challenger else None,
        challenger_score=70.0 if challenger else None,
        challenger_probability=0.02 if challenger else None,
    )


def test_parquet_log_buffers_until_flush(tmp_path: Path) -> None:
    log = ParquetPredictionLog(tmp_path / "log", max_buffered=1000)
    log.setup()
    log.add([_record(0, True), _record(1, False)])
    assert log.read().height == 0  # nothing written on the request path
    log.flush()
    log.add([_record(2, True)])
    log.flush()
    log.flush()  # an empty flush writes no part
    frame = log.read()
    assert len(list((tmp_path / "log").glob("part-*.parquet"))) == 2
    assert frame.schema == PREDICTION_LOG_SCHEMA
    assert frame["decision_id"].to_list() == ["d0", "d1", "d2"]
    assert frame["challenger_score"].to_list() == [70.0, None, 70.0]


def test_parquet_log_flushes_when_the_buffer_is_full(tmp_path: Path) -> None:
    log = ParquetPredictionLog(tmp_path, max_buffered=3)
    log.setup()
    log.add([_record(i, False) for i in range(3)])
    assert log.read().height == 3


@pytest.mark.parametrize("sink", ["memory", "parquet"])
def test_sinks_agree(sink: str, tmp_path: Path) -> None:
    log = MemoryPredictionLog() if sink == "memory" else ParquetPredictionLog(tmp_path)
    log.setup()
    log.add([_record(5, True)])
    log.flush()
    row = log.read().row(0, named=True)
    assert row["challenger_version"] == "2" and row["champion_score"] == 85.0
