"""Exactly one generation per turn: attach, replay, resume, cancel."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx
import pytest

from persistence import TurnOpened
from tests.fixtures_server import GatewayServer, run_gateway
from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.tracing import trace_turns
from tests.waiting import Reading, assistant_where, streaming_with_text

pytestmark = pytest.mark.anyio


def _metric(gw: GatewayServer, name: str, **labels: str) -> float:
    value = gw.ctx.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def _rows(client: httpx.AsyncClient, thread: str) -> tuple[list[dict], list[dict]]:
    msgs = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
    usage = (await client.get("/v1/usage", params={"thread_id": thread})).json()["usage"]
    return msgs, usage


def _full(n: int) -> str:
    return "".join(f"w{i} " for i in range(1, n + 1))


async def test_twenty_identical_requests_make_one_generation(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        body = {"turn_id": uuid.uuid4().hex, "text": "same request",
                "model": "scripted:tokens=40,delay_ms=5"}
        before = _metric(gateway, "turngate_generations_started_total")
        streams: list[Stream] = []

        async def one() -> None:
            streams.append(await stream_request(
                client, "POST", f"/v1/threads/{thread}/turns", json=body))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        assert len(streams) == 20
        for s in streams:
            validate_ui_stream(s)
            assert s.text == _full(40)
        assert len({s.chunks[0]["messageId"] for s in streams}) == 1
        assert _metric(gateway, "turngate_generations_started_total") - before == 1
        msgs, usage = await _rows(client, thread)
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert len(usage) == 1


async def test_same_turn_after_it_ended_replays_the_stored_reply(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        body = {"turn_id": uuid.uuid4().hex, "text": "x",
                "model": "scripted:tokens=8,reasoning=2,tools=1"}
        first = await stream_request(client, "POST", f"/v1/threads/{thread}/turns", json=body)
        validate_ui_stream(first)
        # Forget the in-memory copy: the replay must come from the database.
        gateway.ctx.relay.retention_seconds = 0
        gateway.ctx.relay.sweep()
        before = _metric(gateway, "turngate_generations_started_total")
        again = await stream_request(client, "POST", f"/v1/threads/{thread}/turns", json=body)
        validate_ui_stream(again)
        assert _metric(gateway, "turngate_generations_started_total") == before
        assert again.text == first.text
        assert again.reasoning == first.reasoning
        assert again.chunks[0]["messageId"] == first.chunks[0]["messageId"]
        assert (again.of_type("tool-input-available")[0]["input"]
                == first.of_type("tool-input-available")[0]["input"])
        assert (again.of_type("finish")[0]["messageMetadata"]["usage"]
                == first.of_type("finish")[0]["messageMetadata"]["usage"])
        msgs, usage = await _rows(client, thread)
        assert len(msgs) == 2 and len(usage) == 1


async def test_an_open_that_names_its_own_turn_busy_attaches(gateway: GatewayServer) -> None:
    """The route's second line behind the store's race handling: should ``open_turn``
    ever answer ``busy`` naming the request's own turn, the request attaches to that
    turn's stream instead of answering ``409``."""
    real_open = gateway.ctx.store.open_turn

    async def open_turn(*args: Any, **kwargs: Any) -> TurnOpened:
        opened = await real_open(*args, **kwargs)
        if opened.status == "opened" and not opened.assistant_inserted:
            return TurnOpened(status="busy", busy_turn_id=args[2])
        return opened

    gateway.ctx.store.open_turn = open_turn  # type: ignore[method-assign]
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        body = {"turn_id": "t1", "text": "x", "model": "scripted:tokens=30"}
        turns = f"/v1/threads/{thread}/turns"
        first = await stream_request(client, "POST", turns, json=body)
        validate_ui_stream(first)
        # Forget the in-memory copy, so the repeat reaches open_turn.
        gateway.ctx.relay.retention_seconds = 0
        gateway.ctx.relay.sweep()
        again = await stream_request(client, "POST", turns, json=body)
        assert again.status == 200, getattr(again, "body", b"")
        validate_ui_stream(again)
        assert again.chunks[0]["messageId"] == first.chunks[0]["messageId"]
        assert again.text == first.text == _full(30)


@pytest.mark.parametrize("after_end", [False, True], ids=["live", "ended"])
async def test_resume_with_last_event_id(database_url: str, after_end: bool) -> None:
    async with run_gateway(database_url, TURNGATE_ON_DISCONNECT="continue") as gw:
        async with gw.client() as client:
            thread = await gw.new_thread(client)
            turn_id = uuid.uuid4().hex
            body = {"turn_id": turn_id, "text": "x", "model": "scripted:tokens=60,delay_ms=10"}
            first = await stream_request(
                client, "POST", f"/v1/threads/{thread}/turns", json=body, limit=12)
            k = first.last_id
            if after_end:
                # The turn goes on without its client, to the end.
                await assistant_where(client, thread, lambda m: m["status"] != "streaming",
                                      within=5, what="the turn to end")
            rest = await stream_request(
                client, "GET", f"/v1/threads/{thread}/turns/{turn_id}/stream",
                headers={"last-event-id": str(k)})
            assert rest.status == 200
            # (The new thread's title chunk, if the resumed reader got it, has no id.)
            ids = [int(e.id) for e in first.events + rest.events if not e.transient]
            assert ids == list(range(len(ids))), "events missing or repeated"
            stitched = Stream(200, rest.headers, first.events + rest.events)
            validate_ui_stream(stitched)
            assert stitched.text == _full(60)
            msgs, usage = await _rows(client, thread)
            assert msgs[-1]["status"] == "complete" and len(usage) == 1
            assert usage[0]["estimated"] is False


async def test_resume_when_nothing_to_resume_is_204(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        r = await client.get(f"/v1/threads/{thread}/turns/nothing-here/stream")
        assert r.status_code == 204


async def test_cancel_from_second_connection(gateway: GatewayServer) -> None:
    traces = trace_turns(gateway)
    trace = uuid.uuid4().hex
    async with gateway.client() as client, gateway.client() as other:
        thread = await gateway.new_thread(client)
        turn_id = uuid.uuid4().hex
        body = {"turn_id": turn_id, "text": "x",
                "model": f"scripted:tokens=500,delay_ms=10,trace={trace}"}
        box: dict = {}

        reading = Reading()

        async def first() -> None:
            box["s"] = await reading.run(client, "POST", f"/v1/threads/{thread}/turns",
                                         json=body)
            box["ended"] = anyio.current_time()

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await reading.events_at_least(3)  # generating: start, text-start, a delta
            sent = anyio.current_time()
            r = await other.post(f"/v1/threads/{thread}/turns/{turn_id}/cancel")
            assert r.status_code == 200 and r.json()["cancelled"] is True
        assert box["ended"] - sent < 1.0
        s = box["s"]
        validate_ui_stream(s)  # a proper end: parts closed, finish, [DONE]
        assert s.of_type("abort") and s.of_type("finish")[0]["finishReason"] == "other"
        assert traces[trace].closed and not traces[trace].finished
        msgs, usage = await _rows(client, thread)
        assert msgs[-1]["status"] == "cancelled"
        assert msgs[-1]["content"][0]["text"] == s.text
        assert len(usage) == 1 and usage[0]["estimated"] is True
        # The thread is free for the next turn.
        nxt = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                   json={"turn_id": "next", "text": "y",
                                         "model": "scripted:tokens=2"})
        validate_ui_stream(nxt)


async def test_checkpoints_save_partial_content(database_url: str) -> None:
    async with run_gateway(database_url, TURNGATE_CHECKPOINT_SECONDS="0.2",
                           TURNGATE_LEASE_SECONDS="5") as gw:
        async with gw.client() as client:
            thread = await gw.new_thread(client)
            body = {"turn_id": "t", "text": "x", "model": "scripted:tokens=200,delay_ms=10"}
            async with anyio.create_task_group() as tg:
                box: dict = {}

                async def run() -> None:
                    box["s"] = await stream_request(
                        client, "POST", f"/v1/threads/{thread}/turns", json=body)

                tg.start_soon(run)
                # Checkpoints every 0.2 s of a 2 s turn: one lands while it streams.
                mid = await streaming_with_text(client, thread, within=1.5)
                text = mid["content"][0]["text"]
                assert _full(200).startswith(text), "the checkpoint is not what was generated"
            validate_ui_stream(box["s"])


async def test_a_silent_turn_keeps_its_lease(database_url: str) -> None:
    """No content for longer than the lease: renewals keep the turn alive, not recovery."""
    async with run_gateway(database_url, TURNGATE_CHECKPOINT_SECONDS="0.2",
                           TURNGATE_LEASE_SECONDS="0.6") as gw:
        async with gw.client() as client:
            thread = await gw.new_thread(client)
            body = {"turn_id": "slow", "text": "x", "model": "scripted:tokens=2,delay_ms=1500"}
            s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns", json=body)
            validate_ui_stream(s)
            assert s.text == "w1 w2 "
            msgs = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
            assert msgs[-1]["status"] == "complete", "the turn was taken for dead while silent"
