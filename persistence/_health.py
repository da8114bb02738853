"""How the store's real statements have been faring, and a bounded readiness probe.

``SELECT 1`` answering says little: with a table locked, a pool held by stuck
statements or a SQLite write lock taken by another process, ``SELECT 1`` (or
a read) still succeeds while every write times out. So every operation of the
store reports its outcome to the store's ``DbHealth``, and readiness asks it
whether statements failed recently, besides running its own short probe
(``persistence._probe``).
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from dataclasses import dataclass

# Enough to count a burst of failures in a readiness window; older ones are dropped.
_KEPT_FAILURES = 1000


def failure_reason(exc: BaseException) -> str | None:
    """Why a statement failed, in readiness terms; None if the request's data was at fault.

    ``pool_exhausted`` (no pooled connection free in time; SQLite: the write queue
    full), ``timeout`` (SQLite: also a write the writer did not take in time),
    ``locked`` (SQLite's write lock), ``unreachable`` or ``error``. A constraint or
    data error (SQLSTATE classes 22 and 23, sqlite3's IntegrityError/DataError) says
    nothing about the database's health.
    """
    message = str(exc)
    if message.startswith(("no pooled database connection", "the SQLite write queue is full")):
        return "pool_exhausted"
    if message.startswith("the SQLite writer did not take this write"):
        return "timeout"
    if message == "the store is not connected":
        return "unreachable"
    cause = exc.__cause__
    if isinstance(cause, TimeoutError):
        return "timeout"
    if isinstance(cause, OSError | ConnectionError):
        return "unreachable"
    sqlstate = getattr(cause, "sqlstate", None)
    if isinstance(sqlstate, str):
        if sqlstate[:2] in ("22", "23"):
            return None
        if sqlstate in ("57014", "55P03"):  # statement timeout, lock not available
            return "timeout"
        if sqlstate[:2] in ("08", "57"):  # connection exception, admin shutdown
            return "unreachable"
        return "error"
    if isinstance(cause, sqlite3.IntegrityError | sqlite3.DataError):
        return None
    if isinstance(cause, sqlite3.OperationalError) and (
        "locked" in str(cause) or "busy" in str(cause)
    ):
        return "locked"
    if cause is not None and "Connection" in type(cause).__name__:
        return "unreachable"  # asyncpg's ConnectionDoesNotExistError and kin
    return "error"


@dataclass(frozen=True, slots=True)
class RecentFailures:
    """Failures within a window: how many, the latest's reason and age in seconds."""

    count: int
    reason: str | None
    seconds_ago: float | None


class DbHealth:
    """The outcomes of one store's statements (one per app: the store is the app's)."""

    def __init__(self) -> None:
        self._failures: deque[tuple[float, str]] = deque(maxlen=_KEPT_FAILURES)
        self.last_ok: float | None = None

    def succeeded(self) -> None:
        self.last_ok = time.monotonic()

    def failed(self, exc: BaseException) -> None:
        reason = failure_reason(exc)
        if reason is not None:
            self._failures.append((time.monotonic(), reason))

    def recent(self, window: float) -> RecentFailures:
        """The failures of the last ``window`` seconds."""
        now = time.monotonic()
        count = 0
        for at, _ in reversed(self._failures):
            if now - at > window:
                break
            count += 1
        if not count:
            return RecentFailures(0, None, None)
        at, reason = self._failures[-1]
        return RecentFailures(count, reason, now - at)


__all__ = ["DbHealth", "RecentFailures", "failure_reason"]
