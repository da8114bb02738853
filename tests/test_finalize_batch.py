"""Departed clients: 200 streams whose clients all leave at once are all finalized
``cancelled``, with one usage row each, through the finalize batcher (both databases)."""

from __future__ import annotations

import anyio
import httpx
import pytest

from tests.fixtures_server import run_gateway
from tests.sse_client import Stream, parse_sse

STREAMS = 200
EVENTS = 4  # start, text-start, a delta or two: the turn is generating

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


async def _count(store: object, sql: str) -> int:
    return int(await store._db.fetch_val(sql))  # type: ignore[attr-defined]


async def test_all_clients_leave_at_once(database_url: str) -> None:
    async with run_gateway(
        database_url, TURNGATE_MAX_STREAMS_PER_USER="1000",
        TURNGATE_RATE_LIMIT_PER_MINUTE="100000",
    ) as gw, gw.client(limits=httpx.Limits(max_connections=None)) as client:
        threads = [await gw.new_thread(client) for _ in range(STREAMS)]
        reached = 0
        all_reached = anyio.Event()
        leave = anyio.Event()
        streams: list[Stream] = []

        async def follow(thread_id: str) -> None:
            nonlocal reached
            async with client.stream(
                "POST", f"/v1/threads/{thread_id}/turns",
                json={"turn_id": "t1", "text": "go",
                      "model": "scripted:tokens=100000,delay_ms=50"},
            ) as response:
                assert response.status_code == 200
                stream = Stream(response.status_code, dict(response.headers))
                # Hold the iterator: a dropped one is closed by the GC, which closes
                # the connection (the client would leave now, not with the others).
                lines = response.aiter_lines()
                await parse_sse(lines, stream, EVENTS)
                streams.append(stream)
                reached += 1
                if reached == STREAMS:
                    all_reached.set()
                await leave.wait()  # then every client closes at once
                del lines

        async with anyio.create_task_group() as tg:
            for thread_id in threads:
                tg.start_soon(follow, thread_id)
            with anyio.fail_after(60):
                await all_reached.wait()
            assert gw.ctx.metrics.active_generations._value.get() == STREAMS
            leave.set()

        assert all(len(s.events) == EVENTS for s in streams)
        store = gw.store
        with anyio.fail_after(20):
            while await _count(store, "SELECT count(*) FROM messages "
                                      "WHERE status = 'streaming'"):
                await anyio.sleep(0.05)
        assert await _count(store, "SELECT count(*) FROM messages WHERE role = 'assistant' "
                                   "AND status = 'cancelled'") == STREAMS
        assert await _count(store, "SELECT count(*) FROM token_usage") == STREAMS
        assert await _count(store, "SELECT count(DISTINCT message_id) FROM token_usage "
                                   "WHERE estimated") == STREAMS
        metrics = gw.ctx.metrics
        assert metrics.active_generations._value.get() == 0
        assert metrics.turns_finalized.labels("cancelled")._value.get() == STREAMS
        # Batched: far fewer statements than turns.
        ops = {
            s.labels["operation"]: s.value
            for metric in metrics.db_operation.collect() for s in metric.samples
            if s.name.endswith("_count")
            and s.labels["operation"] in ("finalize_turn", "finalize_turns")
        }
        print(f"finalize statements for {STREAMS} turns: {ops}")
        assert ops.get("finalize_turns", 0) >= 1
        assert sum(ops.values()) < STREAMS
