"""What the score store takes: a batch of trip score records, alerts and routes.

Records are checked before they are stored: a row the store cannot key, or a shadow
record, is not written but kept with its reason (``rejects``), like every other reject of
the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import polars as pl

from driverscore.domain.routes import EVENT_COLUMNS, ROUTE_SCHEMA
from driverscore.domain.trip_scoring import ALERT_COLUMN, TRIP_RECORD_SCHEMA

__all__ = [
    "ALERT_SCHEMA",
    "KEY_COLUMNS",
    "REJECT_SCHEMA",
    "ScoreBatch",
    "decode_lines",
    "split_storable",
]

#: A stored record's key: the trip (vehicle, trip) and the model version that scored it.
KEY_COLUMNS: Final = ("vehicle_id", "trip_id", "model_version")

ALERT_SCHEMA: Final[dict[str, pl.DataType]] = {**TRIP_RECORD_SCHEMA, ALERT_COLUMN: pl.String()}

#: A record the store did not take: where it came from, why, and the record itself (JSON).
REJECT_SCHEMA: Final[dict[str, pl.DataType]] = {
    "source": pl.String(),
    "reason": pl.String(),
    "value": pl.String(),
}

_REQUIRED: Final = (*KEY_COLUMNS, "scored_at", "end_ts", "score")


def _empty(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


@dataclass(frozen=True)
class ScoreBatch:
    """One write: answer records (``TRIP_RECORD_SCHEMA``), alert records (the same plus
    ``alert``), routes (``ROUTE_SCHEMA``) and rejected input with its reason. ``source``
    names the writer (``score``, ``stream``, ``sink``) in the stored rows."""

    source: str
    scores: pl.DataFrame = field(default_factory=lambda: _empty(TRIP_RECORD_SCHEMA))
    alerts: pl.DataFrame = field(default_factory=lambda: _empty(ALERT_SCHEMA))
    routes: pl.DataFrame = field(default_factory=lambda: _empty(ROUTE_SCHEMA))
    rejects: pl.DataFrame = field(default_factory=lambda: _empty(REJECT_SCHEMA))

    def __len__(self) -> int:
        return self.scores.height + self.alerts.height + self.routes.height + self.rejects.height


def _problem(frame: pl.DataFrame) -> pl.Expr:
    """Why a record cannot be stored (null when it can); the first failing rule wins."""
    expr: pl.Expr | None = None
    rules = [(pl.col(c).is_null(), f"missing_{c}") for c in _REQUIRED if c in frame.columns]
    rules += [(pl.lit(value=True), f"missing_{c}") for c in _REQUIRED if c not in frame.columns]
    # Shadow scores answer nobody: the prediction log pairs them with the answers.
    if "model_role" in frame.columns:
        rules.append((pl.col("model_role") == "shadow", "shadow_record"))
    for condition, reason in rules:
        expr = (
            pl.when(condition).then(pl.lit(reason))
            if expr is None
            else expr.when(condition).then(pl.lit(reason))  # type: ignore[attr-defined]
        )
    assert expr is not None
    return expr.otherwise(pl.lit(None, dtype=pl.String()))  # type: ignore[attr-defined,no-any-return]


def split_storable(
    frame: pl.DataFrame, schema: dict[str, pl.DataType], source: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``frame`` → (the rows the store takes, in ``schema``; the others as rejects)."""
    if frame.height == 0:
        return _empty(schema), _empty(REJECT_SCHEMA)
    checked = frame.with_columns(_problem(frame).alias("_reason"))
    bad = checked.filter(pl.col("_reason").is_not_null())
    good = checked.filter(pl.col("_reason").is_null())
    kept = good.select(
        pl.col(c).cast(t) if c in good.columns else pl.lit(None, dtype=t).alias(c)
        for c, t in schema.items()
    )
    rejects = pl.DataFrame(
        {
            "source": [source] * bad.height,
            "reason": bad["_reason"].to_list(),
            "value": [
                orjson.dumps(row, default=str).decode()
                for row in bad.drop("_reason").iter_rows(named=True)
            ],
        },
        schema=REJECT_SCHEMA,
    )
    return kept, rejects


def decode_lines(
    values: list[tuple[str, bytes | None]], schema: dict[str, pl.DataType]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """JSON records (``(source, bytes)``, e.g. Kafka messages of the scores topic) →
    (a frame of ``schema``; the messages that are not such records, as rejects)."""
    rows: list[dict[str, object]] = []
    rejected: list[tuple[str, str, str]] = []
    for source, value in values:
        text = (value or b"").decode("utf-8", errors="replace")
        try:
            row = orjson.loads(value or b"")
        except orjson.JSONDecodeError:
            rejected.append((source, "not_json", text))
            continue
        if not isinstance(row, dict):
            rejected.append((source, "not_an_object", text))
            continue
        row["_source"] = source
        row["_raw"] = text
        rows.append(row)
    frame = _typed(rows, schema)
    # A record whose values do not have the types of the schema is a reject too.
    parsed = frame.filter(pl.col("_reason").is_null()).drop("_reason", "_source", "_raw")
    for row in frame.filter(pl.col("_reason").is_not_null()).iter_rows(named=True):
        rejected.append((row["_source"], row["_reason"], row["_raw"]))
    rejects = pl.DataFrame(
        {
            "source": [r[0] for r in rejected],
            "reason": [r[1] for r in rejected],
            "value": [r[2] for r in rejected],
        },
        schema=REJECT_SCHEMA,
    )
    return parsed, rejects


_TEXT: Final = pl.String()
#: How the project's records write times (polars' JSON: ISO-8601 with an offset; ``Z`` too).
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%S%.f%#z"


def _typed(rows: list[dict[str, object]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Rows → columns of ``schema``; a row whose value does not fit its column gets a
    ``_reason`` (``bad_<column>``) instead of failing the whole batch."""
    extra = {"_source": _TEXT, "_raw": _TEXT}
    if not rows:
        return pl.DataFrame(schema={**schema, **extra, "_reason": _TEXT})
    listed = {n: t for n, t in schema.items() if isinstance(t, pl.List)}
    scalar = [n for n in schema if n not in listed]
    text: dict[str, list[str | None]] = {n: [] for n in (*scalar, *extra)}
    lists: dict[str, list[object]] = {n: [] for n in listed}
    list_reason: list[str | None] = []
    for row in rows:
        for name in text:
            value = row.get(name)
            text[name].append(
                None
                if value is None
                else value
                if isinstance(value, str)
                else orjson.dumps(value).decode()
            )
        problem = None
        for name, dtype in listed.items():
            value, ok = _list_value(row.get(name), dtype)
            lists[name].append(value)
            if not ok and problem is None:
                problem = f"bad_{name}"
        list_reason.append(problem)
    raw = pl.DataFrame(text, schema=dict.fromkeys(text, _TEXT))
    out: list[pl.Expr] = []
    checks: list[tuple[pl.Expr, str]] = []
    for name in scalar:
        scalar_type = schema[name]
        column = pl.col(name)
        if isinstance(scalar_type, pl.Datetime):
            cast = column.str.to_datetime(
                format=_TIME_FORMAT, time_zone="UTC", time_unit="us", strict=False
            )
        elif scalar_type == _TEXT:
            cast = column
        else:
            cast = column.cast(scalar_type, strict=False)
        checks.append((cast.is_null() & column.is_not_null(), f"bad_{name}"))
        out.append(cast.alias(name))
    # One chain, first failing column wins (a nested when per column grows exponentially).
    chain: Any = pl
    for failed, label in checks:
        chain = chain.when(failed).then(pl.lit(label))
    reason: pl.Expr = (
        chain.otherwise(pl.lit(None, dtype=_TEXT)) if checks else pl.lit(None, dtype=_TEXT)
    )
    typed = raw.select(*out, "_source", "_raw", reason.alias("_reason"))
    typed = typed.with_columns(
        pl.Series(name, values, dtype=listed[name]) for name, values in lists.items()
    ).with_columns(pl.coalesce("_reason", pl.Series(list_reason, dtype=_TEXT)).alias("_reason"))
    return typed.select(*schema, *extra, "_reason")


def _list_value(value: object, dtype: pl.List) -> tuple[object, bool]:
    """A JSON list as the value of a list column (strings, or route points); ``ok`` is
    False when it is not one (the value is then null).

    A route point's event flag that is missing or null is no event (routes published
    before points carried flags stay readable); one that is not a JSON boolean makes the
    route a reject."""
    if value is None:
        return None, True
    if not isinstance(value, list):
        return None, False
    inner = dtype.inner
    if inner == _TEXT:
        return (value, True) if all(isinstance(v, str) for v in value) else (None, False)
    points: list[dict[str, object]] = []
    for point in value:
        try:
            assert isinstance(point, dict)
            ts = datetime.fromisoformat(str(point["ts"]).replace("Z", "+00:00"))
            flags = {name: point.get(name) for name in EVENT_COLUMNS}
            if not all(flag is None or isinstance(flag, bool) for flag in flags.values()):
                raise TypeError("an event flag is not a boolean")
            points.append(
                {
                    "ts": ts if ts.tzinfo else ts.replace(tzinfo=UTC),
                    "lat": float(point["lat"]),
                    "lon": float(point["lon"]),
                    **{name: flag is True for name, flag in flags.items()},
                }
            )
        except (AssertionError, KeyError, TypeError, ValueError):
            return None, False
    return points, True
