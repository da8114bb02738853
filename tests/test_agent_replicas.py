"""A paused turn continued on one replica is followed from another (Redis).

The continuation streams under the same turn id as the paused stream: its copy in
Redis replaces the paused one's, so a reader on the other replica gets the
continuation's events, with its ids.
"""

from __future__ import annotations

import json

import anyio
import pytest

from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.test_agent_loop import TEST_SERVER
from tests.test_replicas import _client, redis_url, replicas
from tests.waiting import Reading

pytestmark = pytest.mark.anyio

__all__ = ["redis_url"]  # the fixture, used by name

ENV = {"TURNGATE_MCP_CONFIG": json.dumps(
    {"mcpServers": {"t": {**TEST_SERVER, "approval": ["echo"]}}})}


@pytest.mark.xfail(reason="known bug: on a loaded machine the reader on the other replica "
                   "can get only the continuation's first two chunks and an early end "
                   "(the paused stream's end in Redis raced with its replacement); open",
                   strict=False)
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
