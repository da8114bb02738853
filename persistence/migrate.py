"""Schema migrations (alembic, configured in code) and the schema check."""

from __future__ import annotations

import functools
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from persistence._errors import check_sqlite_location, unavailable
from persistence._urls import _parse_url, display_url

logger = logging.getLogger("turngate.persistence")

_MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

SchemaStatus = Literal["current", "outdated", "newer", "empty"]


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS_DIR))
    return config


def _head() -> str | None:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


@functools.cache
def _shipped_head() -> str | None:
    # The revisions shipped with this code do not change while it runs; reading
    # them from disk on every readiness probe would.
    return _head()


def _upgrade(connection: Connection) -> None:
    from alembic import command

    config = _alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


@dataclass(frozen=True, slots=True)
class Migration:
    """What ``migrate`` did: the revision before (None: empty) and after."""

    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


async def migrate(url: str) -> Migration:
    """Bring the schema of the database at ``url`` to the newest revision.

    On SQLite it also switches the file to WAL journaling, which persists in the
    file, so concurrent readers and writers of the embedded default work. Logs
    ``schema migrated`` (naming the database) only when the revision changed.
    Raises ``DatabaseUnavailable`` with a one-line cause if the database cannot
    be reached or opened.
    """
    parsed = _parse_url(url)
    if parsed.dialect == "sqlite":
        check_sqlite_location(url)
    engine = create_async_engine(parsed.sqlalchemy_url)
    try:
        async with engine.begin() as conn:
            if parsed.dialect == "sqlite":
                await conn.execute(text("PRAGMA journal_mode=WAL"))
            before = await conn.run_sync(_current_revision)
            await conn.run_sync(_upgrade)
            after = await conn.run_sync(_current_revision)
    except (OSError, DBAPIError, sqlite3.Error) as exc:
        raise unavailable(exc, url, "cannot migrate") from exc
    finally:
        await engine.dispose()
    result = Migration(before, after)
    if result.changed:
        logger.info("schema migrated to %s (%s, was %s)", after, display_url(url),
                    before or "empty",
                    extra={"event": "db_migrate", "revision": after, "previous": before,
                           "database": display_url(url)})
    else:
        logger.debug("schema is current (%s, %s)", after, display_url(url),
                     extra={"event": "db_schema_current", "revision": after})
    return result


async def schema_status(url: str) -> SchemaStatus:
    """Tell whether the database at ``url`` is at the newest revision.

    ``"empty"``: no turngate schema at all; ``"outdated"``: an older revision (run
    ``turngate migrate``); ``"current"``: ready; ``"newer"``: a revision this code
    does not know, i.e. a newer release already migrated (during a rolling
    deploy the old replicas keep serving). Raises ``DatabaseUnavailable`` if the
    database cannot be reached.
    """
    parsed = _parse_url(url)
    if parsed.dialect == "sqlite":
        check_sqlite_location(url)
    engine = create_async_engine(parsed.sqlalchemy_url)
    try:
        async with engine.connect() as conn:
            current = await conn.run_sync(_current_revision)
    except (OSError, DBAPIError, sqlite3.Error) as exc:
        raise unavailable(exc, url, "cannot read the schema") from exc
    finally:
        await engine.dispose()
    return classify_revision(current)


def classify_revision(current: str | None) -> SchemaStatus:
    """The ``SchemaStatus`` of a database whose alembic revision is ``current``."""
    if current is None:
        return "empty"
    if current == _shipped_head():
        return "current"
    return "outdated" if _is_known(current) else "newer"


def _is_known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(revision) is not None
    except CommandError:  # alembic's answer for a revision it has never heard of
        return False
