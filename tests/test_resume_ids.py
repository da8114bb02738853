"""Event ids are stable: resuming with any Last-Event-ID of the live stream yields the
rest of it, exactly once, whether the events come from the relay or are rebuilt from
the stored row (relay copy expired, or the owning replica killed).
"""

from __future__ import annotations

import httpx
import pytest

from tests.fixtures_server import run_gateway
from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.test_replicas import _client, redis_url, replicas  # noqa: F401

pytestmark = pytest.mark.anyio

# Reasoning, a tool call (arguments in fragments, a result) and text: every kind of
# part the map describes, 200+ events in all.
MODEL = "scripted:tokens=180,reasoning=8,tools=1"


def _stored_reply(message: dict[str, object]) -> tuple[str, str]:
    parts = message["content"]
    assert isinstance(parts, list)
    text = "".join(p.get("text", "") for p in parts if p["type"] == "text")
    reasoning = "".join(p.get("text", "") for p in parts if p["type"] == "reasoning")
    return text, reasoning


async def _check_every_resume(
    client: httpx.AsyncClient, thread: str, turn: str, live: Stream
) -> None:
    """Resume with every Last-Event-ID of ``live``: the stitched stream is ``live``
    (without its transient chunks, which have no id and are never replayed)."""
    msgs = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
    stored_text, stored_reasoning = _stored_reply(msgs[-1])
    assert (stored_text, stored_reasoning) == (live.text, live.reasoning)
    kept = [e for e in live.events if not e.transient]
    whole = [(e.id, e.data) for e in kept]
    url = f"/v1/threads/{thread}/turns/{turn}/stream"
    for n, event in enumerate(kept):
        assert event.id == str(n)
        rest = await stream_request(client, "GET", url, headers={"last-event-id": str(n)})
        assert rest.status == 200, n
        stitched = Stream(200, live.headers, list(kept[: n + 1]) + rest.events)
        assert [(e.id, e.data) for e in stitched.events] == whole, f"Last-Event-ID {n}"
        validate_ui_stream(stitched)
        assert (stitched.text, stitched.reasoning) == (stored_text, stored_reasoning)
    fresh = await stream_request(client, "GET", url)  # no Last-Event-ID: all of it
    assert [(e.id, e.data) for e in fresh.events] == whole


@pytest.mark.parametrize("source", ["relay", "database"])
async def test_resume_with_every_last_event_id(database_url: str, source: str) -> None:
    # Retention 0: the relay forgets the turn as it ends, the row is all there is.
    retention = "60" if source == "relay" else "0"
    async with run_gateway(database_url, TURNGATE_RELAY_RETENTION_SECONDS=retention) as gw, \
            gw.client() as client:
        thread = await gw.new_thread(client)
        live = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                    json={"turn_id": "t1", "text": "x", "model": MODEL})
        validate_ui_stream(live)
        assert len(live.events) >= 200
        assert (gw.ctx.relay.get(thread, "t1") is not None) == (source == "relay")
        await _check_every_resume(client, thread, "t1", live)


async def test_resume_from_the_database_after_the_owning_replica_was_killed(
    pg_url: str, redis_url: str  # noqa: F811
) -> None:
    import redis.asyncio as redis_asyncio

    async with replicas(pg_url, redis_url, 2) as (procs, headers), \
            _client(procs[0], headers) as a, _client(procs[1], headers) as b:
        thread = (await a.post("/v1/threads", json={})).json()["id"]
        live = await stream_request(a, "POST", f"/v1/threads/{thread}/turns",
                                    json={"turn_id": "t1", "text": "x", "model": MODEL})
        validate_ui_stream(live)
        procs[0].kill()
        assert await procs[0].wait(10) is not None
        # The relayed copy gone too (its retention over): the row is all there is.
        r = redis_asyncio.Redis.from_url(redis_url)
        try:
            assert await r.delete(f"turngate:turn:{thread}:t1") == 1
        finally:
            await r.aclose()
        await _check_every_resume(b, thread, "t1", live)


def test_replay_without_a_map_keeps_one_delta_per_part() -> None:
    """Rows stored before maps were kept (or by the legacy route) still replay."""
    from gateway.turn.replay import replay_chunks

    parts = [{"type": "text", "text": "hello world"}]
    for event_map in (None, [[3, 3]], [[11, 0]], "junk"):
        chunks = replay_chunks(message_id=1, user_message_id=None, thread_id="t",
                               turn_id="u", parts=parts, status="complete", usage={},
                               event_map=event_map)  # type: ignore[arg-type]
        deltas = [c for c in chunks if b'"text-delta"' in c]
        assert len(deltas) == 1 and b'"hello world"' in deltas[0]
    chunks = replay_chunks(message_id=1, user_message_id=None, thread_id="t", turn_id="u",
                           parts=parts, status="complete", usage={}, event_map=[[6, 5]])
    assert [c.split(b'"delta":')[1] for c in chunks if b'"text-delta"' in c] == [
        b'"hello "}\n\n', b'"world"}\n\n']

