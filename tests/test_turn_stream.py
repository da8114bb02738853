"""The turn endpoint end to end over a real uvicorn server, on both databases."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from tests.fixtures_server import GatewayServer, run_gateway
from tests.sse_client import stream_request, validate_ui_stream
from tests.tracing import trace_turns

pytestmark = pytest.mark.anyio


def _turn(model: str, text: str = "hello there world", turn_id: str | None = None) -> dict:
    return {"turn_id": turn_id or uuid.uuid4().hex, "text": text, "model": model}


async def _messages(client: httpx.AsyncClient, thread_id: str) -> list[dict]:
    r = await client.get(f"/v1/threads/{thread_id}/messages")
    assert r.status_code == 200, r.text
    return r.json()["messages"]


async def _usage(client: httpx.AsyncClient, thread_id: str) -> list[dict]:
    r = await client.get("/v1/usage", params={"thread_id": thread_id})
    assert r.status_code == 200, r.text
    return r.json()["usage"]


async def _wait_status(client: httpx.AsyncClient, thread_id: str, status: str,
                       timeout: float = 1.0) -> dict:
    with anyio.fail_after(timeout):
        while True:
            msgs = await _messages(client, thread_id)
            assistant = [m for m in msgs if m["role"] == "assistant"]
            if assistant and assistant[-1]["status"] == status:
                return assistant[-1]
            await anyio.sleep(0.02)


async def test_full_turn_is_valid_and_persisted_as_streamed(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        body = _turn("scripted:tokens=12,reasoning=3,tools=2", "one two three four")
        s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns", json=body)
        validate_ui_stream(s)
        start = s.chunks[0]
        assert start["messageMetadata"]["threadId"] == thread
        assert start["messageMetadata"]["turnId"] == body["turn_id"]
        assert s.text == "".join(f"w{i} " for i in range(1, 13))
        assert s.reasoning == "r1 r2 r3 "
        assert len(s.of_type("tool-input-available")) == 2
        assert len(s.of_type("tool-output-available")) == 2
        finish = s.of_type("finish")[0]
        assert finish["finishReason"] == "stop"
        usage = finish["messageMetadata"]["usage"]
        # scripted: prompt = words of the prompt, completion = deltas sent
        assert usage["inputTokens"] == 4
        assert usage["estimated"] is False

        msgs = await _messages(client, thread)
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        user, assistant = msgs
        assert user["content"] == [{"type": "text", "text": "one two three four"}]
        assert assistant["id"] == int(start["messageId"])
        assert assistant["status"] == "complete"
        assert assistant["turn_id"] == body["turn_id"]
        kinds = [p["type"] for p in assistant["content"]]
        assert kinds == ["reasoning", "tool-call", "tool-call", "text"]
        assert assistant["content"][0]["text"] == s.reasoning
        assert assistant["content"][-1]["text"] == s.text
        tool = assistant["content"][1]
        streamed_input = s.of_type("tool-input-available")[0]
        assert tool["toolCallId"] == streamed_input["toolCallId"]
        assert tool["args"] == streamed_input["input"] == {"query": "q1", "n": 1}
        assert tool["result"] == s.of_type("tool-output-available")[0]["output"]
        rows = await _usage(client, thread)
        assert len(rows) == 1
        assert rows[0]["message_id"] == assistant["id"]
        assert rows[0]["prompt_tokens"] == usage["inputTokens"]
        assert rows[0]["completion_tokens"] == usage["outputTokens"]
        assert rows[0]["estimated"] is False


async def test_empty_reply_stores_status_marker(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                 json=_turn("scripted:tokens=0"))
        validate_ui_stream(s)
        assistant = (await _messages(client, thread))[-1]
        assert assistant["content"] == [{"type": "status", "text": "(no text response)"}]
        assert assistant["status"] == "complete"


CUTS = {
    # name: (model, events to read before leaving)
    "before_first_delta": ("scripted:tokens=200,delay_ms=20", 2),
    "after_one_delta": ("scripted:tokens=200,delay_ms=20", 4),
    "after_many_deltas": ("scripted:tokens=400,delay_ms=5", 60),
    "during_reasoning": ("scripted:tokens=50,reasoning=100,delay_ms=10", 8),
    "during_tool_call": ("scripted:tokens=50,tools=3,delay_ms=30", 6),
}


@pytest.fixture
async def cancelling_gateway(database_url: str) -> AsyncIterator[GatewayServer]:
    """A gateway whose disconnect policy is ``cancel`` (the default is ``grace``)."""
    async with run_gateway(database_url, TURNGATE_ON_DISCONNECT="cancel") as gw:
        yield gw


@pytest.mark.parametrize("cut", list(CUTS))
async def test_disconnect_cancels_and_finalizes(
    cancelling_gateway: GatewayServer, cut: str
) -> None:
    gateway = cancelling_gateway
    model, n_events = CUTS[cut]
    traces = trace_turns(gateway)
    trace = uuid.uuid4().hex
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                 json=_turn(f"{model},trace={trace}"), limit=n_events)
        assert len(s.events) == n_events
        left = anyio.current_time()
        assistant = await _wait_status(client, thread, "cancelled", timeout=1.0)
        assert anyio.current_time() - left < 1.0
        t = traces[trace]
        assert t.closed and not t.finished
        produced = t.deltas_sent
        # An observation window, not a wait: an adapter still producing would send
        # at least 6 more deltas in it (the CUTS models pace one per 5 to 30 ms).
        await anyio.sleep(0.2)
        assert traces[trace].deltas_sent == produced, "the adapter kept producing"
        # The row holds what the reader was sent: a prefix of the scripted reply, at
        # least what the client read, at most what was generated.
        text = "".join(p["text"] for p in assistant["content"] if p["type"] == "text")
        full = "".join(f"w{i} " for i in range(1, 401))
        assert full.startswith(text)
        assert text.startswith(s.text)
        assert len(text.split()) <= t.text_deltas_sent
        rows = await _usage(client, thread)
        assert len(rows) == 1 and rows[0]["estimated"] is True
        assert rows[0]["message_id"] == assistant["id"]
        # The pool is whole: more turns work at once.
        results = await asyncio.gather(*[
            stream_request(client, "POST", f"/v1/threads/{await gateway.new_thread(client)}/turns",
                           json=_turn("scripted:tokens=3"))
            for _ in range(5)
        ])
        for r in results:
            validate_ui_stream(r)


async def test_adapter_failure_mid_stream(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                 json=_turn("scripted:tokens=10,fail_after=3"))
        validate_ui_stream(s)
        errors = s.of_type("error")
        assert len(errors) == 1
        assert "scripted" not in errors[0]["errorText"]  # no internal text leaks
        assert s.of_type("finish")[0]["finishReason"] == "error"
        assistant = (await _messages(client, thread))[-1]
        assert assistant["status"] == "error"
        # the reason is stored with the partial reply
        assert assistant["content"] == [{"type": "text", "text": "w1 w2 w3 "},
                                        {"type": "error", "errorText": errors[0]["errorText"]}]
        rows = await _usage(client, thread)
        assert len(rows) == 1 and rows[0]["estimated"] is True


async def test_busy_thread_is_409(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        async with anyio.create_task_group() as tg:
            first: dict = {}

            async def long_turn() -> None:
                first["s"] = await stream_request(
                    client, "POST", f"/v1/threads/{thread}/turns",
                    json=_turn("scripted:tokens=30,delay_ms=10"))

            tg.start_soon(long_turn)
            with anyio.fail_after(5):  # the first turn is generating
                while gateway.ctx.relay.running_on_thread(thread) is None:
                    await anyio.sleep(0.005)
            r = await client.post(f"/v1/threads/{thread}/turns", json=_turn("scripted:tokens=2"))
            assert r.status_code == 409
            assert r.json()["error"]["code"] == "thread_busy"
            assert int(r.headers["retry-after"]) > 0
        validate_ui_stream(first["s"])
        msgs = await _messages(client, thread)
        assert len(msgs) == 2  # the refused turn wrote nothing


async def test_legacy_append_racing_stream_makes_no_duplicates(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        turn_id = uuid.uuid4().hex

        async def append(role: str, text: str) -> int:
            r = await client.post(f"/v1/threads/{thread}/messages",
                                  json={"role": role, "content": text, "turn_id": turn_id})
            assert r.status_code in (200, 201), r.text
            return int(r.json()["id"])

        results: dict = {}

        async def turn() -> None:
            results["s"] = await stream_request(
                client, "POST", f"/v1/threads/{thread}/turns",
                json=_turn("scripted:tokens=20,delay_ms=5", "hi there", turn_id))

        async with anyio.create_task_group() as tg:
            tg.start_soon(turn)
            ids = []
            for _ in range(3):
                ids.append(await append("user", "hi there"))
        s = results["s"]
        validate_ui_stream(s)
        msgs = await _messages(client, thread)
        users = [m for m in msgs if m["role"] == "user"]
        assistants = [m for m in msgs if m["role"] == "assistant"]
        assert len(users) == 1 and len(assistants) == 1
        assert set(ids) == {users[0]["id"]}
        assert await append("assistant", "client copy") == assistants[0]["id"]
        assert len(await _messages(client, thread)) == 2
        assert len(await _usage(client, thread)) == 1


async def test_unknown_thread_is_404_and_writes_nothing(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        r = await client.post("/v1/threads/nope/turns", json=_turn("scripted:tokens=2"))
        assert r.status_code == 404
        assert r.json() == {"error": {"code": "thread_not_found", "message": "thread not found"}}


async def test_an_adapter_that_fails_to_load_is_a_400_and_logged_with_its_cause(
    gateway: GatewayServer, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(env: object) -> object:
        raise RuntimeError("missing setting FOO_URL")

    gateway.ctx.adapters.register("broken", broken)  # type: ignore[arg-type]
    caplog.set_level("ERROR", logger="turngate.gateway")
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        r = await client.post(f"/v1/threads/{thread}/turns", json=_turn("broken:m"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_adapter", r.text
        assert "FOO_URL" not in r.text  # the cause is the operator's, in the log
        assert await _messages(client, thread) == []  # nothing written
    failed = [rec for rec in caplog.records if "adapter_load_failed" in rec.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert "missing setting FOO_URL" in caplog.text


async def test_the_generation_starts_before_the_response_head_is_written(
    gateway: GatewayServer,
) -> None:
    """A new turn's adapter is called (a provider's request goes out) before the
    response writes its head, so the provider works on it meanwhile."""
    from llm_adapters.events import Finish, TextDelta

    called = anyio.Event()
    release = anyio.Event()

    class Probe:
        name = "probe"

        async def stream(self, request: object) -> AsyncIterator[object]:
            called.set()
            await release.wait()  # as a provider that has not answered yet
            yield TextDelta("hi")
            yield Finish("stop")

        async def aclose(self) -> None:
            pass

    gateway.ctx.adapters.register("probe", lambda env: Probe())  # type: ignore[arg-type,return-value]
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
    body = json.dumps(_turn("probe:m")).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": f"/v1/threads/{thread}/turns", "raw_path": b"",
        "query_string": b"", "root_path": "", "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1), "app": gateway.app,
        "headers": [(b"authorization", f"Bearer {gateway.key}".encode()),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }
    requested = False
    head: dict[str, object] = {}
    body_out = bytearray()

    async def receive() -> dict[str, object]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            head["status"] = message["status"]
            head["adapter_called"] = called.is_set()
            release.set()
        elif message["type"] == "http.response.body":
            body_out.extend(message.get("body", b""))  # type: ignore[arg-type]

    with anyio.fail_after(10):
        await gateway.app(scope, receive, send)
    assert head == {"status": 200, "adapter_called": True}
    assert b'"delta":"hi"' in body_out and b"[DONE]" in body_out
