"""What happens to a turn when its last reader leaves: ``TURNGATE_ON_DISCONNECT``.

``grace`` (the default): generation goes on for ``TURNGATE_DISCONNECT_GRACE_SECONDS``;
a reader that attaches or resumes meanwhile keeps it going; otherwise it is
cancelled and the row holds exactly what the last reader was sent, with one usage
row counting every token generated. A new turn on a thread whose running turn has
no reader supersedes it. ``cancel`` stops at once, ``continue`` never.
Both databases, over real HTTP.
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx
import pytest

from tests.fixtures_server import GatewayServer, run_gateway
from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.tracing import trace_turns

pytestmark = pytest.mark.anyio

GRACE = 1.0
FULL = "".join(f"w{i} " for i in range(1, 201))


def _body(trace: str, turn_id: str = "t1", tokens: int = 200) -> dict[str, str]:
    return {"turn_id": turn_id, "text": "x",
            "model": f"scripted:tokens={tokens},delay_ms=25,trace={trace}"}


async def _assistant(client: httpx.AsyncClient, thread: str, turn_id: str) -> dict[str, Any]:
    msgs = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
    return next(m for m in msgs if m["role"] == "assistant" and m["turn_id"] == turn_id)


async def _final(client: httpx.AsyncClient, thread: str, turn_id: str, within: float
                 ) -> dict[str, Any]:
    with anyio.fail_after(within):
        while True:
            row = await _assistant(client, thread, turn_id)
            if row["status"] != "streaming":
                return row
            await anyio.sleep(0.02)


def _text(row: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in row["content"] if p["type"] == "text")


async def _usage(client: httpx.AsyncClient, thread: str) -> list[dict[str, Any]]:
    return (await client.get("/v1/usage", params={"thread_id": thread})).json()["usage"]


@pytest.mark.parametrize("policy", ["grace", "cancel"])
async def test_a_departed_reader_leaves_exactly_what_it_was_sent(
    database_url: str, policy: str
) -> None:
    env = {"TURNGATE_DISCONNECT_GRACE_SECONDS": str(GRACE)}
    if policy != "grace":
        env["TURNGATE_ON_DISCONNECT"] = policy
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        traces = trace_turns(gw)
        thread = await gw.new_thread(client)
        trace = uuid.uuid4().hex
        s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                 json=_body(trace), limit=20)
        left = anyio.current_time()
        assert s.text and FULL.startswith(s.text)
        row = await _final(client, thread, "t1", within=GRACE + 3)
        stopped = anyio.current_time() - left
        bound = GRACE + 1 if policy == "grace" else 1.0
        assert stopped < bound, f"{policy}: still generating {stopped:.2f}s after the reader left"
        if policy == "grace":
            assert stopped >= GRACE * 0.9, "cancelled before the grace period ended"
        t = traces[trace]
        assert t.closed and not t.finished
        assert row["status"] == "cancelled"
        # The row holds what the reader was sent, not what was generated meanwhile.
        assert _text(row) == s.text
        usage = await _usage(client, thread)
        assert len(usage) == 1 and usage[0]["message_id"] == row["id"]
        # Usage counts every token generated, also those nobody was sent (estimated from
        # the generated text: the scripted adapter reports usage only at its end).
        generated = "".join(f"w{i} " for i in range(1, t.text_deltas_sent + 1))
        assert usage[0]["estimated"] is True
        assert usage[0]["completion_tokens"] == (len(generated) + 3) // 4
        if policy == "grace":
            assert t.text_deltas_sent > len(s.text.split())


async def test_a_reader_back_within_the_grace_keeps_the_turn_going(database_url: str) -> None:
    async with run_gateway(database_url, TURNGATE_DISCONNECT_GRACE_SECONDS=str(GRACE)) as gw, \
            gw.client() as client:
        traces = trace_turns(gw)
        thread = await gw.new_thread(client)
        turns = f"/v1/threads/{thread}/turns"
        trace = uuid.uuid4().hex
        first = await stream_request(client, "POST", turns, json=_body(trace), limit=10)
        last_id = first.events[-1].id
        # A reload: the page comes back and resumes where it was.
        resumed = await stream_request(client, "GET", f"{turns}/t1/stream",
                                       headers={"last-event-id": str(last_id)})
        assert first.text + resumed.text == FULL
        row = await _final(client, thread, "t1", within=5)
        assert row["status"] == "complete" and _text(row) == FULL
        assert traces[trace].finished
        assert len(await _usage(client, thread)) == 1


async def test_continue_generates_to_the_end(database_url: str) -> None:
    async with run_gateway(database_url, TURNGATE_ON_DISCONNECT="continue") as gw, \
            gw.client() as client:
        traces = trace_turns(gw)
        thread = await gw.new_thread(client)
        trace = uuid.uuid4().hex
        await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                             json=_body(trace, tokens=40), limit=5)
        row = await _final(client, thread, "t1", within=5)
        assert row["status"] == "complete" and _text(row) == FULL[: len("".join(
            f"w{i} " for i in range(1, 41)))]
        assert traces[trace].finished and traces[trace].text_deltas_sent == 40
        assert len(await _usage(client, thread)) == 1


async def test_a_new_turn_supersedes_a_turn_nobody_reads(database_url: str) -> None:
    """Stop, then send at once (useChat's Stop is a disconnect): the new turn runs, no 409,
    and the stopped row holds what the page showed."""
    async with run_gateway(database_url, TURNGATE_DISCONNECT_GRACE_SECONDS="30") as gw, \
            gw.client() as client:
        traces = trace_turns(gw)
        thread = await gw.new_thread(client)
        turns = f"/v1/threads/{thread}/turns"
        trace = uuid.uuid4().hex
        stopped = await stream_request(client, "POST", turns, json=_body(trace), limit=15)
        sent = anyio.current_time()
        second = await stream_request(
            client, "POST", turns, json=_body(uuid.uuid4().hex, "t2", tokens=5))
        assert second.status == 200, getattr(second, "body", b"")
        validate_ui_stream(second)
        assert anyio.current_time() - sent < 3, "the new turn waited for the grace period"
        old = await _assistant(client, thread, "t1")
        assert old["status"] == "cancelled" and _text(old) == stopped.text
        assert traces[trace].closed
        assert (await _assistant(client, thread, "t2"))["status"] == "complete"
        assert len(await _usage(client, thread)) == 2


async def test_a_turn_with_a_reader_still_makes_a_new_turn_409(gateway: GatewayServer) -> None:
    trace_turns(gateway)
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        turns = f"/v1/threads/{thread}/turns"
        box: dict[str, Stream] = {}
        reading = anyio.Event()

        async def read() -> None:
            async with client.stream("POST", turns, json=_body(uuid.uuid4().hex)) as r:
                async for _ in r.aiter_lines():
                    reading.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await reading.wait()
            box["r"] = await stream_request(
                client, "POST", turns, json=_body(uuid.uuid4().hex, "t2"))
            tg.cancel_scope.cancel()
        assert box["r"].status == 409
        assert (await _assistant(client, thread, "t1"))["status"] in ("streaming", "cancelled")
