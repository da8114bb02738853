"""Log lines: readable text by default, one JSON object per line when configured.

Structured fields travel in ``extra={...}``; the JSON formatter writes them as
keys. Secrets never reach a log line: the persistence and adapter layers log
ids, outcomes and durations, never keys, bodies or (unless asked) content.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["error_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str, ensure_ascii=False)


# Libraries whose debug lines carry request data: `databases` logs every query with its
# arguments (message content, key hashes), httpx/httpcore every upstream request. Their
# debug output never reaches our log, whatever TURNGATE_LOG_LEVEL says; content is logged
# only by turngate itself, at debug level, when TURNGATE_LOG_CONTENT is true.
THIRD_PARTY_LEVELS = {
    "databases": logging.INFO,
    "aiosqlite": logging.INFO,
    "asyncpg": logging.INFO,
    "sqlalchemy": logging.WARNING,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "asyncio": logging.INFO,
    "alembic": logging.WARNING,  # "Context impl ..." on every migrate and schema check
}


def quiet_third_party() -> None:
    """Hold the libraries above at their floor levels."""
    for name, floor in THIRD_PARTY_LEVELS.items():
        logging.getLogger(name).setLevel(floor)


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Send turngate's and uvicorn's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    quiet_third_party()
    # Access logs repeat every request; keep them at warning unless debugging.
    if level != "debug":
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


__all__ = ["THIRD_PARTY_LEVELS", "JsonFormatter", "configure_logging", "quiet_third_party"]
