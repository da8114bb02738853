"""Two users on every route: B gets 404 on A's thread and changes nothing; per-user limits."""

from __future__ import annotations

import uuid

import anyio
import httpx
import pytest

from tests.fixtures_server import GatewayServer, run_gateway
from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.test_bad_input import assert_json_error, client_for, snapshot

pytestmark = pytest.mark.anyio


def _b_requests(thread: str, turn: str) -> list[tuple[str, str, dict]]:
    """Every route that names a thread, as user B would call it on A's thread."""
    return [
        ("GET", f"/v1/threads/{thread}/messages", {}),
        ("GET", f"/v1/threads/{thread}/messages", {"params": {"format": "ui"}}),
        ("POST", f"/v1/threads/{thread}/messages",
         {"json": {"role": "user", "content": "sneaky", "turn_id": turn}}),
        ("POST", f"/v1/threads/{thread}/messages",
         {"json": {"role": "assistant", "content": "sneaky", "turn_id": uuid.uuid4().hex}}),
        ("POST", f"/v1/threads/{thread}/turns", {"json": {"turn_id": turn, "text": "mine?"}}),
        ("POST", f"/v1/threads/{thread}/turns",
         {"json": {"turn_id": uuid.uuid4().hex, "text": "mine?"}}),
        ("GET", f"/v1/threads/{thread}/turns/{turn}/stream", {}),
        ("GET", f"/v1/threads/{thread}/turns/{turn}/stream", {"headers": {"last-event-id": "0"}}),
        ("POST", f"/v1/threads/{thread}/turns/{turn}/cancel", {}),
        ("GET", "/v1/usage", {"params": {"thread_id": thread}}),
    ]


async def wait_live(gw: GatewayServer, thread: str, turn: str) -> None:
    """Until the turn is generating in this process (at most 5 s)."""
    for _ in range(500):
        if gw.ctx.relay.get(thread, turn) is not None:
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"turn {turn} never started")


async def _finished_turn(client: httpx.AsyncClient, thread: str, turn: str) -> None:
    s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                             json={"turn_id": turn, "text": "a b c"})
    validate_ui_stream(s)


async def test_b_gets_404_on_every_route_of_a_thread_and_changes_nothing(
    gateway: GatewayServer,
) -> None:
    _, key_b = await gateway.new_user("bob")
    async with gateway.client() as a, client_for(gateway, key_b) as b:
        thread = await gateway.new_thread(a)
        turn = "a-turn"
        await _finished_turn(a, thread, turn)
        b_thread = await gateway.new_thread(b)
        await _finished_turn(b, b_thread, "b-turn")

        before = await snapshot(gateway.store)
        for method, path, kwargs in _b_requests(thread, turn):
            r = await b.request(method, path, **kwargs)
            assert_json_error(r, 404, "thread_not_found", f"B {method} {path} {kwargs}")
        # Creating a thread with A's id is refused (the id is taken), and changes nothing.
        r = await b.post("/v1/threads", json={"id": thread, "title": "mine"})
        assert_json_error(r, 409, "thread_id_taken", "B create with A's id")
        assert await snapshot(gateway.store) == before

        # Lists show B only B's own rows.
        r = await b.get("/v1/threads")
        assert [t["id"] for t in r.json()["threads"]] == [b_thread]
        r = await b.get("/v1/usage")
        assert {u["thread_id"] for u in r.json()["usage"]} == {b_thread}
        r = await a.get("/v1/threads")
        assert [t["id"] for t in r.json()["threads"]] == [thread]

        # A still sees exactly its own turn, unchanged.
        r = await a.get(f"/v1/threads/{thread}/messages")
        msgs = r.json()["messages"]
        assert [(m["role"], m["turn_id"]) for m in msgs] == [("user", turn), ("assistant", turn)]
        assert msgs[1]["status"] == "complete"
        assert "sneaky" not in r.text


async def test_b_cannot_attach_to_or_cancel_a_live_turn_of_a(gateway: GatewayServer) -> None:
    _, key_b = await gateway.new_user("bob")
    async with gateway.client() as a, client_for(gateway, key_b) as b:
        thread = await gateway.new_thread(a)
        turn = "live-turn"
        result: list[Stream] = []

        async def run_a() -> None:
            result.append(await stream_request(
                a, "POST", f"/v1/threads/{thread}/turns",
                json={"turn_id": turn, "text": "x", "model": "scripted:tokens=30,delay_ms=30"},
            ))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_a)
            await wait_live(gateway, thread, turn)
            for method, path, kwargs in _b_requests(thread, turn):
                r = await b.request(method, path, **kwargs)
                assert_json_error(r, 404, "thread_not_found", f"B {method} {path} (live)")
        (s,) = result
        validate_ui_stream(s)
        assert s.of_type("finish")[0]["finishReason"] == "stop"
        assert s.text == "".join(f"w{i} " for i in range(1, 31))
        counts = await snapshot(gateway.store)
        assert (counts["threads"], counts["messages"], counts["token_usage"]) == (1, 2, 1)


async def test_stream_limit_is_per_user_429_with_retry_after(database_url: str) -> None:
    async with run_gateway(database_url, TURNGATE_MAX_STREAMS_PER_USER="1") as gw:
        _, key_b = await gw.new_user("bob")
        async with gw.client() as a, client_for(gw, key_b) as b:
            t1, t2 = await gw.new_thread(a), await gw.new_thread(a)
            tb = await gw.new_thread(b)
            result: list[Stream] = []

            async def slow() -> None:
                result.append(await stream_request(
                    a, "POST", f"/v1/threads/{t1}/turns",
                    json={"turn_id": "slow", "text": "x",
                          "model": "scripted:tokens=40,delay_ms=20"},
                ))

            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await wait_live(gw, t1, "slow")
                before = await snapshot(gw.store)
                r = await a.post(f"/v1/threads/{t2}/turns", json={"turn_id": "2nd", "text": "y"})
                error = assert_json_error(r, 429, "too_many_streams", "second stream")
                assert "1" in error["message"]
                assert r.headers["retry-after"].isdigit()
                after = await snapshot(gw.store)
                assert after["messages"] == before["messages"]
                assert after["token_usage"] == before["token_usage"]
                # Another user is not limited by A's streams.
                s = await stream_request(b, "POST", f"/v1/threads/{tb}/turns",
                                         json={"turn_id": "b1", "text": "z"})
                validate_ui_stream(s)
            validate_ui_stream(result[0])
            # The slot is free again once the first stream ended.
            s = await stream_request(a, "POST", f"/v1/threads/{t2}/turns",
                                     json={"turn_id": "2nd", "text": "y"})
            validate_ui_stream(s)


async def test_rate_limit_429_per_user(database_url: str) -> None:
    async with run_gateway(database_url, TURNGATE_RATE_LIMIT_PER_MINUTE="3") as gw:
        _, key_b = await gw.new_user("bob")
        async with gw.client() as a, client_for(gw, key_b) as b:
            for _ in range(3):
                r = await a.post("/v1/threads", json={})
                assert r.status_code == 201, r.text
            before = await snapshot(gw.store)
            r = await a.post("/v1/threads", json={})
            error = assert_json_error(r, 429, "rate_limited", "4th request")
            assert "3" in error["message"]
            assert 1 <= int(r.headers["retry-after"]) <= 60
            thread = (await a.get("/v1/threads")).json()["threads"][0]["id"]
            r = await a.post(f"/v1/threads/{thread}/turns", json={"turn_id": "t", "text": "x"})
            assert_json_error(r, 429, "rate_limited", "turn over the rate")
            r = await a.post(f"/v1/threads/{thread}/messages",
                             json={"role": "user", "content": "x", "turn_id": "t"})
            assert_json_error(r, 429, "rate_limited", "append over the rate")
            assert await snapshot(gw.store) == before
            # Reads are not counted; another user has a budget of their own.
            assert (await a.get(f"/v1/threads/{thread}/messages")).status_code == 200
            assert (await b.post("/v1/threads", json={})).status_code == 201
