"""DELETE /v1/threads/{id} at one replica while the thread's turn generates at another.

The deleting replica has no local copy of the turn: it asks the generating one to
cancel through Redis, waits for the row to be finalized, then deletes. The reader
on the other replica gets a proper end (abort, finish); the usage row stays.
"""

from __future__ import annotations

import anyio
import pytest

from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.test_replicas import _client, redis_url, replicas  # noqa: F401

pytestmark = pytest.mark.anyio


async def test_delete_at_another_replica_cancels_the_turn_first(
    pg_url: str, redis_url: str  # noqa: F811
) -> None:
    async with replicas(pg_url, redis_url, 2) as (procs, headers), \
            _client(procs[0], headers) as a, _client(procs[1], headers) as b:
        thread = (await a.post("/v1/threads", json={"title": "doomed"})).json()["id"]
        body = {"turn_id": "t1", "text": "x", "model": "scripted:tokens=2000,delay_ms=10"}
        box: dict[str, Stream] = {}

        async def on_a() -> None:
            box["a"] = await stream_request(a, "POST", f"/v1/threads/{thread}/turns", json=body)

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_a)
            with anyio.fail_after(10):
                while True:  # the turn is generating at A
                    msgs = (await b.get(f"/v1/threads/{thread}/messages")).json()["messages"]
                    if len(msgs) == 2 and msgs[1]["content"][0].get("text"):
                        break
                    await anyio.sleep(0.05)
            r = await b.delete(f"/v1/threads/{thread}")
        assert r.status_code == 200, r.text
        assert r.json()["cancelled_turn"] == "t1" and r.json()["messages_deleted"] == 2
        streamed = box["a"]
        validate_ui_stream(streamed)
        assert streamed.of_type("abort") and len(streamed.text) < len("w1 " * 2000)
        assert (await a.get(f"/v1/threads/{thread}/messages")).status_code == 404
        usage = (await a.get("/v1/usage")).json()["usage"]
        assert len(usage) == 1 and usage[0]["thread_id"] == thread
        assert 0 < usage[0]["completion_tokens"] < 2000
