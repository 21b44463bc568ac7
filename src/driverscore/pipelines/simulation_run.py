"""Write a simulated fleet to a folder or bucket: pings in parts, labels and truth beside them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from driverscore.adapters.files import write_table
from driverscore.simulation import SimulationConfig, iter_simulation


@dataclass(frozen=True)
class SimulationOutput:
    """Where a simulation went and how big it is."""

    pings_uri: str
    incidents_uri: str
    drivers_uri: str
    trips_uri: str
    pings: int
    trips: int
    incidents: int
    fresh_pings_uri: str | None = None
    fresh_pings: int = 0


def write_simulation(
    config: SimulationConfig,
    out: str,
    storage_options: Mapping[str, object],
    *,
    fresh_from: datetime | None = None,
    progress: Callable[[str], None] | None = None,
) -> SimulationOutput:
    """Simulate chunk by chunk (bounded memory) and write each chunk as a Parquet part.

    With ``fresh_from``, pings at or after that time go to ``<out>/fresh/`` instead: the
    demo trains on the history and scores the fresh day as new data.
    """
    out = out.rstrip("/")
    pings = trips = 0
    fresh = 0
    incidents: list[pl.DataFrame] = []
    drivers: list[pl.DataFrame] = []
    truth: list[pl.DataFrame] = []
    for index, chunk in enumerate(iter_simulation(config)):
        if progress:
            progress(f"simulate vehicles: chunk {index + 1}")
        history = chunk.pings
        if fresh_from is not None:
            is_fresh = pl.col("ts") >= fresh_from
            fresh_part = history.filter(is_fresh.fill_null(False))
            history = history.filter(~is_fresh.fill_null(False))
            if fresh_part.height:
                write_table(fresh_part, f"{out}/fresh/part-{index:05d}.parquet", storage_options)
                fresh += fresh_part.height
        write_table(history, f"{out}/pings/part-{index:05d}.parquet", storage_options)
        pings += history.height
        trips += chunk.trips.height
        incidents.append(chunk.incidents)
        drivers.append(chunk.drivers)
        truth.append(chunk.trips)
    incidents_uri = write_table(pl.concat(incidents), f"{out}/incidents.parquet", storage_options)
    drivers_uri = write_table(pl.concat(drivers), f"{out}/drivers.parquet", storage_options)
    trips_uri = write_table(pl.concat(truth), f"{out}/trips_truth.parquet", storage_options)
    return SimulationOutput(
        pings_uri=f"{out}/pings",
        incidents_uri=incidents_uri,
        drivers_uri=drivers_uri,
        trips_uri=trips_uri,
        pings=pings,
        trips=trips,
        incidents=sum(frame.height for frame in incidents),
        fresh_pings_uri=f"{out}/fresh" if fresh_from is not None else None,
        fresh_pings=fresh,
    )
