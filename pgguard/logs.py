"""pgguard's log output: ``[log] format = "text" | "json"`` and ``[log] level``.

Owns: `setup` (the root handler on stderr) and `JsonFormatter` (one JSON object per line).

Invariants: a log record carries names, ids, codes and fingerprints, never a statement's text or
a value (reviewers see code, never data; the logs are read by even more people). Structured
fields travel in ``extra=`` and become JSON keys; the text format shows the message alone.
"""

from __future__ import annotations

import datetime
import logging
import sys
from typing import Any

import orjson

# LogRecord attributes that are not structured fields of ours.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup(level: str, fmt: str = "text") -> None:
    """Replace the root logger's handlers with one on stderr in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    logging.getLogger("pgguard").setLevel(getattr(logging, level))
