"""Fleet simulator: physically plausible 1 Hz pings, incident labels and drift knobs; device
noise profiles and small scenarios of known geometry for tests of the feature rules.

See ``docs/simulator.md`` for the physics and the label model.
"""

from driverscore.simulation.config import (
    DirtConfig,
    DriftConfig,
    SimulationConfig,
    vehicles_per_chunk_for,
)
from driverscore.simulation.gps import PHONE, TRACKER, GpsProfile
from driverscore.simulation.scenarios import constant_turn, hard_stop, straight_drive
from driverscore.simulation.simulator import Simulation, iter_simulation, simulate

__all__ = [
    "PHONE",
    "TRACKER",
    "DirtConfig",
    "DriftConfig",
    "GpsProfile",
    "Simulation",
    "SimulationConfig",
    "constant_turn",
    "hard_stop",
    "iter_simulation",
    "simulate",
    "straight_drive",
    "vehicles_per_chunk_for",
]
