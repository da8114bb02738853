"""Cancellation never reaches a database call; an unreachable database never raises."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from persistence import Store, UsageRecord, build_user_content
from tests.fixtures_db import PG_ADMIN_DB, PG_HOST, PG_PORT, PG_USER, RoundTripProxy

USAGE = UsageRecord(prompt_tokens=1, completion_tokens=1, total_tokens=2)
DELAYS = [0.0, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.008, 0.013, 0.021]


async def _idle_in_transaction(database: str) -> int:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                "AND state LIKE 'idle in transaction%'",
                database,
            )
        )
    finally:
        await conn.close()


@pytest.mark.anyio
async def test_cancel_at_every_point_leaves_the_pool_whole(database_url: str) -> None:
    store = Store(database_url)
    await store.connect()
    owner = await store.create_user("alice")
    thread_ids = []
    for round_no, delay in enumerate(DELAYS * 2):
        thread_id = (await store.create_thread(owner, None, None))[0].id
        thread_ids.append(thread_id)
        turn = f"t{round_no}"
        # Cancel the caller while it writes: open, checkpoint, finalize in a row.
        with anyio.move_on_after(delay):
            opened = await store.open_turn(
                thread_id, owner, turn, build_user_content("x"), lease_owner="p", lease_seconds=30
            )
            assert opened.assistant_message_id is not None
            await store.checkpoint(
                opened.assistant_message_id,
                [{"type": "text", "text": "a"}],
                lease_owner="p",
                lease_seconds=30,
            )
            await store.finalize_turn(
                opened.assistant_message_id,
                thread_id,
                owner,
                [{"type": "text", "text": "ab"}],
                "complete",
                USAGE,
            )
        # And a native asyncio cancel of a task in the middle of a write.
        task = asyncio.ensure_future(
            store.append_message(thread_id, owner, "user", [], f"n{round_no}")
        )
        await asyncio.sleep(delay)  # where the cancel lands in the write: the point under test
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    if store.dialect == "postgresql":
        assert await _idle_in_transaction(database_url.rsplit("/", 1)[1]) == 0
    with anyio.fail_after(5):
        await store.disconnect()

    # The database is fully usable: 20 concurrent writes all succeed.
    async with Store(database_url) as fresh:
        results: list[str] = []

        async def write(i: int) -> None:
            opened = await fresh.open_turn(
                thread_ids[i],
                owner,
                "after",
                build_user_content("y"),
                lease_owner="q",
                lease_seconds=30,
            )
            results.append(opened.status)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(write, i)
        # A thread whose cancelled turn stayed streaming is busy, which is correct;
        # anything else must have opened. Nothing is locked or unavailable.
        assert "unavailable" not in results and len(results) == 20
        streaming = await fresh._db.fetch_val(
            "SELECT count(*) FROM messages WHERE status = 'streaming' AND lease_owner = 'p'"
        )
        assert results.count("busy") == streaming


@pytest.mark.anyio
async def test_a_cancelled_caller_gets_the_result_then_the_cancellation(
    database_url: str,
) -> None:
    async with Store(database_url) as store:
        owner = await store.create_user("alice")
        thread_id = (await store.create_thread(owner, None, None))[0].id
        reached_after = False
        with anyio.CancelScope() as scope:
            scope.cancel()
            opened = await store.open_turn(
                thread_id, owner, "t1", build_user_content("x"), lease_owner="p", lease_seconds=30
            )
            assert opened.status == "opened"  # the write completed despite the cancel
            await anyio.lowlevel.checkpoint()  # the pending cancellation is delivered here
            reached_after = True
        assert scope.cancelled_caught and not reached_after


@pytest.mark.anyio
async def test_unreachable_postgresql_reports_instead_of_raising(
    pg_url: str, round_trip_proxy: RoundTripProxy
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    store = Store(round_trip_proxy.url(database), statement_timeout=1.0)
    await store.connect()
    owner = await store.create_user("alice")
    thread_id = (await store.create_thread(owner, None, None))[0].id
    opened = await store.open_turn(
        thread_id, owner, "t1", build_user_content("x"), lease_owner="p", lease_seconds=30
    )
    assert opened.assistant_message_id is not None
    await round_trip_proxy.close()  # the database goes away

    with anyio.fail_after(10):
        again = await store.open_turn(
            thread_id, owner, "t2", build_user_content("x"), lease_owner="p", lease_seconds=30
        )
        assert again.status == "unavailable"
        outcome = await store.finalize_turn(
            opened.assistant_message_id, thread_id, owner, [], "complete", USAGE
        )
        assert outcome == "failed"
        assert await store.ping() is False
        await store.disconnect()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "url", ["postgresql://postgres@127.0.0.1:1/nothing", "sqlite:////nonexistent/dir/x.db"]
)
async def test_never_reachable_database(url: str) -> None:
    from turngate.exceptions import DatabaseUnavailable

    store = Store(url, statement_timeout=1.0)
    with pytest.raises(DatabaseUnavailable):
        await store.connect()
    opened = await store.open_turn(
        "t", 1, "t1", build_user_content("x"), lease_owner="p", lease_seconds=30
    )
    assert opened.status == "unavailable"
    assert await store.finalize_turn(1, "t", 1, [], "complete", USAGE) == "failed"
    assert await store.ping() is False
