"""Turns started all at once on one gateway over PostgreSQL: none refused, none lost.

The real app on uvicorn over HTTP, the scripted adapter, the test's PostgreSQL
database, and a pool of two connections, so a burst of opens queues for the pool
far longer than ``acquire_timeout``. The wait for a pooled connection is bounded
by the pool's progress (``persistence._pool_gate``), not by a fixed time: while
operations keep finishing, a queued open keeps its place and runs.
"""

from __future__ import annotations

import asyncpg
import pytest

from tests.fixtures_server import run_gateway
from tests.test_persistence_sqlite_burst import BURST_ENV, burst

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
        thread_ids = await burst(gw, turns)

    rows = await _rows(pg_url, thread_ids)
    assert sorted(t for t, _, _ in rows) == sorted(thread_ids)  # one assistant row each
    assert [r for r in rows if r[1] != "complete" or r[2] != 1] == []
