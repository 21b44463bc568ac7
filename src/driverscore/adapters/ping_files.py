"""Ping files (any layout the batch side reads) as one canonical ping frame, for replays."""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from driverscore.adapters.readers import list_sources, read_table
from driverscore.domain.mapping import ColumnMapping, apply_mapping
from driverscore.errors import InputDataError

__all__ = ["load_canonical_pings"]


def load_canonical_pings(
    uri: str, mapping: ColumnMapping | None, storage_options: Mapping[str, object]
) -> tuple[pl.DataFrame, int]:
    """Canonical pings of every file at ``uri`` (batch readers and mapping), rejected rows."""
    frames: list[pl.DataFrame] = []
    rejected = 0
    for source in list_sources(uri, storage_options):
        raw = read_table(
            source,
            mapping.format if mapping else None,
            storage_options,
            delimiter=mapping.delimiter if mapping else ",",
        )
        mapped = apply_mapping(raw, mapping, source)
        rejected += mapped.rejected.height
        frames.append(mapped.pings.drop("source"))
    if not frames:
        raise InputDataError(f"{uri}: no pings")
    return pl.concat(frames, how="vertical"), rejected
