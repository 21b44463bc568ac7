"""The score store: trip score records, alerts and routes kept for the dashboards.

One interface, two engines. :class:`ScoreWriter` takes batches (the embedded DuckDB file;
Druid is written by its own Kafka ingestion), :class:`ScoreReader` answers the query set
(``queries.py``) on either engine: ``DuckDBScoreStore`` (``duckdb_store.py``) and
``DruidScoreStore`` (``druid.py``). See docs/store.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import polars as pl

from driverscore.adapters.score_store.queries import QUERIES, QueryParams
from driverscore.adapters.score_store.records import ScoreBatch

__all__ = ["QUERIES", "QueryParams", "ScoreBatch", "ScoreReader", "ScoreWriter", "WriteResult"]


class WriteResult(Protocol):
    """What a write took: new or newer records, alerts and routes; rejected input."""

    @property
    def scores(self) -> int: ...
    @property
    def alerts(self) -> int: ...
    @property
    def routes(self) -> int: ...
    @property
    def rejects(self) -> int: ...


class ScoreWriter(Protocol):
    """Stores batches of score records, idempotently on (vehicle, trip, model version)."""

    def write(self, batch: ScoreBatch) -> WriteResult: ...


class ScoreReader(Protocol):
    """Answers the query set over a period; the same question gives the same frame on
    every engine."""

    def query(self, name: str, params: QueryParams) -> pl.DataFrame: ...

    def query_many(self, asks: Sequence[tuple[str, QueryParams]]) -> list[pl.DataFrame]:
        """Several queries, in order (DuckDB: on one opening of the file)."""
        ...

    def newest_trip_end(self) -> datetime | None:
        """The latest trip end stored (the default end of a period), ``None`` when empty."""
        ...
