"""`driverscore scores`: the score store's query set from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import polars as pl
from rich.console import Console
from rich.table import Table

from driverscore.adapters.score_store import ScoreReader
from driverscore.adapters.score_store.duckdb_store import open_score_store
from driverscore.adapters.score_store.queries import LEVELS, QUERIES, QueryParams
from driverscore.errors import ConfigError, InputDataError
from driverscore.settings import Settings

__all__ = ["StoreAnswer", "open_reader", "print_answer", "run_store_query"]

Engine = Literal["duckdb", "druid"]


@dataclass(frozen=True)
class StoreAnswer:
    name: str
    params: QueryParams
    engine: str
    frame: pl.DataFrame


def open_reader(settings: Settings, engine: Engine) -> ScoreReader:
    """The engine's reader: the home's DuckDB file, or the configured/local Druid."""
    if engine == "druid":
        from driverscore.adapters.score_store.druid import open_druid_store

        return open_druid_store(settings)
    return open_score_store(settings)


def run_store_query(
    settings: Settings,
    name: str,
    *,
    engine: Engine = "duckdb",
    days: float = 30.0,
    start: datetime | None = None,
    end: datetime | None = None,
    level: str = "fleet",
    limit: int = 20,
    min_trips: int = 1,
    driver: str | None = None,
    vehicle: str | None = None,
) -> StoreAnswer:
    """Run query ``name`` over ``start < trip end <= end`` (default: the ``days`` up to the
    newest trip end in the store)."""
    if name not in QUERIES:
        raise ConfigError(f"no query '{name}': use one of {', '.join(QUERIES)}")
    if level not in LEVELS:
        raise ConfigError(f"--by {level!r}: use one of {', '.join(LEVELS)}")
    if driver is not None and vehicle is not None:
        raise ConfigError("give --driver or --vehicle, not both")
    if QUERIES[name].params and driver is None and vehicle is None:
        raise ConfigError(f"{name} needs --driver ID or --vehicle ID")
    reader = open_reader(settings, engine)
    if end is None:
        newest = reader.newest_trip_end()
        if newest is None:
            raise InputDataError(f"the score store ({engine}) holds no trips yet")
        end = newest
    assert end is not None
    params = QueryParams(
        start=start or end - timedelta(days=days),
        end=end,
        level=level,  # type: ignore[arg-type]
        limit=limit,
        min_trips=min_trips,
        entity="vehicle" if vehicle is not None else "driver",
        entity_id=vehicle if vehicle is not None else driver,
    )
    return StoreAnswer(name, params, engine, reader.query(name, params))


def print_answer(console: Console, answer: StoreAnswer, output: str) -> None:
    """As a table (default), CSV or JSON lines on stdout."""
    frame = answer.frame
    if output == "csv":
        lists = [n for n, t in frame.schema.items() if isinstance(t, pl.List)]
        frame = frame.with_columns(pl.col(n).list.join("; ") for n in lists)
        print(frame.write_csv(), end="")
        return
    if output == "json":
        print(frame.write_ndjson(), end="")
        return
    p = answer.params
    title = (
        f"{answer.name} ({answer.engine}): trips ending {p.start:%Y-%m-%d %H:%M} → "
        f"{p.end:%Y-%m-%d %H:%M} UTC"
    )
    table = Table(title=title, title_justify="left")
    for column, dtype in frame.schema.items():
        table.add_column(column, justify="right" if dtype.is_numeric() else "left")
    for row in frame.iter_rows():
        table.add_row(*(_cell(v) for v in row))
    console.print(table)
    if frame.height == 0:
        console.print("no trips in the period")


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, list):
        return "\n".join(str(v) for v in value) or "—"
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    return str(value)
