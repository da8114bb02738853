"""Every write of a SQLite store, on one connection in one thread, committed in batches.

SQLite has one writer at a time. Each write operation of the store (an ``async def
op(conn)``, the same function PostgreSQL runs on a pooled connection) is queued
here; the writer thread takes everything queued, opens one ``BEGIN IMMEDIATE``
transaction, runs each operation inside its own ``SAVEPOINT`` (a failing operation
is rolled back alone and gets its own error) and commits the batch once. The
caller's event loop is only woken once per operation, when its outcome is in.

Why a thread of its own: on aiosqlite every statement is a hop between the event
loop and aiosqlite's thread, and under a burst the loop is busy streaming, so each
hop waits for a loop iteration; writers taking turns that way hold the write lock
for many iterations each, and a burst's queue outlasts the statement deadline
(``503``; measured in BENCHMARKS.md, "Turns started at once"). Here the operations
run back to back in the thread with no hop at all.

The operations run in the thread by driving their coroutine with ``send(None)``:
``_ThreadConn``'s methods finish without suspending, so an operation completes in
one step; one that awaits anything else is refused (``RuntimeError``) and rolled
back.

Bounds: at most ``max_pending`` operations wait (more is ``DatabaseUnavailable``
at once); ``BEGIN IMMEDIATE`` waits at most the busy timeout for a lock held by
another process (the whole batch then fails as ``locked``); one operation runs at
most ``deadline`` seconds (a progress handler interrupts it, rolled back alone).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Coroutine, Mapping
from typing import Any

import anyio

from persistence._sql import Conn, Row, _args, statement
from turngate.exceptions import DatabaseUnavailable

logger = logging.getLogger("turngate.persistence")

#: Operations that may wait for the writer; one more is refused at once.
MAX_PENDING = 10_000
#: Operations committed together at most.
MAX_BATCH = 256
# SQLite calls the progress handler every this many virtual-machine instructions.
_PROGRESS_STEPS = 10_000


class _ThreadConn(Conn):
    """``Conn`` on the writer thread's ``sqlite3`` connection: every call completes
    without suspending."""

    __slots__ = ()

    async def fetch_all(self, sql: str, values: Mapping[str, Any] | None = None) -> list[Row]:
        st = statement(sql)
        return list(self.raw.execute(st.sqlite_sql, _args(st.sqlite_names, values)).fetchall())

    async def fetch_one(self, sql: str, values: Mapping[str, Any] | None = None) -> Row | None:
        st = statement(sql)
        rows = self.raw.execute(st.sqlite_sql, _args(st.sqlite_names, values)).fetchall()
        return rows[0] if rows else None

    async def execute(self, sql: str, values: Mapping[str, Any] | None = None) -> None:
        st = statement(sql)
        self.raw.execute(st.sqlite_sql, _args(st.sqlite_names, values)).fetchall()


def _complete(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to its end in one step; it must not suspend."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a SQLite write operation awaited something other than its connection")


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Job:
    __slots__ = ("error", "fn", "future", "loop", "result")

    def __init__(self, fn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.result: Any = None
        self.error: BaseException | None = None

    def settle(self) -> None:
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future, self.result, self.error)
        except RuntimeError:  # the caller's loop is closed: nobody waits any more
            pass


class SqliteWriter:
    """The writer thread of one store and its queue (see the module's docstring)."""

    def __init__(
        self,
        database: str,
        *,
        busy_timeout: float,
        deadline: float,
        factory: type[sqlite3.Connection],
        max_pending: int = MAX_PENDING,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.database = database
        self.busy_timeout = busy_timeout
        self.deadline = deadline
        self.factory = factory
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.journal_mode: str | None = None
        #: Transactions begun so far (each holds one batch).
        self.batches = 0
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ended: asyncio.Future[None] | None = None
        self._job_deadline = float("inf")

    # -- life cycle (called by the store's connect / disconnect) ---------------------------

    async def start(self) -> None:
        """Open the connection (WAL) in a new thread; raises the driver's error if it fails."""
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._ended = loop.create_future()
        with self._cond:
            self._closing = False  # a store may connect again after a disconnect
        self._thread = threading.Thread(
            target=self._serve, args=(loop, opened), name="turngate-sqlite-writer", daemon=True
        )
        self._thread.start()
        await opened

    async def stop(self) -> None:
        """Write what is queued, then close the connection and end the thread."""
        if self._thread is None or self._ended is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        await self._ended  # the caller bounds this with its deadline
        self._thread = None

    # -- the callers' side ---------------------------------------------------------------

    async def run(self, fn: Any, *, queue_timeout: float) -> Any:
        """Queue ``fn`` (``async def fn(conn)``) and wait for its outcome.

        Raises what ``fn`` raised, the driver's error, or ``DatabaseUnavailable`` when
        the queue is full, the writer is stopped, or ``fn`` did not start within
        ``queue_timeout`` seconds (it is then taken off the queue: nothing written).
        Once started, it runs to its end; call this shielded from cancellation.
        """
        job = _Job(fn, asyncio.get_running_loop())
        with self._cond:
            if self._closing or self._thread is None:
                raise DatabaseUnavailable("the store is not connected")
            if len(self._jobs) >= self.max_pending:
                raise DatabaseUnavailable(
                    f"the SQLite write queue is full ({self.max_pending} writes waiting)"
                )
            self._jobs.append(job)
            if len(self._jobs) == 1:
                self._cond.notify()
        with anyio.move_on_after(queue_timeout):
            return await asyncio.shield(job.future)
        with self._cond:
            queued = job in self._jobs
            if queued:
                self._jobs.remove(job)
        if queued:
            raise DatabaseUnavailable(
                f"the SQLite writer did not take this write within {queue_timeout:g}s"
            )
        return await job.future  # started: the writer bounds it (busy timeout, deadline)

    # -- the writer thread ------------------------------------------------------------------

    def _serve(self, loop: asyncio.AbstractEventLoop, opened: asyncio.Future[None]) -> None:
        try:
            con = sqlite3.connect(
                self.database, timeout=self.busy_timeout, isolation_level=None,
                factory=self.factory,
            )
            try:
                self.journal_mode = str(con.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            except BaseException:
                con.close()
                raise
        except BaseException as exc:
            with self._cond:
                self._closing = True
            loop.call_soon_threadsafe(_resolve, opened, None, exc)
            self._settle_ended(loop)
            return
        con.set_progress_handler(self._past_deadline, _PROGRESS_STEPS)
        loop.call_soon_threadsafe(_resolve, opened, None, None)
        conn = _ThreadConn(con, is_pg=False)
        try:
            while True:
                with self._cond:
                    while not self._jobs and not self._closing:
                        self._cond.wait()
                    if not self._jobs:
                        return
                    batch = [self._jobs.popleft()
                             for _ in range(min(self.max_batch, len(self._jobs)))]
                self._write(con, conn, batch)
        finally:
            con.close()
            with self._cond:
                self._closing = True
                left, self._jobs = list(self._jobs), deque()
            for job in left:  # only if the loop above failed: never leave a caller waiting
                job.error = DatabaseUnavailable("the SQLite writer stopped")
                job.settle()
            self._settle_ended(loop)

    def _settle_ended(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._ended is not None:
            try:
                loop.call_soon_threadsafe(_resolve, self._ended, None, None)
            except RuntimeError:  # the loop is closed: nobody waits for the end
                pass

    def _past_deadline(self) -> bool:
        return time.monotonic() > self._job_deadline

    def _write(self, con: sqlite3.Connection, conn: _ThreadConn, batch: list[_Job]) -> None:
        """One transaction for ``batch``, each job in its savepoint; every job settled."""
        self.batches += 1
        try:
            con.execute("BEGIN IMMEDIATE")
            for job in batch:
                self._job_deadline = time.monotonic() + self.deadline
                con.execute("SAVEPOINT op")
                try:
                    job.result = _complete(job.fn(conn))
                except Exception as exc:  # re-raised in the caller's task by ``run``
                    job.error = exc
                    con.execute("ROLLBACK TO op")
                finally:
                    self._job_deadline = float("inf")
                con.execute("RELEASE op")
            con.execute("COMMIT")
        except Exception as exc:
            # BEGIN (a lock held elsewhere), a savepoint or COMMIT failed: nothing of
            # the batch is written. Jobs that had failed keep their own error.
            logger.warning("SQLite write batch of %d failed: %r", len(batch), exc)
            if con.in_transaction:
                try:
                    con.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.exception("ROLLBACK of a failed SQLite write batch failed")
            for job in batch:
                if job.error is None:
                    job.result, job.error = None, exc
        finally:
            for job in batch:
                job.settle()


__all__ = ["MAX_BATCH", "MAX_PENDING", "SqliteWriter"]
