"""Regenerate: a new reply to the last user message; the old one is kept ``superseded``.

Over real HTTP on both databases: the native route and ``/api/chat``'s
``trigger: "regenerate-message"``, after complete, failed, stopped replies, twice
at once, and refused for a reply that is not the thread's last.
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx
import pytest

from persistence import Store, UsageRecord, build_user_content
from tests.fixtures_db import MakeThread
from tests.fixtures_server import GatewayServer
from tests.sse_client import Stream, stream_request, validate_ui_stream

pytestmark = pytest.mark.anyio


def _generations(gw: GatewayServer) -> float:
    value = gw.ctx.metrics.registry.get_sample_value("turngate_generations_started_total")
    return value or 0.0


async def _messages(client: httpx.AsyncClient, thread: str, **params: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/threads/{thread}/messages", params=params)
    assert r.status_code == 200, r.text
    return r.json()["messages"]  # type: ignore[no-any-return]


async def _usage(client: httpx.AsyncClient, thread: str) -> list[dict[str, Any]]:
    return (await client.get("/v1/usage", params={"thread_id": thread})).json()["usage"]  # type: ignore[no-any-return]


async def _turn(client: httpx.AsyncClient, thread: str, turn: str, model: str,
                text: str = "one two three", **kw: Any) -> Stream:
    return await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                json={"turn_id": turn, "text": text, "model": model}, **kw)


@pytest.mark.parametrize("first_model", ["scripted:tokens=5", "scripted:tokens=9,fail_after=2"],
                         ids=["after_complete", "after_error"])
async def test_regenerate_makes_a_new_reply_and_keeps_the_old_one(
    gateway: GatewayServer, first_model: str
) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        first = await _turn(client, thread, "t1", first_model)
        old_id = int(first.chunks[0]["messageId"])
        r = await stream_request(client, "POST", f"/v1/threads/{thread}/turns/t1/regenerate",
                                 json={"model": "scripted:tokens=7", "replaces": old_id})
        assert r.status == 200
        validate_ui_stream(r)
        assert r.text == "".join(f"w{i} " for i in range(1, 8))
        new_id = int(r.chunks[0]["messageId"])
        assert new_id != old_id
        msgs = await _messages(client, thread)
        assert [(m["role"], m["id"]) for m in msgs][1:] == [("assistant", new_id)]
        assert msgs[1]["status"] == "complete" and msgs[1]["turn_id"] == "t1"
        every = await _messages(client, thread, include="superseded")
        assert {m["id"]: m["status"] for m in every}[old_id] == "superseded"
        usage = await _usage(client, thread)
        assert sorted(u["message_id"] for u in usage) == sorted([old_id, new_id])
        # The next turn's model sees the new reply, not the superseded one: the
        # scripted prompt counts the words of every message it is given.
        nxt = await _turn(client, thread, "t2", "scripted:tokens=1", text="four")
        prompt = nxt.of_type("finish")[0]["messageMetadata"]["usage"]["inputTokens"]
        assert prompt == 3 + 7 + 1


async def test_regenerate_after_a_stopped_reply(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        turns = f"/v1/threads/{thread}/turns"
        box: dict[str, Stream] = {}
        started = anyio.Event()

        async def long_turn() -> None:
            async with client.stream("POST", turns, json={
                    "turn_id": "t1", "text": "x", "model": "scripted:tokens=500,delay_ms=10"}) as r:
                async for _ in r.aiter_lines():
                    started.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_turn)
            await started.wait()
            r = await client.post(f"{turns}/t1/cancel")
            assert r.json()["cancelled"] is True
        assert (await _messages(client, thread))[1]["status"] == "cancelled"
        box["r"] = await stream_request(client, "POST", f"{turns}/t1/regenerate")
        validate_ui_stream(box["r"])
        msgs = await _messages(client, thread)
        assert len(msgs) == 2 and msgs[1]["status"] == "complete"
        assert len(await _messages(client, thread, include="superseded")) == 3


async def test_regenerate_twice_at_once_makes_one_reply(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        first = await _turn(client, thread, "t1", "scripted:tokens=3")
        old_id = int(first.chunks[0]["messageId"])
        before = _generations(gateway)
        streams: list[Stream] = []

        async def again() -> None:
            streams.append(await stream_request(
                client, "POST", f"/v1/threads/{thread}/turns/t1/regenerate",
                json={"model": "scripted:tokens=30,delay_ms=5", "replaces": old_id}))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(again)
        assert _generations(gateway) - before == 1
        ids = {s.chunks[0]["messageId"] for s in streams}
        assert len(ids) == 1 and ids != {str(old_id)}
        for s in streams:
            assert s.status == 200
            validate_ui_stream(s)
            assert s.text == "".join(f"w{i} " for i in range(1, 31))
        assert len(await _messages(client, thread, include="superseded")) == 3


async def test_only_the_last_reply_can_be_regenerated(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        await _turn(client, thread, "t1", "scripted:tokens=2")
        await _turn(client, thread, "t2", "scripted:tokens=2")
        r = await client.post(f"/v1/threads/{thread}/turns/t1/regenerate")
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_last_turn"
        r = await client.post(f"/v1/threads/{thread}/turns/nope/regenerate")
        assert r.status_code == 404 and r.json()["error"]["code"] == "turn_not_found"
        r = await client.post(f"/v1/threads/{thread}/turns/t2/regenerate",
                              json={"replaces": "x"})
        assert r.status_code == 400
        _, other = await gateway.new_user("mallory")
        async with httpx.AsyncClient(base_url=gateway.url, headers=gateway.auth(other)) as m:
            r = await m.post(f"/v1/threads/{thread}/turns/t2/regenerate")
            assert r.status_code == 404
        assert len(await _messages(client, thread, include="superseded")) == 4


async def test_regenerate_through_api_chat(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        chat_id = f"chat-{uuid.uuid4().hex[:8]}"
        user = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
        r = await stream_request(client, "POST", "/api/chat", json={
            "id": chat_id, "trigger": "submit-message", "messages": [user],
            "model": "scripted:tokens=3"})
        old_id = r.chunks[0]["messageId"]
        again = await stream_request(client, "POST", "/api/chat", json={
            "id": chat_id, "trigger": "regenerate-message", "messageId": old_id,
            "messages": [user], "model": "scripted:tokens=4"})
        assert again.status == 200
        validate_ui_stream(again)
        assert again.chunks[0]["messageId"] != old_id
        assert again.text == "w1 w2 w3 w4 "
        msgs = await _messages(client, chat_id)
        assert [m["status"] for m in msgs] == ["complete", "complete"]


async def test_regenerate_turn_in_the_store_races_to_one_row(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    opened = await store.open_turn(thread_id, user_id, "t1", build_user_content("a b"),
                                   lease_owner="p", lease_seconds=30)
    assert opened.assistant_message_id is not None
    await store.finalize_turn(opened.assistant_message_id, thread_id, user_id,
                              [{"type": "text", "text": "old"}], "complete", UsageRecord(1, 1, 2))
    results: list[Any] = []

    async def regen() -> None:
        results.append(await store.regenerate_turn(
            thread_id, user_id, "t1", replaces=opened.assistant_message_id,
            lease_owner="p", lease_seconds=30))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(regen)
    assert [r.status for r in results] == ["opened"] * 8
    assert sum(r.assistant_inserted for r in results) == 1
    assert len({r.assistant_message_id for r in results}) == 1
    fresh = next(r for r in results if r.assistant_inserted)
    assert fresh.user_content == build_user_content("a b")
    rows = await store.list_messages(thread_id, user_id, include_superseded=True)
    assert rows is not None
    assert sorted(r.status for r in rows) == ["complete", "streaming", "superseded"]
