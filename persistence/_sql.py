"""Statements compiled once into the drivers' native form, run on the raw connection.

``databases`` compiles every raw SQL string through SQLAlchemy's ``TextClause`` on
every call (bind-parameter regex, the SQL compiler, the ``%`` mapping): about
0.8 ms of CPU per statement for our larger CTEs, measured by cProfile of the
gateway (docs/DECISIONS.md, "Persistence performance"). Our statements are fixed
strings with ``:name`` parameters, so each is compiled once (``statement``, cached
by its text) to asyncpg's ``$1..$n`` or SQLite's ``?`` with a fixed parameter
order, and ``Conn`` runs it on the connection ``databases`` acquired from its pool
(``Connection.raw_connection``), or on the SQLite writer's own connection
(``persistence._sqlite_writer``). ``databases`` owns the pool and its connections;
nothing outside this package sees the difference.

Values go to the driver as ``databases`` would pass them (a ``TextClause`` without
typed binds has no bind processors), and rows come back as the drivers make them
(asyncpg ``Record``, ``sqlite3.Row``: both index by name and position; asyncpg
hands json/jsonb back as ``str``).
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

# A quoted string or a comment (skipped: ``'HH24:MI'`` is not a parameter), or a
# ``:name`` parameter that is not the second colon of a ``::type`` cast.
_TOKEN = re.compile(r"'(?:[^']|'')*'|--[^\n]*|(?<![:\w]):([A-Za-z_]\w*)")

Row = Any  # asyncpg.Record or sqlite3.Row


class Statement:
    """One SQL text with ``:name`` parameters, in both drivers' native forms.

    PostgreSQL: ``$n`` numbered by first appearance (a repeated name reuses its
    number). SQLite: one ``?`` per occurrence, so ``sqlite_names`` may repeat.
    """

    __slots__ = ("pg_names", "pg_sql", "sqlite_names", "sqlite_sql", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        pg_names: list[str] = []
        sqlite_names: list[str] = []

        def pg(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return match.group(0)
            if name not in pg_names:
                pg_names.append(name)
            return f"${pg_names.index(name) + 1}"

        def lite(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return match.group(0)
            sqlite_names.append(name)
            return "?"

        self.pg_sql = _TOKEN.sub(pg, text)
        self.pg_names = tuple(pg_names)
        self.sqlite_sql = _TOKEN.sub(lite, text)
        self.sqlite_names = tuple(sqlite_names)


# A pure function of the SQL text: the cache holds only strings derived from the
# project's own statement texts, nothing of any app, connection or database, so one
# cache per process is correct for every store in it. 512 is well above the number
# of distinct texts (fixed statements plus a few dynamic WHERE variants).
@functools.lru_cache(maxsize=512)
def statement(text: str) -> Statement:
    """The compiled form of ``text``, compiled on first use and cached."""
    return Statement(text)


def _args(names: Sequence[str], values: Mapping[str, Any] | None) -> list[Any]:
    if not names:
        return []
    if values is None:
        raise KeyError(f"missing bind parameter {names[0]!r}")
    return [values[name] for name in names]  # a missing value is a KeyError, not NULL


class Conn:
    """The store's view of one acquired connection: four calls, native statements."""

    __slots__ = ("is_pg", "raw")

    def __init__(self, raw: Any, *, is_pg: bool) -> None:
        self.raw = raw  # asyncpg (pool proxy) Connection, or aiosqlite.Connection
        self.is_pg = is_pg

    async def fetch_all(self, sql: str, values: Mapping[str, Any] | None = None) -> list[Row]:
        st = statement(sql)
        if self.is_pg:
            return list(await self.raw.fetch(st.pg_sql, *_args(st.pg_names, values)))
        rows = await self.raw.execute_fetchall(st.sqlite_sql, _args(st.sqlite_names, values))
        return list(rows)

    async def fetch_one(self, sql: str, values: Mapping[str, Any] | None = None) -> Row | None:
        st = statement(sql)
        if self.is_pg:
            return await self.raw.fetchrow(st.pg_sql, *_args(st.pg_names, values))
        # execute_fetchall is one hop to aiosqlite's thread, and it steps a writing
        # statement (RETURNING) to completion; our single-row statements stay small.
        rows = await self.raw.execute_fetchall(st.sqlite_sql, _args(st.sqlite_names, values))
        return rows[0] if rows else None

    async def fetch_val(self, sql: str, values: Mapping[str, Any] | None = None) -> Any:
        row = await self.fetch_one(sql, values)
        return None if row is None else row[0]

    async def execute(self, sql: str, values: Mapping[str, Any] | None = None) -> None:
        st = statement(sql)
        if self.is_pg:
            await self.raw.execute(st.pg_sql, *_args(st.pg_names, values))
        else:
            await self.raw.execute_fetchall(st.sqlite_sql, _args(st.sqlite_names, values))


# Rows of our SQLite connections index by name (``row["id"]``) like asyncpg's.
SQLITE_ROW_FACTORY = sqlite3.Row
