"""driverscore: vehicle telemetry to a Driver Score, with the MLOps around it."""

__version__ = "0.1.0"
