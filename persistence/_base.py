"""The connection life cycle of the store and the one way to run its database work.

Every public coroutine of the store runs its database work through
``_StoreBase._run`` (writers through ``_StoreBase._write``, which adds their log
line): inside ``anyio.CancelScope(shield=True)`` with a deadline, so a cancelled
caller (a browser that left, the stream's cancel scope, server shutdown) can never
interrupt a statement half way, which would leak an ``idle in transaction``
connection on PostgreSQL or hold the write lock on SQLite. A pending cancellation
is not swallowed: anyio delivers it at the caller's next checkpoint, after the
result is in hand.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
from databases import Database

from persistence._errors import check_sqlite_location, unavailable
from persistence._health import DbHealth
from persistence._pool_gate import PoolGate
from persistence._sql import SQLITE_ROW_FACTORY, Conn
from persistence._sqlite_writer import SqliteWriter
from persistence._urls import Dialect, _parse_url, sqlite_database
from turngate.exceptions import DatabaseUnavailable, PersistenceError

logger = logging.getLogger("turngate.persistence")

T = TypeVar("T")
DbFn = Callable[[Conn], Awaitable[T]]
OperationObserver = Callable[[str, str, float], None]

DEFAULT_POOL_SIZE = 10  # asyncpg's own default

# Writes the maintenance task repeats every few seconds for every running turn. Their
# db_op lines are debug, so a quiet server's log is not a reaper pass every 2 s. What
# they did is logged by their callers (e.g. "marked 2 turns interrupted"), and a
# failed pass as one line by the maintenance loop.
ROUTINE_OPS = frozenset({"checkpoint", "renew_leases", "recover_expired_turns"})


async def _cheap_reset(con: Any) -> None:
    # asyncpg's default reset (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) costs a
    # round trip on every release; we never use that session state. The pool already
    # rolls back a stray transaction before calling us; belt and braces if one is left.
    if con.is_in_transaction():
        await con.reset()


def _iso(value: Any) -> str:
    """Timestamps leave the store as fixed-width ISO-8601 UTC strings on both databases."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return str(value)


def utcnow_text() -> str:
    """Now, as the store writes timestamps on SQLite (fixed-width ISO-8601 UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_iso(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _load_json(value: Any) -> Any:
    # asyncpg hands json/jsonb back as text, SQLite stores text.
    return json.loads(value) if isinstance(value, str | bytes) else value


def _dump_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _answered(exc: BaseException) -> bool:
    """Whether an operation that raised ``exc`` got the database's answer: an error of
    the store's own (not ``DatabaseUnavailable``), or one the server sent about the
    request itself. Not a timeout, a lost connection, a lock wait given up, or a
    server shutting down."""
    if isinstance(exc, PersistenceError):
        return not isinstance(exc, DatabaseUnavailable)
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return False
    return sqlstate[:2] not in ("08", "57") and sqlstate != "55P03"


class _TunedSQLiteConnection(sqlite3.Connection):
    """WAL with ``synchronous=NORMAL``: a commit does not wait for fsync (1.8 ms
    each on this machine). A killed process loses nothing; only an OS crash or power
    loss can drop the last commits, never corrupt the file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA synchronous=NORMAL")
        self.row_factory = SQLITE_ROW_FACTORY


@asynccontextmanager
async def _begun(conn: Conn, begin: str) -> AsyncIterator[None]:
    """``begin`` … COMMIT on ``conn``, rolled back if the block raises."""
    await conn.execute(begin)
    try:
        yield
    except BaseException:
        await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


class _StoreBase:
    """Connection handling, timestamps, ``_run`` and ``_write``; the mixins add the
    operations."""

    def __init__(
        self,
        url: str | None = None,
        *,
        statement_timeout: float = 5.0,
        pool_size: int | None = None,
        acquire_timeout: float | None = None,
    ) -> None:
        parsed = _parse_url(url)
        self.url = parsed.databases_url
        self.dialect: Dialect = parsed.dialect
        self.statement_timeout = statement_timeout
        # A backstop above the drivers' own timeouts: asyncpg's command_timeout cancels
        # a statement cleanly on the server; ours must never be the one that fires.
        # It starts once a connection is in hand (the wait for one has its own bound).
        self._deadline = statement_timeout * 2 + 1.0
        if pool_size is not None and pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.pool_size = DEFAULT_POOL_SIZE if pool_size is None else pool_size
        # How long an operation may wait for a pooled connection before it gives up
        # with DatabaseUnavailable (PostgreSQL; SQLite has no pool to wait for).
        self.acquire_timeout = statement_timeout if acquire_timeout is None else acquire_timeout
        self.on_operation: OperationObserver | None = None
        # Every operation's outcome, for readiness: statements that fail while
        # SELECT 1 still answers (a lock, a held pool) make the database not ready.
        self.health = DbHealth()
        options: dict[str, Any]
        if self.dialect == "postgresql":
            options = {
                "command_timeout": statement_timeout,
                "timeout": statement_timeout,  # connect timeout
                "reset": _cheap_reset,
                "min_size": self.pool_size,
                "max_size": self.pool_size,
            }
        else:
            # sqlite3's timeout is the busy timeout; every acquire opens a new connection,
            # so per-connection pragmas go in the connection class.
            options = {"timeout": statement_timeout, "factory": _TunedSQLiteConnection}
        self._db = Database(self.url, **options)
        # PostgreSQL: operations take the pool's connections in arrival order, and the
        # wait gives up only while the database gives no answer (``_pool_gate``).
        self._gate: PoolGate | None = None
        if self.dialect == "postgresql":
            self._gate = PoolGate(self.pool_size, stall_timeout=self.acquire_timeout)
        # SQLite: every write goes through one connection in one thread, queued and
        # committed in batches (``persistence._sqlite_writer``); reads use ``_db``.
        self._writer: SqliteWriter | None = None
        if self.dialect == "sqlite":
            self._writer = SqliteWriter(
                sqlite_database(self.url), busy_timeout=statement_timeout,
                deadline=self._deadline, factory=_TunedSQLiteConnection,
            )

    # -- life cycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the pool; raises ``DatabaseUnavailable`` if the database cannot be reached."""
        if self.dialect == "sqlite":
            # aiosqlite leaves its worker thread posting to a closed loop when the file
            # cannot be opened, so refuse a missing directory before trying.
            check_sqlite_location(self.url)
        try:
            with anyio.fail_after(self._deadline, shield=True):
                await self._db.connect()
                if self._writer is not None:
                    # The writer opens its connection with WAL, which lets readers run
                    # beside it; the mode persists in the file.
                    await self._writer.start()
                    if str(self._writer.journal_mode).lower() != "wal":
                        logger.warning(
                            "SQLite journal_mode is %s, not wal", self._writer.journal_mode
                        )
        except Exception as exc:
            with anyio.fail_after(self._deadline, shield=True):
                if self._writer is not None:
                    await self._writer.stop()
                if self._db.is_connected:
                    await self._db.disconnect()
            raise unavailable(exc, self.url, "cannot connect to the database") from exc

    async def disconnect(self) -> None:
        """Write what is queued, then close the writer and the pool (idempotent)."""
        with anyio.fail_after(self._deadline, shield=True):
            if self._writer is not None:
                await self._writer.stop()
            if self._gate is not None and self._db.is_connected:
                for con in self._gate.take_spares():
                    await self._pg_pool.release(con)
            await self._db.disconnect()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    # -- helpers for the mixins -----------------------------------------------------------

    @property
    def _is_pg(self) -> bool:
        return self.dialect == "postgresql"

    @asynccontextmanager
    async def _transaction(self, conn: Conn) -> AsyncIterator[Conn]:
        """``conn`` inside one transaction; only inside a write operation.

        PostgreSQL: BEGIN … COMMIT. SQLite: the operation already runs in its own
        savepoint of the writer's ``BEGIN IMMEDIATE`` batch, so nothing to add.
        """
        if self._is_pg:
            async with _begun(conn, "BEGIN"):
                yield conn
        else:
            yield conn

    def _ts_param(self, value: str) -> Any:
        """A timestamp string as the driver wants it (asyncpg needs a datetime)."""
        return _parse_iso(value) if self._is_pg else value

    async def _run(self, fn: DbFn[T], *, quiet: bool = False, write: bool = False) -> T:
        """``_run_statement``, its outcome told to ``self.health``."""
        try:
            result = await self._run_statement(fn, quiet=quiet, write=write)
        except DatabaseUnavailable as exc:
            self.health.failed(exc)
            raise
        self.health.succeeded()
        return result

    async def _run_statement(self, fn: DbFn[T], *, quiet: bool = False, write: bool) -> T:
        """Run ``fn(conn)`` on one connection, shielded from outside cancellation.

        PostgreSQL, and SQLite reads: a pooled connection, the work bounded by the
        store's deadline, which starts once the connection is in hand. On PostgreSQL
        operations take the connections in arrival order (``persistence._pool_gate``):
        the wait gives up after ``acquire_timeout`` seconds only without any answer
        from the database, so a burst queues and a stuck or stalled database fails.
        SQLite writes (``write``): the store's writer (``persistence._sqlite_writer``);
        the wait for it is bounded by ``acquire_timeout`` + ``statement_timeout``, the
        work by the same deadline.
        ``conn`` runs statements compiled once to the driver's native form
        (``persistence._sql``). Any driver or connection failure, and a pool or writer
        that stays busy, becomes ``DatabaseUnavailable``.
        """
        if not self._db.is_connected:
            raise DatabaseUnavailable("the store is not connected")
        try:
            with anyio.CancelScope(shield=True):
                if write and self._writer is not None:
                    # The writer may itself wait up to the busy timeout for a lock held
                    # by another process before it takes the next batch; a write queued
                    # behind that gets its turn and fails with that cause ("locked").
                    result: T = await self._writer.run(
                        fn, queue_timeout=self.acquire_timeout + self.statement_timeout
                    )
                    return result
                if self._gate is None:
                    return await self._on_connection(fn)
                return await self._on_gated_connection(self._gate, fn)
        except PersistenceError:
            raise
        except TimeoutError as exc:
            raise DatabaseUnavailable("database operation timed out") from exc
        except (OSError, ConnectionError) as exc:
            raise DatabaseUnavailable(f"database unreachable: {exc}") from exc
        except Exception as exc:
            # Driver errors (asyncpg.PostgresError/InterfaceError, sqlite3.Error): the
            # caller cannot tell them apart from an outage, but the log keeps the cause
            # (writers log it in their own db_op line: ``quiet``).
            if not quiet:
                logger.warning("database error: %r", exc)
            raise DatabaseUnavailable(f"database error: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover  (mypy: the shield returns)

    async def _on_connection(self, fn: DbFn[T]) -> T:
        """``fn`` on a connection of SQLite's pool (a new one per operation)."""
        async with AsyncExitStack() as stack:
            connection = self._db.connection()
            with anyio.fail_after(self._deadline):
                await stack.enter_async_context(connection)
            conn = Conn(connection.raw_connection, is_pg=False)
            with anyio.fail_after(self._deadline):
                return await fn(conn)

    @property
    def _pg_pool(self) -> Any:
        """The asyncpg pool under ``databases`` (PostgreSQL), which the gate's
        operations take connections from and hand on directly."""
        return self._db._backend._pool

    async def _on_gated_connection(self, gate: PoolGate, fn: DbFn[T]) -> T:
        """``fn`` on a pooled PostgreSQL connection, taken in turn through ``gate``.

        The connection comes with the permit (handed on by the operation before) or
        from the pool; that wait is still bounded by ``acquire_timeout``, as a
        connection taken outside the store's operations may hold it. Afterwards a
        healthy, idle connection goes straight to the next waiter, any other back
        to the pool (which resets or replaces it).
        """
        con = await gate.acquire()
        answered = False
        try:
            if con is None:
                try:
                    with anyio.fail_after(self.acquire_timeout):
                        con = await self._pg_pool.acquire()
                except TimeoutError:
                    message = (
                        "no pooled database connection free within "
                        f"{self.acquire_timeout:g}s (pool_size={self.pool_size})"
                    )
                    logger.warning("database unavailable: %s", message)
                    raise DatabaseUnavailable(message) from None
            with anyio.fail_after(self._deadline):
                result = await fn(Conn(con, is_pg=True))
            answered = True
            return result
        except BaseException as exc:
            answered = _answered(exc)
            raise
        finally:
            reusable = (
                answered and con is not None
                and not con.is_closed() and not con.is_in_transaction()
            )
            if not (reusable and gate.hand_over(con)):
                try:
                    if con is not None:
                        await self._pg_pool.release(con)
                finally:
                    gate.release(answered=answered)

    async def _write(self, op: str, fn: DbFn[tuple[T, str]], **ids: Any) -> T:
        """Run the write operation ``fn`` through ``_run``, then log its one line and
        tell the observer.

        ``fn`` returns ``(result, outcome)``; a failure is reported as ``failed`` and
        re-raised (as ``DatabaseUnavailable``) for the caller to turn into a status.
        """
        started = time.perf_counter()
        try:
            result, outcome = await self._run(fn, quiet=True, write=True)
        except BaseException as exc:
            self._report(op, "failed", started, error=str(exc) or type(exc).__name__, **ids)
            raise
        self._report(op, outcome, started, **ids)
        return result

    def _report(self, op: str, outcome: str, started: float, **ids: Any) -> None:
        """The one structured log line of a writer, and the observer call."""
        seconds = time.perf_counter() - started
        if op in ROUTINE_OPS:
            level = logging.DEBUG
        else:
            level = logging.WARNING if outcome == "failed" else logging.INFO
        # For a periodic pass, "row_missing" only means there was nothing to do.
        wording = "nothing_to_do" if op in ROUTINE_OPS and outcome == "row_missing" else outcome
        error = ids.get("error")
        if logger.isEnabledFor(level):  # its fields are built only for a line written
            logger.log(
                level,
                "db_op %s %s %.2fms%s",
                op,
                wording,
                seconds * 1000,
                f" ({error})" if error else "",
                extra={
                    "event": "db_op",
                    "op": op,
                    "outcome": wording,
                    "duration_ms": round(seconds * 1000, 3),
                    **ids,
                },
            )
        if self.on_operation is not None:
            try:
                self.on_operation(op, outcome, seconds)
            except Exception:  # an observer must never break a write
                logger.exception("on_operation observer failed")
