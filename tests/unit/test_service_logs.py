"""The service's JSON log lines and the handler that writes them in batches."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime

from driverscore.services.api.logs import BufferedLineHandler, JsonFormatter


def _record(level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("driverscore.test")
    return logger.makeRecord(logger.name, level, __file__, 1, "request", (), None, extra=extra)


def test_json_line_has_the_fields_extras_and_no_secrets() -> None:
    when = datetime(2026, 1, 2, tzinfo=UTC)
    line = JsonFormatter().format(_record(route="/v1/score", status=200, token="x", when=when))
    entry = json.loads(line)
    assert list(entry)[:4] == ["ts", "level", "logger", "message"]
    assert entry["level"] == "info" and entry["message"] == "request"
    assert entry["route"] == "/v1/score" and entry["status"] == 200
    assert entry["token"] == "[redacted]"
    assert entry["when"] == str(when)  # non-JSON values as text


def test_lines_are_written_in_batches_in_order() -> None:
    stream = io.StringIO()
    handler = BufferedLineHandler(stream, max_lines=3, max_delay_s=60)
    handler.setFormatter(logging.Formatter("%(message)s %(n)s"))
    for n in range(2):
        handler.handle(_record(n=n))
    assert stream.getvalue() == ""
    handler.handle(_record(n=2))
    assert stream.getvalue() == "request 0\nrequest 1\nrequest 2\n"
    handler.handle(_record(n=3))
    handler.flush()
    assert stream.getvalue().endswith("request 2\nrequest 3\n")


def test_warnings_and_old_lines_are_written_at_once() -> None:
    stream = io.StringIO()
    handler = BufferedLineHandler(stream, max_lines=100, max_delay_s=60)
    handler.setFormatter(logging.Formatter("%(levelname)s"))
    handler.handle(_record())
    handler.handle(_record(logging.ERROR))
    assert stream.getvalue() == "INFO\nERROR\n"
    prompt = BufferedLineHandler(io.StringIO(), max_lines=100, max_delay_s=0.0)
    prompt.handle(_record())
    assert prompt.stream.getvalue().count("\n") == 1
