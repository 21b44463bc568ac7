"""Control of the local Druid of a home (``druid.sh``) and where commands find Druid."""

from __future__ import annotations

from pathlib import Path

from driverscore.settings import Settings

__all__ = ["druid_state_dir", "druid_url"]

#: The router's port when no local Druid recorded one (Druid's own default).
DEFAULT_URL = "http://127.0.0.1:8888"


def druid_state_dir(home: Path) -> Path:
    """Where ``driverscore druid up`` keeps the local Druid of a home."""
    return (home / "druid").resolve()


def druid_url(settings: Settings) -> str:
    """The SQL endpoint's base URL: the one the local Druid recorded, else Druid's default."""
    try:
        recorded = (druid_state_dir(settings.home) / "url").read_text(encoding="utf-8").strip()
    except OSError:
        recorded = ""
    return recorded or DEFAULT_URL
