"""A table lock longer than the lease, with two replicas: no live turn ends
interrupted, every row ends with its full text.

The lock is taken in this session's own test database (``pg_url``), never on
another database of the server. Lease and lock are shortened (lease 3 s,
lock 7 s: longer than the lease, so the other replica's reaper may mark the
rows of the stalled owner ``interrupted`` when the lock goes).
"""

from __future__ import annotations

import json

import anyio
import asyncpg
import pytest

from tests.test_durable_finalize import Watched
from tests.test_replicas import _client, _full, redis_url, replicas  # noqa: F401

pytestmark = pytest.mark.anyio

LEASE = 3.0
LOCK = 7.0


async def test_a_lock_longer_than_the_lease_with_two_replicas(
    pg_url: str, redis_url: str  # noqa: F811
) -> None:
    env = {"TURNGATE_LEASE_SECONDS": str(LEASE), "TURNGATE_CHECKPOINT_SECONDS": "0.5"}
    long_n, short_n = 400, 120
    async with replicas(pg_url, redis_url, 2, **env) as (procs, headers), \
            _client(procs[0], headers) as a:
        threads = [(await a.post("/v1/threads", json={})).json()["id"] for _ in range(10)]
        # Six long turns that outlive the lock, four short ones that end during it.
        plan = [(t, long_n if i < 6 else short_n) for i, t in enumerate(threads)]
        watched = [Watched() for _ in plan]
        started = [w.when(lambda w=w: w.deltas >= 10) for w in watched]  # type: ignore[misc]
        async with anyio.create_task_group() as tg:
            for (thread, n), w in zip(plan, watched, strict=True):
                body = {"turn_id": "t", "text": "x", "model": f"scripted:tokens={n},delay_ms=20"}
                tg.start_soon(lambda t=thread, w=w, b=body: w.read(  # type: ignore[misc]
                    a, "POST", f"/v1/threads/{t}/turns", json=b))
            for event in started:
                await event.wait()
            conn = await asyncpg.connect(pg_url, timeout=10)
            try:
                async with conn.transaction():
                    await conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
                    await anyio.sleep(LOCK)  # the fault itself: a lock held this long
            finally:
                await conn.close()
        for (_, n), w in zip(plan, watched, strict=True):
            assert w.stream.text == _full(n)
            assert not w.stream.of_type("error"), w.stream.of_type("error")
            assert w.stream.of_type("finish")[0]["finishReason"] == "stop"

    conn = await asyncpg.connect(pg_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT m.thread_id, m.status, m.content, "
            "(SELECT count(*) FROM token_usage u WHERE u.message_id = m.id) AS usage_rows, "
            "(SELECT bool_or(u.estimated) FROM token_usage u WHERE u.message_id = m.id) AS est "
            "FROM messages m WHERE m.role = 'assistant'"
        )
    finally:
        await conn.close()
    expected = dict(plan)
    assert len(rows) == len(plan)
    for row in rows:
        assert row["status"] == "complete", row
        text = _full(expected[row["thread_id"]])
        assert json.loads(row["content"]) == [{"type": "text", "text": text}]
        assert (row["usage_rows"], row["est"]) == (1, False)
