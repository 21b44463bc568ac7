"""Fleet simulator: physically plausible 1 Hz pings, incident labels and drift knobs.

See ``docs/simulator.md`` for the physics and the label model.
"""

from driverscore.simulation.config import (
    DirtConfig,
    DriftConfig,
    SimulationConfig,
    vehicles_per_chunk_for,
)
from driverscore.simulation.simulator import Simulation, iter_simulation, simulate

__all__ = [
    "DirtConfig",
    "DriftConfig",
    "Simulation",
    "SimulationConfig",
    "iter_simulation",
    "simulate",
    "vehicles_per_chunk_for",
]
