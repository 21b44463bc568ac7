"""The built-in web dashboard: fleet overview, live high-risk alerts, driver and vehicle
pages with routes, and the model page, served from the score store and the registry.

:func:`create_dashboard` builds it (nothing at import); ``driverscore serve`` mounts it
under ``/dashboard``, ``driverscore dashboard`` serves it alone. See docs/dashboard.md.
"""

from __future__ import annotations

from driverscore.services.dashboard.app import create_dashboard
from driverscore.services.dashboard.sources import DashboardSources, Period, PeriodError

__all__ = ["DashboardSources", "Period", "PeriodError", "create_dashboard"]
