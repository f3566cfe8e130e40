"""The server's log lines: one JSON object per line, each carrying the id of the call it is
about (the same id goes back to the client as `x-request-id` trailing metadata, so an
operator can find a client's complaint in the log).

The request id lives in a context variable the call interceptor sets for the call's thread;
everything logged while the call runs (handlers, refusals, the sandbox) carries it.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

REQUEST_ID: ContextVar[str | None] = ContextVar("freemark_request_id", default=None)
REQUEST_ID_KEY = "x-request-id"
# Fields a log call may add with `extra=`; anything else stays out of the line.
FIELDS = ("method", "code", "principal", "peer", "duration_ms", "reason")


def new_request_id() -> str:
    """A fresh, unguessable call id (it says nothing about the call)."""
    return "req_" + secrets.token_hex(8)


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "request_id", ...}`, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        for name in FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The same records for a person at a terminal: time, level, request id, message."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = REQUEST_ID.get()
        prefix = f"[{request_id}] " if request_id else ""
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="seconds")
        text = f"{stamp} {record.levelname} {prefix}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    """Send the process's log to stderr in `fmt` ("json" or "text")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
