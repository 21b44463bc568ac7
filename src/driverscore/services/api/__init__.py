"""The REST scoring service (FastAPI): build it with :func:`create_app`."""

from driverscore.services.api.app import create_app

__all__ = ["create_app"]
