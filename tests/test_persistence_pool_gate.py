"""The wait for a pooled PostgreSQL connection (``persistence._pool_gate``): in arrival
order and as long as the database keeps answering; refused ``acquire_timeout`` after
the last answer when it stops; refused at once past ``max_waiting`` or with the
server gone.

Real PostgreSQL throughout: a queue made by a pool of one connection, a stuck pool
made by a table lock held on a connection of the test's own, an outage made by
cutting the proxy in front of the server.
"""

from __future__ import annotations

import time

import anyio
import asyncpg
import pytest

from persistence import Store
from persistence._health import failure_reason
from persistence._pool_gate import MAX_WAITING
from persistence._sql import Conn
from tests.fault_proxy import FaultProxy
from turngate.exceptions import DatabaseUnavailable

pytestmark = pytest.mark.anyio


async def _sleep_op(conn: Conn) -> None:
    await conn.execute("SELECT pg_sleep(0.02)")


async def _read_messages(conn: Conn) -> None:
    # Waits while the test's own connection holds the table locked.
    await conn.fetch_val("SELECT count(*) FROM messages")


async def test_a_queue_longer_than_acquire_timeout_runs_whole_in_arrival_order(
    pg_url: str,
) -> None:
    # One connection, 60 operations of 20 ms or more: the last waits 1.2 s or more,
    # four times the bound.
    async with Store(pg_url, pool_size=1, acquire_timeout=0.3) as store:
        finished: list[int] = []

        async def op(i: int) -> None:
            await store._run(_sleep_op)
            finished.append(i)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(op, i)
        elapsed = time.perf_counter() - started
        # Each operation but the last handed its connection straight to the next.
        assert store._gate is not None and store._gate.handed_over == 59
    assert elapsed >= 60 * 0.02, elapsed
    assert finished == list(range(60))


async def _lock_messages(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url, timeout=10)
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
    return conn


async def _waiting_on_locks(conn: asyncpg.Connection, at_least: int) -> None:
    with anyio.fail_after(10):
        while await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ) < at_least:
            await anyio.sleep(0.02)


async def test_waiters_behind_a_stuck_pool_are_refused_after_acquire_timeout(
    pg_url: str,
) -> None:
    # The statement itself may wait 5 s on the lock; the queue behind it gives up at 0.5 s.
    async with Store(pg_url, pool_size=1, statement_timeout=5.0, acquire_timeout=0.5) as store:
        locker = await _lock_messages(pg_url)
        try:
            outcomes: list[tuple[float, BaseException | None]] = []

            async def waiter() -> None:
                started = time.perf_counter()
                try:
                    await store._run(_sleep_op)
                except DatabaseUnavailable as exc:
                    outcomes.append((time.perf_counter() - started, exc))
                else:
                    outcomes.append((time.perf_counter() - started, None))

            async with anyio.create_task_group() as tg:
                tg.start_soon(store._run, _read_messages)  # holds the only connection
                await _waiting_on_locks(locker, 1)
                for _ in range(5):
                    tg.start_soon(waiter)
                with anyio.fail_after(10):
                    while len(outcomes) < 5:
                        await anyio.sleep(0.02)
                await locker.execute("ROLLBACK")  # the stuck read ends normally
        finally:
            await locker.close()
        for waited, exc in outcomes:
            assert exc is not None and 0.45 <= waited < 1.2, (waited, exc)
            assert str(exc).startswith("no pooled database connection free within 0.5s")
            assert failure_reason(exc) == "pool_exhausted"
        await store._run(_sleep_op)  # the pool is whole again
        assert store._gate is not None and store._gate.waiting == 0


async def test_one_more_than_max_waiting_is_refused_at_once(pg_url: str) -> None:
    async with Store(pg_url, pool_size=1, statement_timeout=5.0, acquire_timeout=3.0) as store:
        assert store._gate is not None and store._gate.max_waiting == MAX_WAITING == 10_000
        store._gate.max_waiting = 3
        locker = await _lock_messages(pg_url)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(store._run, _read_messages)  # holds the only connection
                await _waiting_on_locks(locker, 1)
                for _ in range(3):
                    tg.start_soon(store._run, _sleep_op)
                with anyio.fail_after(5):
                    while store._gate.waiting < 3:
                        await anyio.sleep(0.01)
                started = time.perf_counter()
                with pytest.raises(DatabaseUnavailable) as refused:
                    await store._run(_sleep_op)
                assert time.perf_counter() - started < 0.1
                assert "3 operations already waiting" in str(refused.value)
                assert failure_reason(refused.value) == "pool_exhausted"
                await locker.execute("ROLLBACK")  # the three queued ones then run
        finally:
            await locker.close()
        assert store._gate.waiting == 0


async def test_with_the_server_gone_a_long_queue_fails_quickly(_pg_session_database: str) -> None:
    proxy = FaultProxy()
    await proxy.start()
    try:
        async with Store(proxy.url(_pg_session_database), pool_size=2,
                         statement_timeout=2.0) as store:
            await store._run(_sleep_op)
            await proxy.cut()
            errors: list[BaseException] = []

            async def op() -> None:
                try:
                    await store._run(_sleep_op)
                except DatabaseUnavailable as exc:
                    errors.append(exc)

            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(op)
            elapsed = time.perf_counter() - started
        assert len(errors) == 100
        # Each fails on its own connection attempt, refused at once: far sooner than
        # the 2 s an operation may wait for a connection while nothing answers.
        assert elapsed < 2.0, elapsed
        assert {failure_reason(e) for e in errors} <= {"unreachable", "error"}, errors[:3]
    finally:
        await proxy.close()
