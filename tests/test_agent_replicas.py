"""A paused turn continued on one replica is followed from another (Redis).

The continuation streams under the same turn id as the paused stream: its copy in
Redis replaces the paused one's, so a reader on the other replica gets the
continuation's events, with its ids, and nothing of the paused stream's writer,
even when that one finishes (its end marker) after the replacement.
Several replicas need PostgreSQL (turngate refuses REDIS_URL with SQLite).
"""

from __future__ import annotations

import json

import anyio
import pytest

from gateway.replicas.stream import StreamWriter, read_turn
from gateway.streaming.relay import LiveTurn
from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.test_agent_loop import TEST_SERVER
from tests.test_replicas import _client, redis_url, replicas
from tests.waiting import Reading

pytestmark = pytest.mark.anyio

__all__ = ["redis_url"]  # the fixture, used by name

ENV = {"TURNGATE_MCP_CONFIG": json.dumps(
    {"mcpServers": {"t": {**TEST_SERVER, "approval": ["echo"]}}})}


async def test_continuation_is_followed_from_another_replica(
    pg_url: str, redis_url: str,
) -> None:
    async with replicas(pg_url, redis_url, 2, **ENV) as (procs, headers), \
            _client(procs[0], headers) as a, _client(procs[1], headers) as b:
        thread = (await a.post("/v1/threads", json={})).json()["id"]
        turns = f"/v1/threads/{thread}/turns"
        first = await stream_request(a, "POST", turns, json={
            "turn_id": "t1", "text": "x",
            "model": "scripted:call=t__echo,arg.text=hi,delay_ms=40"})
        [request] = first.of_type("tool-approval-request")
        reading = Reading()
        box: dict[str, Stream] = {}

        async def continue_on_a() -> None:
            box["a"] = await reading.run(a, "POST", f"{turns}/t1/continue", json={
                "approvals": [{"approvalId": request["approvalId"], "approved": True}]})

        async def follow_on_b() -> None:
            await reading.events_at_least(6)  # the continuation runs on A
            box["b"] = await stream_request(b, "GET", f"{turns}/t1/stream")

        async with anyio.create_task_group() as tg:
            tg.start_soon(continue_on_a)
            tg.start_soon(follow_on_b)
        on_a, on_b = box["a"], box["b"]
        validate_ui_stream(on_a, continues=frozenset({request["toolCallId"]}))
        assert on_b.chunks[2]["type"] == "tool-output-available"
        assert [(e.id, e.data) for e in on_b.events] == [(e.id, e.data) for e in on_a.events]


def _chunk(seq: int, text: str) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (seq, text.encode())


async def test_a_paused_streams_late_end_stays_out_of_its_continuations_copy(
    redis_url: str,
) -> None:
    """The race behind the test above, step by step on a real Redis: the paused turn's
    writer finishes (its last batch, its end marker) only after the continuation
    replaced its copy; a follower of the continuation still gets all of it."""
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(redis_url)
    key = "turngate:turn:th:t1"
    options = {"maxlen": 1000, "ttl_running": 60, "ttl_done": 5, "flush_interval": 0.0}
    try:
        paused = LiveTurn("th", "t1", 1, 7)
        paused.publish([_chunk(0, "paused-start")])
        old = StreamWriter(client, key, **options)
        assert await old.write_batch(0, paused.since(0))
        # The turn pauses: its last chunks are published and it ends, but its writer
        # (busy, or on a loaded loop) has not written them yet.
        paused.publish([_chunk(1, "paused-approval"), _chunk(2, "paused-finish")])
        paused.finish("requires_action")
        # The continuation (here or on another replica) replaces the copy.
        continued = LiveTurn("th", "t1", 1, 7)
        continued.publish([_chunk(0, "start"), _chunk(1, "start-step")])
        new = StreamWriter(client, key, **options)
        assert await new.rewrite(continued, take_over=True)
        # Now the paused turn's writer runs: it finds the stream taken and writes nothing.
        await old.run(paused)
        assert old.superseded and old.written == 0
        entries = await client.xrange(key)
        assert [fields for _, fields in entries] == [
            {b"f": b"0", b"n": b"2", b"d": _chunk(0, "start") + _chunk(1, "start-step")}]

        async def still_streaming() -> bool:
            return True

        got: list[bytes] = []

        async def follow() -> None:
            async for data in read_turn(client, key, -1, still_streaming, block_ms=100):
                got.append(data)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            tg.start_soon(new.run, continued)
            continued.publish([_chunk(2, "tool-output-available")])
            continued.publish([_chunk(3, "finish")])
            continued.finish("complete")
        assert b"".join(got) == b"".join(_chunk(i, t) for i, t in enumerate(
            ["start", "start-step", "tool-output-available", "finish"]))
        assert not new.superseded
        # A later writer of the same turn (a regenerated reply) takes the stream over.
        again = StreamWriter(client, key, **options)
        assert await again.write_batch(0, [_chunk(0, "regenerated")])
    finally:
        await client.delete(key, f"{key}:writer")
        await client.aclose()
