"""The ``openai`` adapter against a fake upstream replaying provider streams.

Each wire-format test runs on the project's own fixture and, when in use, on
the real recording of the same case (``tests/stream_corpus.py``).
"""

from __future__ import annotations

import logging
import socket
import time

import anyio
import httpx
import pytest

from llm_adapters._http import DRAIN_BYTES, DRAIN_SECONDS
from llm_adapters.base import AdapterRequest, ChatMessage
from llm_adapters.events import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from llm_adapters.openai import OpenAIAdapter, map_finish_reason
from tests.stream_corpus import StreamCase, case, cases, check_text
from tests.upstream_fakes import AdapterRun, FakeResponse, FakeUpstream, fixture, run_adapter
from turngate.exceptions import (
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)

pytestmark = pytest.mark.anyio

PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHg"
    "gJ/PchI7wAAAABJRU5ErkJggg=="
)
TEXT = case("openai-text")
DEEPSEEK = case("deepseek-reasoning")


def request(text: str = "hello", model: str = "gpt-4o", **options: object) -> AdapterRequest:
    return AdapterRequest(model, [ChatMessage("user", [{"type": "text", "text": text}])], options)


def adapter_for(fake: FakeUpstream, key: str = "sk-test") -> OpenAIAdapter:
    env = {"OPENAI_BASE_URL": fake.url + "/v1"}
    if key:
        env["OPENAI_API_KEY"] = key
    adapter = OpenAIAdapter(env)
    adapter.retry_delay = 0.01
    return adapter


async def replay(body: bytes, **kw: object) -> tuple:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(body, **kw))  # type: ignore[arg-type]
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
        return run, fake.requests


def assert_tool_events_well_ordered(events: list) -> None:
    started: set[str] = set()
    ended: set[str] = set()
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.id not in started
            started.add(e.id)
        elif isinstance(e, ToolCallDelta):
            assert e.id in started and e.id not in ended
        elif isinstance(e, ToolCallEnd):
            assert e.id in started and e.id not in ended
            ended.add(e.id)
        elif isinstance(e, Usage | Finish):
            assert ended == started, "every call ends before usage/finish"
    assert ended == started


def assert_final(run: AdapterRun, c: StreamCase) -> None:
    assert c.usage is not None
    final = Usage(c.usage_model, *c.usage)
    assert run.of(Usage) == [final]
    assert run.events[-2:] == [final, Finish(c.finish)]


def assert_fragments(run: AdapterRun, c: StreamCase) -> None:
    """Each non-empty argument fragment is one delta; the empty first one (that comes
    with id and name) makes none."""
    deltas = run.of(ToolCallDelta)
    assert all(d.args_text for d in deltas)
    for call_id, count in c.fragments.items():
        assert len([d for d in deltas if d.id == call_id]) == count, call_id


# --- every wire-format case, on the project's fixture and on the recording -----------


@pytest.mark.parametrize("c", cases("openai-text"))
async def test_text_with_usage_in_empty_choices_chunk(c: StreamCase) -> None:
    run, requests = await replay(c.body())
    assert run.error is None
    assert run.text == c.text
    if c.text_deltas is not None:
        assert len(run.of(TextDelta)) == c.text_deltas
    assert run.reasoning == ""
    assert run.tool_calls == []
    assert_final(run, c)
    assert len(requests) == 1 and requests[0].completed


@pytest.mark.parametrize("c", cases("openai-parallel-tools", "openai-single-tool"))
async def test_fragmented_tool_calls(c: StreamCase) -> None:
    run, _ = await replay(c.body())
    assert run.error is None
    assert run.text == ""
    assert run.tool_calls == c.tool_calls
    assert_fragments(run, c)
    assert_tool_events_well_ordered(run.events)
    assert_final(run, c)


@pytest.mark.parametrize("chunk_size", [None, 7, 1])
@pytest.mark.parametrize("c", cases("deepseek-reasoning"))
async def test_reasoning_content_and_usage_on_finish_chunk(
    c: StreamCase, chunk_size: int | None
) -> None:
    run, _ = await replay(c.body(), delay=0, chunk_size=chunk_size)
    assert run.error is None
    check_text(run.reasoning, c.reasoning)
    assert len(run.of(ReasoningDelta)) == c.reasoning_deltas
    assert run.text == c.text
    # reasoning comes first, then the text
    kinds = [type(e) for e in run.events if isinstance(e, TextDelta | ReasoningDelta)]
    assert kinds == sorted(kinds, key=lambda k: k is TextDelta)
    assert_final(run, c)


@pytest.mark.parametrize("c", cases("openrouter-error-chunk"))
async def test_error_chunk_after_comments_yields_usage_then_raises(c: StreamCase) -> None:
    body = c.body()
    assert body.startswith(b": OPENROUTER PROCESSING\n\n")  # comment lines are skipped
    run, _ = await replay(body)
    assert run.reasoning == c.reasoning
    if c.reasoning_deltas is not None:
        assert len(run.of(ReasoningDelta)) == c.reasoning_deltas
    assert run.text == ""
    assert isinstance(run.error, UpstreamProtocolError)
    assert c.usage is not None
    assert run.of(Usage) == [Usage(c.usage_model, *c.usage)]
    assert run.events[-1] == Usage(c.usage_model, *c.usage)
    assert run.of(Finish) == []
    for text in c.provider_texts:
        assert text not in str(run.error)


@pytest.mark.parametrize("c", cases("groq-error-event"))
async def test_error_event_raises_without_usage(c: StreamCase) -> None:
    run, _ = await replay(c.body())
    check_text(run.reasoning, c.reasoning)
    assert len(run.of(ReasoningDelta)) == c.reasoning_deltas
    assert run.text == ""
    assert run.of(Usage) == [] and run.of(Finish) == []
    assert isinstance(run.error, UpstreamProtocolError)
    message = str(run.error)
    for text in c.error_includes:
        assert text in message
    for text in c.provider_texts:  # no raw provider text
        assert text not in message
        assert text not in run.error.safe_message


@pytest.mark.parametrize("c", cases("openai-text"))
async def test_crlf_line_endings_parse_the_same(c: StreamCase) -> None:
    body = c.body().replace(b"\n", b"\r\n")
    run, _ = await replay(body, delay=0, chunk_size=5)
    assert run.error is None
    assert run.text == c.text
    assert_final(run, c)


# --- the request ---------------------------------------------------------------------


async def test_request_body_history_image_and_headers() -> None:
    history = [
        ChatMessage("user", [{"type": "text", "text": "turn one"}]),
        ChatMessage(
            "assistant",
            [
                {"type": "reasoning", "text": "thinking..."},
                {"type": "text", "text": "answer one"},
                {
                    "type": "tool-call",
                    "toolCallId": "call_1",
                    "toolName": "lookup",
                    "args": {"q": 1},
                    "argsText": '{"q": 1}',
                    "result": {"a": 2},
                },
                {"type": "tool-call", "toolCallId": "call_2", "toolName": "x", "args": {}},
            ],
        ),
        ChatMessage("assistant", [{"type": "status", "text": "(no text response)"}]),
        ChatMessage(
            "user",
            [
                {"type": "text", "text": "what is this?"},
                {"type": "image", "image": PNG},
                {"type": "mentioned-documents", "documents": []},
            ],
        ),
    ]
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(TEXT.body()))
        async with adapter_for(fake, key="sk-test-key") as adapter:
            req = AdapterRequest("gpt-4o-mini", history, {"temperature": 0.2, "system": "be brief"})
            run = await run_adapter(adapter, req)
    assert run.error is None
    sent = fake.requests[0]
    assert sent.method == "POST" and sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test-key"
    assert sent.headers["content-type"] == "application/json"
    body = sent.json
    assert body["model"] == "gpt-4o-mini"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.2
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "turn one"},
        {
            "role": "assistant",
            "content": "answer one",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"a": 2}'},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": PNG}},
            ],
        },
    ]


async def test_no_authorization_header_without_key() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(TEXT.body()))
        async with adapter_for(fake, key="") as adapter:
            run = await run_adapter(adapter, request())
    assert run.error is None
    assert "authorization" not in fake.requests[0].headers


def test_default_base_url_and_finish_mapping() -> None:
    assert OpenAIAdapter({}).base_url == "https://api.openai.com/v1"
    assert OpenAIAdapter({"OPENAI_BASE_URL": "http://x:1/v1/"}).base_url == "http://x:1/v1"
    assert [map_finish_reason(r) for r in
            ("stop", "length", "tool_calls", "function_call", "content_filter", "weird", None)
            ] == ["stop", "length", "tool-calls", "tool-calls", "content-filter", "other", "other"]


# --- failures --------------------------------------------------------------------------


async def test_http_500_then_success_retries_once() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.json(500, {"error": {"type": "server_error"}}),
            FakeResponse.sse(TEXT.body()),
        )
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
    assert run.error is None
    assert run.events[-1] == Finish("stop")
    assert len(fake.requests) == 2
    assert fake.requests[0].body == fake.requests[1].body


async def test_429_twice_gives_up_after_one_retry() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.json(429, {"error": {"type": "rate_limit"}}, headers={"retry-after": "0"}),
            FakeResponse.json(429, {"error": {"type": "rate_limit"}}, headers={"retry-after": "0"}),
        )
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
    assert isinstance(run.error, UpstreamStatusError)
    assert run.error.status_code == 429 and run.error.retryable
    assert run.events == []
    assert len(fake.requests) == 2


async def test_401_message_holds_neither_body_nor_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-secret-123"
    body = {
        "error": {
            "message": f"Incorrect API key provided: {secret}. You can find your API key at ...",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.json(401, body))
        async with adapter_for(fake, key=secret) as adapter:
            run = await run_adapter(adapter, request())
    error = run.error
    assert isinstance(error, UpstreamStatusError)
    assert error.status_code == 401 and not error.retryable
    assert len(fake.requests) == 1  # no retry on 4xx
    for text in (str(error), error.safe_message, repr(error), caplog.text):
        assert secret not in text
        assert "Incorrect API key" not in text
    assert "invalid_api_key" in str(error)


async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    adapter = OpenAIAdapter({"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"})
    adapter.retry_delay = 0.01
    async with adapter:
        run = await run_adapter(adapter, request())
    assert isinstance(run.error, UpstreamConnectError)
    assert isinstance(run.error.__cause__, httpx.ConnectError)
    assert run.events == []


async def test_malformed_json() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(b'data: {"choices": [{"delta": {"content": "a"\n\n'))
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
    assert isinstance(run.error, UpstreamProtocolError)
    assert isinstance(run.error.__cause__, ValueError)


async def test_stream_cut_before_finish_is_an_error() -> None:
    body = b"\n\n".join(TEXT.body().split(b"\n\n")[:5]) + b"\n\n"
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(body))
        async with adapter_for(fake) as adapter:
            run = await run_adapter(adapter, request())
    assert isinstance(run.error, UpstreamProtocolError)
    assert run.text == "Tide pools form where"  # the role chunk and four words
    assert run.of(Finish) == []


async def test_read_timeout() -> None:
    body = b"\n\n".join(TEXT.body().split(b"\n\n")[:3]) + b"\n\n"
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(body, hold_open=True))
        async with adapter_for(fake) as adapter:
            adapter.timeout = httpx.Timeout(0.3)
            run = await run_adapter(adapter, request())
    assert isinstance(run.error, UpstreamTimeout)
    assert isinstance(run.error.__cause__, httpx.TimeoutException)
    assert run.text == "Tide pools"


# --- closing ------------------------------------------------------------------------------


async def test_closing_the_generator_closes_the_upstream_connection() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.sse(DEEPSEEK.body(), delay=0.01,
                             hold_open=True)
        )
        async with adapter_for(fake) as adapter:
            agen = adapter.stream(request())
            got = [await agen.__anext__() for _ in range(5)]
            assert all(isinstance(e, ReasoningDelta) for e in got)
            closed_at = time.monotonic()
            await agen.aclose()
            gone_at = await fake.requests[0].wait_disconnected(within=1.0)
    assert gone_at - closed_at < 0.1
    assert not fake.requests[0].completed


async def test_cancelling_the_consumer_closes_the_upstream_connection() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.sse(DEEPSEEK.body(), delay=0.01,
                             hold_open=True)
        )
        seen = 0
        async with adapter_for(fake) as adapter:
            with anyio.CancelScope() as scope:
                async for _ in adapter.stream(request()):
                    seen += 1
                    if seen == 5:
                        cancelled_at = time.monotonic()
                        scope.cancel()  # delivered at the generator's next await
            assert scope.cancelled_caught
            gone_at = await fake.requests[0].wait_disconnected(within=1.0)
    assert seen > 0
    assert gone_at - cancelled_at < 0.1


async def test_adapter_reuses_one_client_and_aclose_closes_it() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.sse(fixture("openai-tool-call-single.sse")),
            FakeResponse.sse(fixture("openai-tool-call-single.sse")),
        )
        adapter = adapter_for(fake)
        await run_adapter(adapter, request())
        client = adapter._client
        await run_adapter(adapter, request())
        assert adapter._client is client and client is not None
        await adapter.aclose()
        assert client.is_closed


async def test_concurrent_streams_on_one_adapter_do_not_mix() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.sse(fixture("openai-tool-calls-parallel-fragmented.sse"), delay=0.003),
            FakeResponse.sse(DEEPSEEK.body(), delay=0.001),
        )
        async with adapter_for(fake) as adapter:
            runs: list = [None, None]

            async def one(i: int) -> None:
                runs[i] = await run_adapter(adapter, request(f"r{i}"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, 0)
                await fake.wait_for_request(1)
                tg.start_soon(one, 1)
    by_usage = {r.of(Usage)[0].model: r for r in runs}
    assert by_usage["gpt-4o-2024-08-06"].text == ""
    assert len(by_usage["gpt-4o-2024-08-06"].tool_calls) == 2
    assert by_usage["deepseek-reasoner"].text == DEEPSEEK.text
    assert all(r.error is None for r in runs)


async def test_empty_error_body_and_non_json_body() -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse(400, b""),
            FakeResponse(404, b"<html>not found sk-secret-123</html>"),
        )
        async with adapter_for(fake, key="sk-secret-123") as adapter:
            first = await run_adapter(adapter, request())
            second = await run_adapter(adapter, request())
    assert isinstance(first.error, UpstreamStatusError) and first.error.status_code == 400
    assert isinstance(second.error, UpstreamStatusError) and second.error.status_code == 404
    assert "html" not in str(second.error) and "sk-secret" not in str(second.error)


# --- connection reuse ---------------------------------------------------------------------


async def test_a_stream_read_to_its_end_leaves_its_connection_to_the_next() -> None:
    """After ``[DONE]`` the rest of the answer is read, so the next request goes out on
    the same connection; a stream closed before its end closes its connection."""
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.sse(TEXT.body()),
            FakeResponse.sse(TEXT.body()),
            FakeResponse.sse(DEEPSEEK.body(), delay=0.01, hold_open=True),
            FakeResponse.sse(TEXT.body()),
        )
        async with adapter_for(fake) as adapter:
            first = await run_adapter(adapter, request())
            second = await run_adapter(adapter, request())
            agen = adapter.stream(request())
            await agen.__anext__()
            await agen.aclose()
            fourth = await run_adapter(adapter, request())
    assert first.error is None and second.error is None and fourth.error is None
    assert second.text == TEXT.text and second.events[-1] == Finish("stop")
    connections = [r.connection for r in fake.requests]
    assert connections[0] == connections[1] == connections[2]
    assert connections[3] != connections[2]


async def test_done_on_a_connection_held_open_finishes_within_the_drain_bound() -> None:
    """An upstream that sends ``[DONE]`` and then neither ends the answer nor closes
    delays the finish by at most ``DRAIN_SECONDS``; its connection is not reused."""
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(TEXT.body(), hold_open=True), FakeResponse.sse(TEXT.body()))
        async with adapter_for(fake) as adapter:
            started = time.monotonic()
            first = await run_adapter(adapter, request())
            took = time.monotonic() - started
            second = await run_adapter(adapter, request())
    assert first.error is None and first.events[-1] == Finish("stop")
    assert first.text == TEXT.text
    assert DRAIN_SECONDS <= took < DRAIN_SECONDS + 0.5
    assert second.error is None
    assert fake.requests[1].connection != fake.requests[0].connection


async def test_more_than_drain_bytes_after_done_is_not_waited_for() -> None:
    """What follows ``[DONE]`` is read up to ``DRAIN_BYTES``, no further: an upstream
    that sends more and holds the connection open does not delay the finish."""
    tail = b": " + b"x" * (4 * DRAIN_BYTES) + b"\n\n"  # more than one read holds
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(TEXT.body() + tail, delay=0.0, hold_open=True))
        async with adapter_for(fake) as adapter:
            started = time.monotonic()
            run = await run_adapter(adapter, request())
            took = time.monotonic() - started
    assert run.error is None and run.events[-1] == Finish("stop")
    assert took < DRAIN_SECONDS
