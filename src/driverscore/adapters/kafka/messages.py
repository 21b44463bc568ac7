"""The ping message contract on Kafka: JSON, versioned, one ping or a batch of one vehicle.

Pure code (no Kafka client): the producer encodes with it, the stream processor decodes
with it, and the rules are documented in ``docs/streaming.md``.

* single ping: ``{"schema_version": "1.0", "ts": ..., "vehicle_id": "v1", "lat": ..., ...}``
* batch: ``{"schema_version": "1.0", "vehicle_id": "v1", "pings": [{...}, ...]}``; pings
  may omit ``vehicle_id`` (they inherit the batch's) but may not name another vehicle.
* clock: ``{"schema_version": "1.0", "clock": true, "ts": ...}`` - moves event time of
  the partition it lands on forward, so trips of vehicles that went silent close.

A decoded ping is a dict of canonical field names (``docs/design.md``) with ``ts`` as
integer epoch microseconds; absent optional fields are left out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
import orjson
import polars as pl

from driverscore.domain.schema import PING_SCHEMA, PING_SCHEMA_VERSION, conform_pings

__all__ = [
    "CLOCK_KEY",
    "MESSAGE_SCHEMA_VERSION",
    "REJECT_REASONS",
    "DecodedMessage",
    "decode_message",
    "encode_batch",
    "encode_clock",
    "encode_ping",
    "pings_frame",
]

MESSAGE_SCHEMA_VERSION: Final = PING_SCHEMA_VERSION
#: Key of clock messages; no vehicle may use it.
CLOCK_KEY: Final = "__clock__"

REJECT_REASONS: Final[dict[str, str]] = {
    "not_json": "the value is not UTF-8 JSON",
    "not_an_object": "the JSON value is not an object",
    "unsupported_schema_version": "schema_version is missing or of another major version",
    "invalid_ping": "a ping lacks a required field or holds a value of the wrong type",
    "empty_batch": "a batch without pings",
    "vehicle_mismatch": "a ping of a batch names another vehicle than the batch",
    "key_mismatch": "the message key is not the vehicle id",
}

_SUPPORTED_MAJOR: Final = PING_SCHEMA_VERSION.split(".", 1)[0]
_TEXT_FIELDS: Final = tuple(n for n, t in PING_SCHEMA.items() if t == pl.String())
_NUMBER_FIELDS: Final = tuple(n for n, t in PING_SCHEMA.items() if t == pl.Float64())
_NUMBER: Final = "number"
_TEXT: Final = "text"
_FIELD_KINDS: Final[dict[str, str]] = {
    **dict.fromkeys(_TEXT_FIELDS, _TEXT),
    **dict.fromkeys(_NUMBER_FIELDS, _NUMBER),
}
_US_PER_MS: Final = 1000
# Epoch values below this are seconds, not milliseconds (1973 in ms, year 33658 in s).
_EPOCH_MS_FLOOR: Final = 100_000_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


class _InvalidMessageError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


# Not frozen: a frozen dataclass sets each field through ``object.__setattr__``, which
# made building this result a quarter of decoding a single-ping message.
@dataclass(slots=True)
class DecodedMessage:
    """Pings of one message (empty for a clock), or the reason it was rejected."""

    pings: list[dict[str, Any]] = field(default_factory=list)
    clock_us: int | None = None
    error: str | None = None

    @property
    def reason_code(self) -> str | None:
        return self.error.split(":", 1)[0] if self.error else None


def _ts_us(value: Any) -> int:
    # Text first: it is what devices send, and this runs once per ping.
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise _InvalidMessageError("invalid_ping", f"ts {value!r} is not ISO-8601") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return (parsed - _EPOCH) // _MICROSECOND  # exact integer arithmetic, in C
    if isinstance(value, bool):
        raise _InvalidMessageError("invalid_ping", "ts is a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value) or abs(value) < _EPOCH_MS_FLOOR:
            raise _InvalidMessageError("invalid_ping", f"ts {value!r} is not epoch milliseconds")
        return round(value * _US_PER_MS)
    raise _InvalidMessageError(
        "invalid_ping", "ts is missing" if value is None else "ts is not a time"
    )


def _ping(raw: Any, vehicle_id: str | None) -> dict[str, Any]:
    # Every ping of every message passes here: the decoded JSON object is checked and
    # converted in place (one pass over the fields present, exact type tests - bool is
    # not a number here), with fields this version does not know dropped afterwards.
    if type(raw) is not dict:
        raise _InvalidMessageError("invalid_ping", "a ping is not an object")
    unknown = False
    for name, value in raw.items():
        kind = _FIELD_KINDS.get(name)
        if kind is None:
            unknown = unknown or name != "ts"
            continue
        if value is None:
            unknown = True  # dropped below, like an absent field
            continue
        kind_of_value = type(value)
        if kind is _NUMBER:
            if kind_of_value is int:
                raw[name] = float(value)
            elif kind_of_value is not float:
                raise _InvalidMessageError("invalid_ping", f"{name} is not a number")
        elif kind_of_value is int:
            raw[name] = str(value)
        elif kind_of_value is not str:
            raise _InvalidMessageError("invalid_ping", f"{name} is not text")
    ping: dict[str, Any] = raw
    if unknown:
        ping = {k: v for k, v in raw.items() if v is not None and (k in _FIELD_KINDS)}
    ping["ts"] = _ts_us(raw.get("ts"))
    if "lat" not in ping:
        raise _InvalidMessageError("invalid_ping", "lat is missing")
    if "lon" not in ping:
        raise _InvalidMessageError("invalid_ping", "lon is missing")
    if vehicle_id is not None:
        own = ping.setdefault("vehicle_id", vehicle_id)
        if own != vehicle_id:
            raise _InvalidMessageError(
                "vehicle_mismatch", f"ping of {own!r} in a batch of {vehicle_id!r}"
            )
    if not ping.get("vehicle_id"):
        raise _InvalidMessageError("invalid_ping", "vehicle_id is missing")
    return ping


def _loads(value: bytes) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        # orjson refuses NaN and Infinity literals, which the json module (and many device
        # SDKs) accept: such values reach cleaning, which quarantines them with a reason.
        return json.loads(value)


def _decode(value: bytes, key: str | None) -> DecodedMessage:
    try:
        body = _loads(value)
    except (UnicodeDecodeError, ValueError):
        raise _InvalidMessageError("not_json", "value does not parse as JSON") from None
    if not isinstance(body, dict):
        raise _InvalidMessageError("not_an_object", f"JSON {type(body).__name__}, not an object")
    version = body.get("schema_version")
    if not isinstance(version, str) or version.split(".", 1)[0] != _SUPPORTED_MAJOR:
        raise _InvalidMessageError(
            "unsupported_schema_version",
            f"schema_version {version!r}; this processor reads {_SUPPORTED_MAJOR}.x",
        )
    if body.get("clock") is True:
        return DecodedMessage(clock_us=_ts_us(body.get("ts")))
    if "pings" in body:
        items = body["pings"]
        if not isinstance(items, list):
            raise _InvalidMessageError("invalid_ping", "pings is not a list")
        if not items:
            raise _InvalidMessageError("empty_batch", "pings is empty")
        batch_vehicle = body.get("vehicle_id")
        if not isinstance(batch_vehicle, str) or not batch_vehicle:
            raise _InvalidMessageError("invalid_ping", "a batch needs a vehicle_id")
        pings = [_ping(item, batch_vehicle) for item in items]
    else:
        pings = [_ping(body, None)]
    vehicle = pings[0]["vehicle_id"]
    if key is not None and key != vehicle:
        raise _InvalidMessageError("key_mismatch", f"key {key!r}, vehicle {vehicle!r}")
    return DecodedMessage(pings=pings)


class _WirePing(msgspec.Struct, omit_defaults=True):
    """A well-formed ping as msgspec decodes it: typed in C, absent and null fields left out."""

    ts: str | int | float | None = None
    vehicle_id: str | None = None
    driver_id: str | None = None
    trip_id: str | None = None
    lat: float | None = None
    lon: float | None = None
    speed_mps: float | None = None
    heading_deg: float | None = None
    accel_long_mps2: float | None = None
    accel_lat_mps2: float | None = None
    speed_limit_mps: float | None = None
    fleet_id: str | None = None
    client_id: str | None = None


class _WireMessage(_WirePing, omit_defaults=True):
    """Either shape of ping message: one ping at the top level, or a batch in ``pings``."""

    schema_version: str | None = None
    clock: bool | None = None
    pings: list[_WirePing] | None = None


_WIRE_DECODER: Final = msgspec.json.Decoder(_WireMessage)


def _decode_fast(value: bytes, key: str | None) -> DecodedMessage | None:
    """The common case at C speed: a valid message of the current major version.

    Anything unusual (a type msgspec does not take, a missing field, a clock, ids given as
    numbers, a mismatch) returns None and goes through :func:`_decode`, which gives every
    reject its reason; for valid messages both paths give the same pings.
    """
    try:
        message = _WIRE_DECODER.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    version = message.schema_version
    if version is None or version.split(".", 1)[0] != _SUPPORTED_MAJOR or message.clock:
        return None
    if message.pings is not None:
        vehicle = message.vehicle_id
        if not message.pings or not vehicle:
            return None
        pings: list[dict[str, Any]] = msgspec.to_builtins(message.pings)
        for ping in pings:
            if ping.setdefault("vehicle_id", vehicle) != vehicle:
                return None
    else:
        # The single ping, the common message: checked and converted on the struct, whose
        # envelope fields set back to their default are left out of the dict.
        ts = message.ts
        if ts is None or message.lat is None or message.lon is None or not message.vehicle_id:
            return None
        if key is not None and key != message.vehicle_id:
            return None
        try:
            message.ts = _ts_us(ts)
        except _InvalidMessageError:
            return None
        message.schema_version = message.clock = None
        return DecodedMessage([msgspec.to_builtins(message)])
    for ping in pings:
        if "lat" not in ping or "lon" not in ping or not ping.get("vehicle_id") or "ts" not in ping:
            return None
        try:
            ping["ts"] = _ts_us(ping["ts"])
        except _InvalidMessageError:
            return None
    if key is not None and key != pings[0]["vehicle_id"]:
        return None
    return DecodedMessage(pings=pings)


def decode_message(value: bytes | None, key: str | None) -> DecodedMessage:
    """Decode one message value; never raises: a bad message comes back with ``error``."""
    if value is None:
        return DecodedMessage(error="not_json: empty value (tombstone)")
    fast = _decode_fast(value, key)
    if fast is not None:
        return fast
    try:
        return _decode(value, key)
    except _InvalidMessageError as exc:
        return DecodedMessage(error=str(exc))


def _wire_ping(row: Mapping[str, Any], with_vehicle: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in row.items():
        if value is None or name not in PING_SCHEMA or (name == "vehicle_id" and not with_vehicle):
            continue
        if isinstance(value, datetime):
            value = value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        out[name] = value
    return out


def encode_ping(row: Mapping[str, Any]) -> bytes:
    """One canonical ping (``ts`` a datetime) as a single-ping message."""
    return json.dumps(
        {"schema_version": MESSAGE_SCHEMA_VERSION, **_wire_ping(row, True)},
        separators=(",", ":"),
    ).encode()


def encode_batch(vehicle_id: str, rows: Iterable[Mapping[str, Any]]) -> bytes:
    """Pings of one vehicle as one batch message."""
    body = {
        "schema_version": MESSAGE_SCHEMA_VERSION,
        "vehicle_id": vehicle_id,
        "pings": [_wire_ping(row, False) for row in rows],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def encode_clock(ts: datetime) -> bytes:
    """A clock message at ``ts``."""
    iso = ts.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    body = {"schema_version": MESSAGE_SCHEMA_VERSION, "clock": True, "ts": iso}
    return json.dumps(body, separators=(",", ":")).encode()


def pings_frame(pings: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """Decoded pings as a canonical ping frame, ready for the domain."""
    rows = list(pings)
    if not rows:
        return conform_pings(
            pl.DataFrame(
                schema={
                    "ts": pl.Int64,
                    "vehicle_id": pl.String,
                    "lat": pl.Float64,
                    "lon": pl.Float64,
                }
            )
        )
    schema: dict[str, pl.DataType] = {
        name: (pl.Int64() if name == "ts" else dtype) for name, dtype in PING_SCHEMA.items()
    }
    frame = pl.DataFrame(rows, schema=schema)
    return conform_pings(frame.with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC"))))
