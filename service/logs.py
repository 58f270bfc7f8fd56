"""Logging set-up for `ratebench serve` and `ratebench scheduler`: plain text or JSON lines.

`RATEBENCH_LOG_FORMAT=json` writes one JSON object per line (`timestamp`, `level`, `logger`,
`message`, and `study_id` / `trial_id` when known, plus any `extra=` fields), for log
collectors that index fields rather than grep text. The ids come from `log_context`, which the
scheduler enters while it drives a study (every line logged from that thread carries the study's
id, the sweep's included), or from `extra={"study_id": ..., "trial_id": ...}` on one call.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, Literal

__all__ = ["LogFormat", "configure_logging", "log_context"]

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("study_id", "trial_id")

_context: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"ratebench_{name}", default=None) for name in CONTEXT_FIELDS
}
# A LogRecord's own attributes; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's coloured copy of the message
}


@contextmanager
def log_context(*, study_id: str | None = None, trial_id: str | None = None) -> Iterator[None]:
    """Tag every record logged inside the block (in this thread or task, and in threads started
    with a copy of its context) with these ids."""
    tokens = [
        (_context[name], _context[name].set(value))
        for name, value in (("study_id", study_id), ("trial_id", trial_id))
        if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the ids of the current `log_context` onto each record (an `extra=` id wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _context.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; fields that are not JSON become their `str`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: LogFormat = "text", stream: IO[str] | None = None) -> None:
    """Send the root logger's records at `level` and above to `stream` (stderr) as `fmt`,
    replacing any handlers it had."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
