"""The ``anthropic`` adapter against a fake upstream replaying real Messages API streams.

Expected values come from ``shared/recordings/SOURCES.md``.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import pytest

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
from tests.upstream_fakes import FakeResponse, FakeUpstream, recording, run_adapter
from turngate.exceptions import UpstreamConnectError, UpstreamProtocolError, UpstreamStatusError

pytestmark = pytest.mark.anyio

PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="
)


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


async def replay(name: str, **kw: object) -> tuple:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(recording(name), **kw))  # type: ignore[arg-type]
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


# --- every recording ----------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 3])
async def test_text_and_usage(chunk_size: int | None) -> None:
    run, requests = await replay("anthropic-text-usage.sse", chunk_size=chunk_size)
    assert run.error is None
    assert run.text == "- Captain\n- Scoop"
    assert len(run.of(TextDelta)) == 4
    assert run.reasoning == "" and run.tool_calls == []
    assert run.events[-2:] == [Usage("claude-sonnet-4-5-20250929", 17, 10), Finish("stop")]
    assert requests[0].completed


async def test_tool_use_with_input_json_delta_and_no_final_blank_line() -> None:
    body = recording("anthropic-tool-use-input-json-delta.sse")
    assert body.endswith(b'data: {"type":"message_stop"}')  # the edge case itself
    run, _ = await replay("anthropic-tool-use-input-json-delta.sse")
    assert run.error is None
    assert run.text == "I'll check the current weather in Paris for you."
    assert run.tool_calls == [
        ("toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather", '{"location": "Paris"}')
    ]
    # fragments "", '{"locati', 'on": "P', 'ar', 'is"}': the empty one makes no delta
    fragments = [d.args_text for d in run.of(ToolCallDelta)]
    assert fragments == ['{"locati', 'on": "P', "ar", 'is"}']
    tool_order_ok(run.events)
    # message_delta carries only output_tokens: input_tokens stay from message_start
    assert run.events[-2:] == [Usage("claude-sonnet-4-20250514", 377, 65), Finish("tool-calls")]


async def test_thinking_with_signature() -> None:
    run, _ = await replay("anthropic-thinking-signature.sse")
    assert run.error is None
    assert run.reasoning.startswith(
        "The user wants two names for a pet pelican, and they want me to be brief."
    )
    assert run.reasoning.endswith("Let me give two brief, catchy names:")
    assert len(run.of(ReasoningDelta)) == 5  # 6 thinking_deltas, the last one empty
    assert run.text == (
        '1. **Pouch** - references their iconic bill pouch\n2. **Pelé** - playful take on "pelican"'
    )
    first_text = next(i for i, e in enumerate(run.events) if isinstance(e, TextDelta))
    assert all(not isinstance(e, ReasoningDelta) for e in run.events[first_text:])
    signature = json.loads(
        next(
            line[6:]
            for line in recording("anthropic-thinking-signature.sse").decode().splitlines()
            if "signature_delta" in line
        )
    )["delta"]["signature"]
    assert len(signature) == 656
    assert all(signature not in str(e) for e in run.events)  # not output
    assert run.events[-2:] == [Usage("claude-haiku-4-5-20251001", 46, 133), Finish("stop")]


async def test_server_tool_then_tool_use_and_growing_input_tokens() -> None:
    run, _ = await replay("anthropic-server-tool-then-tool-use.sse")
    assert run.error is None
    assert run.text == (
        "Let me search for a tool that can provide current exchange rate information."
        "I found the right tool! Let me fetch the current USD to EUR exchange rate for you."
    )
    assert run.tool_calls == [
        (
            "srvtoolu_01S5swZdBmTzLDVzwcT5LbHp",
            "tool_search_tool_bm25",
            '{"query": "USD EUR exchange rate currency conversion"}',
        ),
        (
            "toolu_01EFn5wTNBYA8Reni8rbmnHT",
            "get_exchange_rate",
            '{"from_currency": "USD", "to_currency": "EUR"}',
        ),
    ]
    tool_order_ok(run.events)
    results = run.of(ToolResult)
    assert [r.id for r in results] == ["srvtoolu_01S5swZdBmTzLDVzwcT5LbHp"]
    # input_tokens 702 at message_start, 1591 in message_delta: the last value wins
    assert run.events[-2:] == [Usage("claude-sonnet-4-6", 1591, 175), Finish("tool-calls")]


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
            FakeResponse.sse(recording("anthropic-text-usage.sse")),
            FakeResponse.sse(recording("anthropic-text-usage.sse")),
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

# No recorded in-stream Anthropic error exists (SOURCES.md, "Not found"); this one has
# the shape of the real payload quoted there.
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
            FakeResponse.sse(recording("anthropic-text-usage.sse")),
        )
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
    assert run.error is None and run.text == "- Captain\n- Scoop"
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
            FakeResponse.sse(recording("anthropic-thinking-signature.sse"), delay=0.02,
                             hold_open=True)
        )
        async with adapter_for(fake) as adapter:
            agen = adapter.stream(request())
            first = await agen.__anext__()
            # message_start's input tokens come first, as provisional usage
            assert first == Usage("claude-haiku-4-5-20251001", 46, 3, final=False)
            first = await agen.__anext__()
            assert isinstance(first, ReasoningDelta)
            closed_at = time.monotonic()
            await agen.aclose()
            gone_at = await fake.requests[0].wait_disconnected(within=1.0)
    assert gone_at - closed_at < 0.1
    assert not fake.requests[0].completed
