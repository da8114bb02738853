"""Turns started all at once on one gateway over SQLite: none refused, none lost.

The real app on uvicorn over HTTP, the scripted adapter, a fresh SQLite file.
Every turn's writes (open, checkpoints, finalize) go through the store's one
writer (``persistence._sqlite_writer``), queued and committed in batches, so a
burst waits its turn instead of running into the statement deadline (``503
database_unavailable``). The bench (``bench/sqlite_burst.py``) measures the same
bursts against PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from persistence import migrate
from tests.fixtures_server import run_gateway
from turngate.testing import Stream, stream_request, turn_body, validate_ui_stream

pytestmark = pytest.mark.anyio

# One second of streaming per turn with a checkpoint every 0.3 s: the burst's opens,
# checkpoints and finalizes all meet in the writer's queue.
MODEL = "scripted:tokens=20,delay_ms=50"
BURST_ENV = {
    "TURNGATE_MAX_STREAMS_PER_USER": "100000",
    "TURNGATE_RATE_LIMIT_PER_MINUTE": "100000000",
    "TURNGATE_CHECKPOINT_SECONDS": "0.3",
    "TURNGATE_LOG_LEVEL": "warning",
}


def _rows(path: Path, thread_ids: list[str]) -> list[tuple[str, str, int]]:
    """``(thread_id, assistant status, token_usage rows)`` of every assistant row."""
    con = sqlite3.connect(path, timeout=30)
    try:
        marks = ",".join("?" * len(thread_ids))
        return [
            (str(t), str(s), int(n))
            for t, s, n in con.execute(
                "SELECT m.thread_id, m.status, (SELECT count(*) FROM token_usage u "
                "WHERE u.message_id = m.id) FROM messages m "
                f"WHERE m.role = 'assistant' AND m.thread_id IN ({marks})",
                thread_ids,
            )
        ]
    finally:
        con.close()


async def burst(gw: Any, turns: int) -> list[str]:
    """Start ``turns`` turns at once, each on a new thread, and check that every one
    streamed whole (none refused); the thread ids."""
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
    return thread_ids


@pytest.mark.parametrize("turns", [100, 1000])
async def test_turns_started_at_once_on_sqlite_all_stream_and_finalize(
    tmp_path: Path, turns: int
) -> None:
    path = tmp_path / "burst.db"
    url = f"sqlite:///{path}"
    await migrate(url)
    async with run_gateway(url, **BURST_ENV) as gw:
        thread_ids = await burst(gw, turns)

    rows = _rows(path, thread_ids)
    assert sorted(t for t, _, _ in rows) == sorted(thread_ids)  # one assistant row each
    assert [r for r in rows if r[1] != "complete" or r[2] != 1] == []
