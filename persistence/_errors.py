"""One-line explanations of why a database cannot be used, for start-up errors.

``explain(exc, url)`` walks the exception chain (SQLAlchemy wraps the driver's
error, which may wrap an ``OSError``) and names the cause and what to do:
unreachable host, refused role or password, missing database, a SQLite file
that cannot be opened. ``None`` when the cause is none of these.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from persistence._urls import _parse_url, display_url, sqlite_path
from turngate.exceptions import DatabaseUnavailable


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError
        todo += [orig if isinstance(orig, BaseException) else None,
                 current.__cause__, current.__context__]


def _host_port(url: str) -> str:
    parts = urlsplit(_parse_url(url).databases_url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


def explain(exc: BaseException, url: str) -> str | None:
    """Why the database at ``url`` cannot be used, and what to do; or None."""
    where = display_url(url)
    for cause in _chain(exc):
        sqlstate = getattr(cause, "sqlstate", None)
        if sqlstate in ("28000", "28P01"):
            user = urlsplit(_parse_url(url).databases_url).username or "(none)"
            return (f"PostgreSQL at {_host_port(url)} refused user {user!r} ({cause}): "
                    "create the role or fix the user/password in DATABASE_URL")
        if sqlstate == "3D000":
            name = urlsplit(_parse_url(url).databases_url).path.lstrip("/")
            return (f"database {name!r} does not exist on PostgreSQL at {_host_port(url)}: "
                    f"create it (createdb {name}) or fix the database name in DATABASE_URL")
        if isinstance(cause, socket.gaierror):
            host = urlsplit(_parse_url(url).databases_url).hostname
            return (f"cannot resolve the database host {host!r} ({cause.strerror}): "
                    "fix the host in DATABASE_URL")
        if isinstance(cause, ConnectionRefusedError) or (
            isinstance(cause, OSError) and cause.errno in (111, 113, 101, 99)
        ):
            return (f"cannot reach PostgreSQL at {_host_port(url)} "
                    f"({cause.strerror or 'connection refused'}): start it, or fix the "
                    "host/port in DATABASE_URL")
        if isinstance(cause, TimeoutError):
            return (f"PostgreSQL at {_host_port(url)} did not answer in time: check that it "
                    "runs and that the host/port in DATABASE_URL are right")
        if isinstance(cause, sqlite3.OperationalError) and "unable to open" in str(cause):
            return (f"cannot open the {where} ({cause}): check that its directory exists "
                    "and is writable, or set DATABASE_URL")
    return None


def check_sqlite_location(url: str) -> None:
    """Refuse a SQLite file that cannot be created or opened, before any driver tries.

    (aiosqlite's worker thread posts to a closed event loop when the open fails,
    which prints a spurious "Event loop is closed" after the real error.)
    """
    path = sqlite_path(url)
    if path is None:
        return
    file = Path(os.path.abspath(path))
    if file.is_dir():
        raise DatabaseUnavailable(
            f"cannot open the SQLite file {file}: it is a directory; set DATABASE_URL to a file"
        )
    parent = file.parent
    if not parent.is_dir():
        raise DatabaseUnavailable(
            f"cannot create the SQLite file {file}: {parent} is not a directory; "
            "create it or set DATABASE_URL to a writable path"
        )
    if not file.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise DatabaseUnavailable(
            f"cannot create the SQLite file {file}: directory {parent} is not writable; "
            "set DATABASE_URL to a writable path"
        )


def unavailable(exc: BaseException, url: str, doing: str) -> DatabaseUnavailable:
    """``exc`` as a ``DatabaseUnavailable`` whose message explains it in one line."""
    reason = explain(exc, url)
    if reason is None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{display_url(url)}: {type(exc).__name__}: {first}"
    return DatabaseUnavailable(f"{doing}: {reason}")


__all__ = ["check_sqlite_location", "explain", "unavailable"]
