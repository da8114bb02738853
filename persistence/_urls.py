"""Database URL handling shared by the store and the migrations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
