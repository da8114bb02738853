"""The ``anthropic`` adapter against a fake upstream replaying Messages API streams.

Each wire-format test runs on the project's own fixture and, when in use, on
the real recording of the same case (``tests/stream_corpus.py``).
"""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import pytest

from llm_adapters._sse import SSEDecoder
from llm_adapters.anthropic import AnthropicAdapter, map_stop_reason
from llm_adapters.base import AdapterRequest, ChatMessage
from llm_adapters.events import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolResult,
    Usage,
)
from tests.stream_corpus import StreamCase, case, cases, check_text
from tests.upstream_fakes import AdapterRun, FakeResponse, FakeUpstream, run_adapter
from turngate.exceptions import UpstreamConnectError, UpstreamProtocolError, UpstreamStatusError

pytestmark = pytest.mark.anyio

PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="
)
TEXT = case("anthropic-text")
THINKING = case("anthropic-thinking")


def request(
    text: str = "hello", model: str = "claude-sonnet-4-5", **options: object
) -> AdapterRequest:
    return AdapterRequest(model, [ChatMessage("user", [{"type": "text", "text": text}])], options)


def adapter_for(fake: FakeUpstream, key: str = "ak-test") -> AnthropicAdapter:
    env = {"ANTHROPIC_BASE_URL": fake.url}
    if key:
        env["ANTHROPIC_API_KEY"] = key
    adapter = AnthropicAdapter(env)
    adapter.retry_delay = 0.01
    return adapter


async def replay(body: bytes, **kw: object) -> tuple:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(body, **kw))  # type: ignore[arg-type]
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
        return run, fake.requests


def tool_order_ok(events: list) -> None:
    open_ids: set[str] = set()
    for e in events:
        if isinstance(e, ToolCallStart):
            open_ids.add(e.id)
        elif isinstance(e, ToolCallDelta):
            assert e.id in open_ids and e.args_text
        elif isinstance(e, ToolCallEnd):
            open_ids.remove(e.id)
    assert not open_ids


def assert_final(run: AdapterRun, c: StreamCase) -> None:
    """The last value of each count wins; ``message_start``'s come first, provisional."""
    assert c.usage is not None and c.first_usage is not None
    assert run.events[0] == Usage(c.usage_model, *c.first_usage, final=False)
    assert run.events[-2:] == [Usage(c.usage_model, *c.usage), Finish(c.finish)]


# --- every wire-format case, on the project's fixture and on the recording -----------


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("c", cases("anthropic-text"))
async def test_text_and_usage(c: StreamCase, chunk_size: int | None) -> None:
    body = c.body()
    assert b'event: ping\n' in body and b' }' in body  # a ping; JSON padded with spaces
    run, requests = await replay(body, chunk_size=chunk_size)
    assert run.error is None
    assert run.text == c.text
    assert len(run.of(TextDelta)) == c.text_deltas
    assert run.reasoning == "" and run.tool_calls == []
    assert_final(run, c)
    assert requests[0].completed


@pytest.mark.parametrize("c", cases("anthropic-tool-use"))
async def test_tool_use_with_input_json_delta_and_no_final_blank_line(c: StreamCase) -> None:
    body = c.body()
    assert c.no_final_blank_line
    assert body.endswith(b'data: {"type":"message_stop"}')  # the edge case itself
    run, _ = await replay(body)
    assert run.error is None
    assert run.text == c.text
    assert run.tool_calls == c.tool_calls
    # the first fragment is "": it makes no delta; every other one makes one
    ((call_id, count),) = c.fragments.items()
    assert len(run.of(ToolCallDelta)) == count
    tool_order_ok(run.events)
    # message_delta carries only output_tokens: input_tokens stay from message_start
    assert c.first_usage is not None and c.usage is not None
    assert c.usage[0] == c.first_usage[0]
    assert_final(run, c)


def signature_of(body: bytes) -> str:
    decoder = SSEDecoder()
    for event in decoder.feed(body) + decoder.flush():
        payload = json.loads(event.data)
        if payload.get("delta", {}).get("type") == "signature_delta":
            return str(payload["delta"]["signature"])
    raise AssertionError("no signature_delta")


@pytest.mark.parametrize("c", cases("anthropic-thinking"))
async def test_thinking_with_signature(c: StreamCase) -> None:
    body = c.body()
    run, _ = await replay(body)
    assert run.error is None
    check_text(run.reasoning, c.reasoning)
    # the last thinking_delta is empty: it makes no delta
    assert len(run.of(ReasoningDelta)) == c.reasoning_deltas
    assert run.text == c.text
    first_text = next(i for i, e in enumerate(run.events) if isinstance(e, TextDelta))
    assert all(not isinstance(e, ReasoningDelta) for e in run.events[first_text:])
    signature = signature_of(body)
    assert len(signature) == c.signature_length
    assert all(signature not in str(e) for e in run.events)  # not output
    assert_final(run, c)


@pytest.mark.parametrize("c", cases("anthropic-server-tool"))
async def test_server_tool_then_tool_use_and_growing_input_tokens(c: StreamCase) -> None:
    run, _ = await replay(c.body())
    assert run.error is None
    assert run.text == c.text
    assert run.tool_calls == c.tool_calls
    for call_id, count in c.fragments.items():
        assert len([d for d in run.of(ToolCallDelta) if d.id == call_id]) == count
    tool_order_ok(run.events)
    assert [r.id for r in run.of(ToolResult)] == c.tool_results
    # message_delta's input_tokens supersede message_start's: the last value wins
    assert c.first_usage is not None and c.usage is not None
    assert c.usage[0] > c.first_usage[0]
    assert_final(run, c)


# --- the request ------------------------------------------------------------------------


async def test_request_body_history_image_and_headers() -> None:
    history = [
        ChatMessage("user", [{"type": "text", "text": "turn one"}]),
        ChatMessage(
            "assistant",
            [{"type": "reasoning", "text": "hmm"}, {"type": "text", "text": "answer one"}],
        ),
        ChatMessage("assistant", [{"type": "status", "text": "(no text response)"}]),
        ChatMessage(
            "user",
            [
                {"type": "text", "text": "what is this?"},
                {"type": "image", "image": f"data:image/png;base64,{PNG_B64}"},
            ],
        ),
    ]
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.sse(TEXT.body()),
            FakeResponse.sse(TEXT.body()),
        )
        async with adapter_for(fake, key="ak-test-key") as adapter:
            run = await run_adapter(adapter, AdapterRequest("claude-x", history, {"system": "hi"}))
            run2 = await run_adapter(adapter, request(max_tokens=100))
    assert run.error is None and run2.error is None
    sent = fake.requests[0]
    assert sent.method == "POST" and sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "ak-test-key"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    body = sent.json
    assert body["model"] == "claude-x"
    assert body["stream"] is True
    assert body["max_tokens"] == 4096
    assert body["system"] == "hi"
    assert body["messages"] == [
        {"role": "user", "content": "turn one"},
        {"role": "assistant", "content": "answer one"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
                },
            ],
        },
    ]
    assert fake.requests[1].json["max_tokens"] == 100


def test_defaults_and_stop_reason_mapping() -> None:
    assert AnthropicAdapter({}).base_url == "https://api.anthropic.com"
    assert [map_stop_reason(r) for r in
            ("end_turn", "stop_sequence", "max_tokens", "tool_use", "refusal", None)
            ] == ["stop", "stop", "length", "tool-calls", "other", "other"]


# --- failures -----------------------------------------------------------------------------

# An in-stream error event, as the Messages API documents it (``event: error`` with an
# ``overloaded_error``, after the stream has started).
ERROR_STREAM = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant",'
    b'"model":"claude-x-1","content":[],"usage":{"input_tokens":12,"output_tokens":1}}}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
    b"event: error\n"
    b'data: {"type":"error","error":{"details":null,"type":"overloaded_error",'
    b'"message":"Overloaded"},"request_id":"req_1"}\n\n'
)


async def test_error_event_yields_usage_then_raises() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(ERROR_STREAM))
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
    assert run.text == "Hi"
    assert isinstance(run.error, UpstreamProtocolError)
    assert "overloaded_error" in str(run.error)
    assert run.events[-1] == Usage("claude-x-1", 12, 1)
    assert run.of(Finish) == []


async def test_unknown_events_are_ignored_and_truncation_is_an_error() -> None:
    body = (
        b"event: message_start\n"
        b'data: {"type":"message_start","message":{"model":"m","usage":{"input_tokens":3}}}\n\n'
        b"event: brand_new_event\n"
        b'data: {"type":"brand_new_event","x":1}\n\n'
        b"event: content_block_start\n"
        b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'
        b"\n\n"
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}'
        b"\n\n"
    )
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(body))
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
    assert run.text == "a"
    assert isinstance(run.error, UpstreamProtocolError)
    assert run.events[-1] == Usage("m", 3, 0)


async def test_529_then_success_retries_once() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.json(529, {"type": "error", "error": {"type": "overloaded_error"}}),
            FakeResponse.sse(TEXT.body()),
        )
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
    assert run.error is None and run.text == TEXT.text
    assert len(fake.requests) == 2


async def test_401_message_holds_neither_body_nor_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-secret-123"
    body = {
        "type": "error",
        "error": {"type": "authentication_error", "message": f"invalid x-api-key {secret}"},
    }
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.json(401, body))
        async with adapter_for(fake, key=secret) as adapter:
            run = await run_adapter(adapter, request())
    error = run.error
    assert isinstance(error, UpstreamStatusError) and error.status_code == 401
    assert len(fake.requests) == 1
    for text in (str(error), error.safe_message, repr(error), caplog.text):
        assert secret not in text and "invalid x-api-key" not in text
    assert "authentication_error" in str(error)


async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    adapter = AnthropicAdapter({"ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}"})
    adapter.retry_delay = 0.01
    async with adapter:
        run = await run_adapter(adapter, request())
    assert isinstance(run.error, UpstreamConnectError)
    assert isinstance(run.error.__cause__, httpx.ConnectError)


async def test_malformed_json() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(b"event: message_start\ndata: {not json}\n\n"))
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
    assert isinstance(run.error, UpstreamProtocolError)
    assert isinstance(run.error.__cause__, ValueError)


async def test_closing_the_generator_closes_the_upstream_connection() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.sse(THINKING.body(), delay=0.02, hold_open=True)
        )
        async with adapter_for(fake) as adapter:
            agen = adapter.stream(request())
            first = await agen.__anext__()
            # message_start's input tokens come first, as provisional usage
            assert first == Usage(THINKING.usage_model, 52, 4, final=False)
            first = await agen.__anext__()
            assert isinstance(first, ReasoningDelta)
            closed_at = time.monotonic()
            await agen.aclose()
            gone_at = await fake.requests[0].wait_disconnected(within=1.0)
    assert gone_at - closed_at < 0.1
    assert not fake.requests[0].completed


async def test_a_stream_read_to_its_end_leaves_its_connection_to_the_next() -> None:
    """After ``message_stop`` the rest of the answer is read, so the next request goes
    out on the same connection."""
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(TEXT.body()), FakeResponse.sse(TEXT.body()))
        async with adapter_for(fake) as adapter:
            first = await run_adapter(adapter, request())
            second = await run_adapter(adapter, request())
    assert first.error is None and second.error is None
    assert second.text == TEXT.text
    assert fake.requests[0].connection == fake.requests[1].connection
