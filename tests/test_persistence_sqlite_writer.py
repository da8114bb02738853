"""The SQLite store's one writer: batches, savepoints, bounds, cancellation.

Each test holds the writer thread inside a first operation (a ``threading.Event``)
so that the writes queued meanwhile go into the next batch together.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from persistence import Store, migrate
from turngate.exceptions import DatabaseUnavailable

pytestmark = pytest.mark.anyio


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'writer.db'}"
    await migrate(url)
    return url


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Store]:
    async with Store(sqlite_url) as connected:
        yield connected


class Held:
    """An operation that keeps the writer thread busy until ``release``."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()

    async def op(self, conn: Any) -> str:
        self.entered.set()
        self.released.wait(30)
        return "held"

    async def wait_entered(self) -> None:
        assert await anyio.to_thread.run_sync(self.entered.wait, 30)

    def release(self) -> None:
        self.released.set()


def insert_user(name: str, then: Callable[[], Any] | None = None) -> Any:
    async def op(conn: Any) -> str:
        await conn.execute(
            "INSERT INTO users (name, created_at) VALUES (:name, '2026-01-01T00:00:00.000000Z')",
            {"name": name},
        )
        if then is not None:
            then()
        return name

    return op


async def queued(store: Store, n: int) -> None:
    writer = store._writer
    assert writer is not None
    with anyio.fail_after(10):
        while len(writer._jobs) < n:
            await anyio.sleep(0.001)


async def user_names(store: Store) -> set[str]:
    rows = await store._run(lambda c: c.fetch_all("SELECT name FROM users"))
    return {str(r["name"]) for r in rows}


async def test_writes_queued_together_commit_in_one_batch_and_a_failing_one_alone_rolls_back(
    store: Store,
) -> None:
    assert store._writer is not None
    held, outcomes = Held(), {}

    def refuse() -> None:
        raise ValueError("refused after its insert")

    async def write(name: str, op: Any) -> None:
        try:
            outcomes[name] = await store._run(op, write=True)
        except DatabaseUnavailable as exc:
            outcomes[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(store._run, held.op, write=True))
        await held.wait_entered()
        before = store._writer.batches
        tg.start_soon(write, "a", insert_user("a"))
        tg.start_soon(write, "bad", insert_user("bad", refuse))
        tg.start_soon(write, "b", insert_user("b"))
        await queued(store, 3)
        held.release()
    assert outcomes["a"] == "a" and outcomes["b"] == "b"
    bad = outcomes["bad"]
    assert isinstance(bad, DatabaseUnavailable) and isinstance(bad.__cause__, ValueError)
    assert store._writer.batches == before + 1  # the three in one transaction
    assert await user_names(store) == {"a", "b"}


async def test_an_operation_that_awaits_anything_but_its_connection_is_refused_and_rolled_back(
    store: Store,
) -> None:
    async def suspends(conn: Any) -> None:
        await insert_user("x")(conn)
        await asyncio.sleep(0)  # a real suspension, as any awaited I/O would be

    with pytest.raises(DatabaseUnavailable) as caught:
        await store._run(suspends, write=True)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert await user_names(store) == set()
    await store._run(insert_user("after"), write=True)  # the writer goes on
    assert await user_names(store) == {"after"}


async def test_a_write_not_started_within_acquire_and_busy_timeout_is_dropped_unwritten(
    sqlite_url: str,
) -> None:
    # The bound on the wait for the writer: acquire_timeout + statement_timeout = 0.3 s.
    async with Store(sqlite_url, statement_timeout=0.1, acquire_timeout=0.2) as store:
        held = Held()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(store._run, held.op, write=True))
            await held.wait_entered()
            with pytest.raises(DatabaseUnavailable, match="did not take this write within 0.3s"):
                await store._run(insert_user("late"), write=True)
            held.release()
        assert await user_names(store) == set()
        recent = store.health.recent(60)
        assert (recent.count, recent.reason) == (1, "timeout")


async def test_a_full_queue_refuses_at_once(store: Store) -> None:
    assert store._writer is not None
    store._writer.max_pending = 1
    held = Held()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(store._run, held.op, write=True))
        await held.wait_entered()
        tg.start_soon(partial(store._run, insert_user("queued"), write=True))
        await queued(store, 1)
        with pytest.raises(DatabaseUnavailable, match="write queue is full"):
            await store._run(insert_user("refused"), write=True)
        assert store.health.recent(60).reason == "pool_exhausted"
        held.release()
    assert await user_names(store) == {"queued"}


async def test_an_operation_past_its_deadline_is_interrupted_alone(sqlite_url: str) -> None:
    # statement_timeout 0.1 s: the per-operation deadline is 2 × 0.1 + 1 = 1.2 s.
    async with Store(sqlite_url, statement_timeout=0.1) as store:
        async def endless(conn: Any) -> None:
            await insert_user("spinner")(conn)
            await conn.fetch_val(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                "SELECT max(i) FROM n"
            )

        with anyio.fail_after(20):
            with pytest.raises(DatabaseUnavailable) as caught:
                await store._run(endless, write=True)
        assert "interrupted" in str(caught.value.__cause__)
        await store._run(insert_user("next"), write=True)
        assert await user_names(store) == {"next"}


async def test_a_cancelled_caller_s_queued_write_still_lands_and_the_cancel_is_delivered(
    store: Store,
) -> None:
    held, returned, past_checkpoint = Held(), [], []
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(store._run, held.op, write=True))
        await held.wait_entered()
        with anyio.CancelScope() as scope:

            async def caller() -> None:
                returned.append(await store.create_user("carol"))
                await anyio.lowlevel.checkpoint()  # the pending cancel is delivered here
                past_checkpoint.append(True)

            async with anyio.create_task_group() as inner:
                inner.start_soon(caller)
                await queued(store, 1)
                scope.cancel()  # the caller is cancelled while its write waits in the queue
                held.release()
        assert scope.cancelled_caught
    assert len(returned) == 1 and past_checkpoint == []
    assert await user_names(store) == {"carol"}


async def test_a_store_connected_again_after_disconnect_writes_again(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    await store.connect()
    await store._run(insert_user("first"), write=True)
    await store.disconnect()
    with pytest.raises(DatabaseUnavailable, match="not connected"):
        await store._run(insert_user("while away"), write=True)
    await store.connect()
    try:
        await store._run(insert_user("second"), write=True)
        assert await user_names(store) == {"first", "second"}
    finally:
        await store.disconnect()


async def test_disconnect_writes_what_is_queued(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    await store.connect()
    held = Held()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(store._run, held.op, write=True))
        await held.wait_entered()
        tg.start_soon(partial(store._run, insert_user("queued"), write=True))
        await queued(store, 1)
        held.release()
        await store.disconnect()
    async with Store(sqlite_url) as again:
        assert await user_names(again) == {"queued"}
