"""Turns started all at once on one gateway over PostgreSQL: none refused, none lost.

The real app on uvicorn over HTTP, the scripted adapter, the test's PostgreSQL
database, and a pool of two connections, so a burst of opens queues for the pool
far longer than ``acquire_timeout``. The wait for a pooled connection is bounded
by the pool's progress (``persistence._pool_gate``), not by a fixed time: while
operations keep finishing, a queued open keeps its place and runs.
"""

from __future__ import annotations

import anyio
import asyncpg
import httpx
import pytest

from tests.fixtures_server import run_gateway
from tests.test_persistence_sqlite_burst import BURST_ENV, MODEL
from turngate.testing import Stream, stream_request, turn_body, validate_ui_stream

pytestmark = pytest.mark.anyio

# Two pooled connections and a 1 s wait for one without progress: the 100th open of
# a burst already waits longer than that.
PG_BURST_ENV = {**BURST_ENV, "TURNGATE_DB_POOL_SIZE": "2", "TURNGATE_FINALIZE_TIMEOUT": "2"}


async def _rows(url: str, thread_ids: list[str]) -> list[tuple[str, str, int]]:
    """``(thread_id, assistant status, token_usage rows)`` of every assistant row."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return [
            (str(r[0]), str(r[1]), int(r[2]))
            for r in await conn.fetch(
                "SELECT m.thread_id, m.status, (SELECT count(*) FROM token_usage u "
                "WHERE u.message_id = m.id) FROM messages m "
                "WHERE m.role = 'assistant' AND m.thread_id = ANY($1::text[])",
                thread_ids,
            )
        ]
    finally:
        await conn.close()


@pytest.mark.parametrize("turns", [100, 1000])
async def test_turns_started_at_once_on_postgres_all_stream_and_finalize(
    pg_url: str, turns: int
) -> None:
    async with run_gateway(pg_url, **PG_BURST_ENV) as gw:
        thread_ids: list[str] = []

        async def make_thread() -> None:
            row, _ = await gw.store.create_thread(gw.user_id)
            thread_ids.append(row.id)

        async with anyio.create_task_group() as tg:
            for _ in range(turns):
                tg.start_soon(make_thread)

        streams: dict[str, Stream] = {}
        async with gw.client(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            timeout=httpx.Timeout(120.0),
        ) as client:

            async def turn(thread_id: str) -> None:
                streams[thread_id] = await stream_request(
                    client, "POST", f"/v1/threads/{thread_id}/turns",
                    json=turn_body("hello there", model=MODEL),
                )

            async with anyio.create_task_group() as tg:
                for thread_id in thread_ids:
                    tg.start_soon(turn, thread_id)

        refused = {
            t: (s.status, s.body[:200]) for t, s in streams.items() if s.status != 200
        }
        assert refused == {}, f"{len(refused)} of {turns} turns refused: {refused}"
        for thread_id, stream in streams.items():
            validate_ui_stream(stream)  # ids, parts, a finish chunk, then [DONE]
            assert stream.chunks[-1]["type"] == "finish", thread_id
            assert stream.text.split() == [f"w{i}" for i in range(1, 21)], thread_id

    rows = await _rows(pg_url, thread_ids)
    assert sorted(t for t, _, _ in rows) == sorted(thread_ids)  # one assistant row each
    assert [r for r in rows if r[1] != "complete" or r[2] != 1] == []
