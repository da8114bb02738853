"""Database URL handling shared by the store and the migrations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

from databases import DatabaseURL

DEFAULT_URL = "sqlite:///./turngate.db"

Dialect = Literal["postgresql", "sqlite"]


@dataclass(frozen=True, slots=True)
class _ParsedUrl:
    dialect: Dialect
    databases_url: str  # what `databases.Database` accepts
    sqlalchemy_url: str  # an async SQLAlchemy URL, for alembic


def _parse_url(url: str | None) -> _ParsedUrl:
    """Normalise the URL forms users type (``postgres://``, ``sqlite:///x``)."""
    raw = (url or DEFAULT_URL).strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {raw!r}")
    scheme = scheme.lower()
    if scheme in ("postgres", "postgresql", "postgresql+asyncpg"):
        return _ParsedUrl("postgresql", f"postgresql://{rest}", f"postgresql+asyncpg://{rest}")
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return _ParsedUrl("sqlite", f"sqlite://{rest}", f"sqlite+aiosqlite://{rest}")
    raise ValueError(
        f"unsupported database URL scheme {scheme!r}: use postgresql:// or sqlite:///path"
    )


def sqlite_path(url: str | None) -> str | None:
    """The file of a SQLite URL (``sqlite:///rel`` or ``sqlite:////abs``), else None."""
    parsed = _parse_url(url)
    if parsed.dialect != "sqlite":
        return None
    rest = parsed.databases_url.partition("://")[2]
    path = rest[1:] if rest.startswith("/") else rest
    path = path.partition("?")[0]
    return path if path and path != ":memory:" else None


def sqlite_database(url: str) -> str:
    """What a SQLite URL opens, as ``databases``' SQLite backend passes it to ``sqlite3``:
    the path (or ``:memory:``) with the URL's query options appended."""
    parsed = DatabaseURL(_parse_url(url).databases_url)
    database = parsed.database
    if parsed.options:
        database += "?" + urlencode(parsed.options)
    return database


def display_url(url: str | None) -> str:
    """The database as a user should read it: a SQLite file as its absolute path,
    a PostgreSQL URL without its password."""
    import os
    from urllib.parse import urlsplit, urlunsplit

    path = sqlite_path(url)
    if path is not None:
        return f"SQLite file {os.path.abspath(path)}"
    parsed = _parse_url(url)
    if parsed.dialect == "sqlite":
        return "SQLite in memory"
    parts = urlsplit(parsed.databases_url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = f"{parts.username}{':***' if parts.password else ''}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
