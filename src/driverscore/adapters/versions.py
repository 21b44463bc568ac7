"""What every source of model versions shares (the MLflow registry, an exported model
directory), in a module that imports no MLflow: a service reading a model directory starts
without it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["CHALLENGER", "CHAMPION", "VersionSummary"]

CHAMPION: Final = "champion"
CHALLENGER: Final = "challenger"


@dataclass(frozen=True)
class VersionSummary:
    """One registered version as listed by `driverscore models`."""

    version: str
    aliases: tuple[str, ...]
    gate_status: str
    code_version: str
    created_at: str
    metrics: dict[str, float]
