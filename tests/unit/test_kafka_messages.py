"""The ping message contract: what decodes, what is rejected and why, round trips."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import polars as pl
import pytest

from driverscore.adapters.kafka import messages
from driverscore.adapters.kafka.messages import (
    REJECT_REASONS,
    decode_message,
    encode_batch,
    encode_clock,
    encode_ping,
    pings_frame,
)
from driverscore.domain.schema import PING_SCHEMA

TS = datetime(2026, 1, 5, 8, 30, 0, 250_000, tzinfo=UTC)
TS_US = 1_767_601_800_250_000


def _json(body: object) -> bytes:
    return json.dumps(body).encode()


def test_a_single_ping_round_trips_into_a_canonical_frame() -> None:
    row = {"ts": TS, "vehicle_id": "v1", "lat": 52.5, "lon": 13.4, "speed_mps": 12.5}
    decoded = decode_message(encode_ping(row), "v1")
    assert decoded.error is None
    assert decoded.pings == [
        {"ts": TS_US, "vehicle_id": "v1", "lat": 52.5, "lon": 13.4, "speed_mps": 12.5}
    ]
    frame = pings_frame(decoded.pings)
    assert frame.schema == pl.Schema(PING_SCHEMA)
    assert frame["ts"].to_list() == [TS]
    assert frame["heading_deg"].to_list() == [None]


def test_a_batch_lends_its_vehicle_to_its_pings() -> None:
    rows = [{"ts": TS, "lat": 1.0, "lon": 2.0}, {"ts": TS, "lat": 1.5, "lon": 2.5}]
    decoded = decode_message(encode_batch("v7", rows), "v7")
    assert [p["vehicle_id"] for p in decoded.pings] == ["v7", "v7"]


@pytest.mark.parametrize(
    ("ts", "expected_us"),
    [
        (1_767_601_800_250, TS_US),
        ("2026-01-05T08:30:00.25Z", TS_US),
        ("2026-01-05T09:30:00.250+01:00", TS_US),
        ("2026-01-05T08:30:00.250", TS_US),  # naive: the contract says UTC
    ],
)
def test_ts_is_epoch_milliseconds_or_iso_8601(ts: object, expected_us: int) -> None:
    body = {"schema_version": "1.0", "ts": ts, "vehicle_id": "v1", "lat": 0.5, "lon": 0.5}
    assert decode_message(_json(body), "v1").pings[0]["ts"] == expected_us


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (b"\xff{", "v1", "not_json"),
        (None, "v1", "not_json"),
        (b"[1]", "v1", "not_an_object"),
        (_json({"ts": 1, "vehicle_id": "v1"}), "v1", "unsupported_schema_version"),
        (_json({"schema_version": "2.0"}), "v1", "unsupported_schema_version"),
        (
            _json({"schema_version": "1.0", "vehicle_id": "v1", "lat": 1, "lon": 1}),
            "v1",
            "invalid_ping",
        ),
        (
            _json({"schema_version": "1.0", "ts": 17, "vehicle_id": "v1", "lat": 1, "lon": 1}),
            "v1",
            "invalid_ping",
        ),
        (
            _json(
                {
                    "schema_version": "1.0",
                    "ts": "2026-01-05",
                    "vehicle_id": "v1",
                    "lat": "x",
                    "lon": 1,
                }
            ),
            "v1",
            "invalid_ping",
        ),
        (_json({"schema_version": "1.0", "vehicle_id": "v1", "pings": []}), "v1", "empty_batch"),
        (
            _json(
                {
                    "schema_version": "1.0",
                    "vehicle_id": "v1",
                    "pings": [
                        {"ts": "2026-01-05T00:00:00Z", "vehicle_id": "v2", "lat": 1, "lon": 1}
                    ],
                }
            ),
            "v1",
            "vehicle_mismatch",
        ),
        (encode_ping({"ts": TS, "vehicle_id": "v1", "lat": 1.0, "lon": 1.0}), "v2", "key_mismatch"),
    ],
)
def test_bad_messages_come_back_with_their_reason(
    value: bytes | None, key: str, reason: str
) -> None:
    decoded = decode_message(value, key)
    assert decoded.pings == []
    assert decoded.reason_code == reason
    assert reason in REJECT_REASONS


def test_a_clock_message_carries_only_time() -> None:
    decoded = decode_message(encode_clock(TS), None)
    assert decoded.error is None and decoded.pings == [] and decoded.clock_us == TS_US


def _valid_messages() -> list[tuple[str, bytes]]:
    rows = [
        {
            "ts": datetime(2026, 1, 5, 8, 30, i, 250_000 + i, tzinfo=UTC),
            "vehicle_id": "v1",
            "driver_id": "d1",
            "trip_id": None if i % 2 else "t1",
            "lat": 52.5 + i * 1e-4,
            "lon": 13.4,
            "speed_mps": float(i),
            "heading_deg": None,
            "fleet_id": "f1",
        }
        for i in range(20)
    ]
    return [
        *(("v1", encode_ping(row)) for row in rows),
        ("v1", encode_batch("v1", rows)),
        (
            "v1",
            _json(
                {
                    "schema_version": "1.3",
                    "vehicle_id": "v1",
                    "ts": 1767601800250,
                    "lat": 52,
                    "lon": 13,
                    "speed_mps": 3,
                    "unknown": [1],
                    "heading_deg": None,
                }
            ),
        ),
        (
            "v1",
            _json(
                {
                    "schema_version": "1.0",
                    "vehicle_id": "v1",
                    "pings": [{"ts": "2026-01-05T08:30:00", "lat": 52.1, "lon": 13}],
                }
            ),
        ),
    ]


def test_the_fast_decoder_gives_exactly_what_the_checking_decoder_gives() -> None:
    # Valid messages take msgspec's typed path; it must agree with the field-by-field one
    # value for value and type for type, or batch and stream would see different pings.
    for key, value in _valid_messages():
        fast = messages._decode_fast(value, key)
        assert fast is not None, value
        checked = messages._decode(value, key)
        assert fast.pings == checked.pings
        for got, want in zip(fast.pings, checked.pings, strict=True):
            assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}


@pytest.mark.parametrize(
    "body",
    [
        {"schema_version": "1.0", "ts": 1767601800250, "vehicle_id": "v1", "lat": True, "lon": 1},
        {"schema_version": "1.0", "ts": 1767601800250, "vehicle_id": 7, "lat": 1.0, "lon": 1},
        {"schema_version": "2.0", "ts": 1767601800250, "vehicle_id": "v1", "lat": 1.0, "lon": 1},
        {"schema_version": "1.0", "vehicle_id": "v1", "pings": []},
        {"schema_version": "1.0", "ts": 1767601800250, "vehicle_id": "v1", "lon": 1.0},
        {"schema_version": "1.0", "ts": "yesterday", "vehicle_id": "v1", "lat": 1.0, "lon": 1},
    ],
)
def test_the_fast_decoder_leaves_every_odd_message_to_the_checking_one(body: object) -> None:
    assert messages._decode_fast(_json(body), "v1") is None
    assert decode_message(_json(body), "v1").error is not None
