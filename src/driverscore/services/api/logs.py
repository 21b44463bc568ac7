"""Structured JSON logs: one object per line, no secrets (tokens never reach a record)."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Final, TextIO

__all__ = ["BufferedLineHandler", "JsonFormatter", "configure_json_logging", "flush_logs"]

# Attributes every LogRecord has; anything else was passed as ``extra=`` and is logged.
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)
_REDACTED: Final = frozenset({"authorization", "token", "tokens", "password", "secret"})
#: ``json.dumps(entry, default=str)`` without building an encoder per line.
_ENCODER: Final = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            entry[key] = "[redacted]" if key.lower() in _REDACTED else value
        if record.exc_info and record.exc_info[0] is not None:
            # The traceback goes to the log (for the operator), never into a response.
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


class BufferedLineHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes its lines in batches instead of one write per line.

    A busy service logs a line per request; one ``write`` system call per line was a
    measurable share of a request's cost. Lines are written when ``max_lines`` are
    waiting, when the oldest has waited ``max_delay_s``, at once for warnings and errors,
    and on :meth:`flush` (the service's background loop calls :func:`flush_logs` every
    second; ``logging.shutdown`` at exit). A process killed outright loses at most the
    lines of the last ``max_delay_s``.
    """

    def __init__(
        self, stream: TextIO | None = None, max_lines: int = 256, max_delay_s: float = 0.5
    ) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.max_lines = max_lines
        self.max_delay_s = max_delay_s
        self._lines: list[str] = []
        self._oldest = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (``Handler.handle``).
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        now = time.monotonic()
        if not self._lines:
            self._oldest = now
        self._lines.append(line)
        if (
            record.levelno >= logging.WARNING
            or len(self._lines) >= self.max_lines
            or now - self._oldest >= self.max_delay_s
        ):
            self._write()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
        finally:
            self.release()

    def _write(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            # As ``StreamHandler.emit`` does: report on stderr, never break the caller.
            self.handleError(logging.makeLogRecord({"msg": f"{text.count(chr(10))} log lines"}))


def flush_logs() -> None:
    """Write out what the root logger's handlers hold (batched request lines)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure_json_logging(level: int = logging.INFO) -> None:
    """Every log record to stderr as JSON (``driverscore serve`` and ``driverscore stream``)."""
    handler = BufferedLineHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The service logs each request itself, without headers.
    logging.getLogger("uvicorn.access").disabled = True
