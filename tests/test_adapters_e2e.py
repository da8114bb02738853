"""The real adapters end to end: browser -> gateway (real uvicorn) -> fake upstream.

Every provider stream of ``tests/stream_corpus.py`` (the project's own fixtures,
and the recordings in ``../shared/recordings`` when in use) is replayed byte for
byte by a fake upstream on 127.0.0.1 while a real HTTP client talks to a real
gateway, on both databases. For each one the UI stream must be valid, and what
the gateway persisted (the assistant's parts and status, and its token_usage
row) must match what the upstream sent. The expected values are the corpus's
oracles, not values computed by the adapters.

Also: the upstream request is closed within 100 ms of the browser leaving; a
third-party adapter from an entry point works through the gateway; the second
turn of a thread sends the first turn to the upstream; an unknown adapter is a
400 that writes nothing; an upstream 401 is an error chunk with no key and no
provider text anywhere (response, database, logs); one retry on 429.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gateway.turn.accumulator import estimate_tokens
from tests.fixtures_server import free_port, run_gateway
from tests.sse_client import Stream, parse_sse, stream_request, validate_ui_stream
from tests.stream_corpus import StreamCase, cases, check_text
from tests.stream_corpus import case as fixture_case
from tests.upstream_fakes import FakeResponse, FakeUpstream
from tests.waiting import until
from turngate.exceptions import UpstreamProtocolError, UpstreamStatusError

pytestmark = pytest.mark.anyio

OPENAI_KEY = "sk-e2e-openai-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-e2e-0123456789abcdef"

#: USD per million tokens (= micro-dollars per token), merged over the defaults.
PRICES: dict[str, dict[str, float]] = {
    "gpt-4o": {"input": 2.5, "output": 10},
    "deepseek-reasoner": {"input": 0.55, "output": 2.19},
    "openai/gpt-oss-120b": {"input": 0.15, "output": 0.6},
    "qwen/qwen3-32b": {"input": 0.29, "output": 0.59},
    "claude-sonnet-4": {"input": 3, "output": 15},
    "claude-haiku-4-5": {"input": 1, "output": 5},
    "echo2": {"input": 1, "output": 2},
}
# The OpenRouter free models of the corpus are deliberately not priced: unknown costs 0.


def cost(model: str | None, prompt: int, completion: int) -> int:
    """The oracle: micro-dollars, rounded half up, from the configured table (an
    unpriced model, None, costs 0)."""
    if model is None:
        return 0
    price = PRICES[model]
    total = Decimal(str(price["input"])) * prompt + Decimal(str(price["output"])) * completion
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def gateway_env(fake: FakeUpstream, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": fake.url + "/v1",
        "OPENAI_API_KEY": OPENAI_KEY,
        "ANTHROPIC_BASE_URL": fake.url,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "TURNGATE_PRICES": json.dumps(PRICES),
        **extra,
    }


OPENAI_TEXT = fixture_case("openai-text")


def turn(model: str, text: str = "Hello there, model", turn_id: str | None = None) -> dict:
    return {"turn_id": turn_id or uuid.uuid4().hex, "text": text, "model": model}


async def messages(client: httpx.AsyncClient, thread_id: str) -> list[dict]:
    r = await client.get(f"/v1/threads/{thread_id}/messages")
    assert r.status_code == 200, r.text
    return list(r.json()["messages"])


async def usage_rows(client: httpx.AsyncClient, thread_id: str) -> list[dict]:
    r = await client.get("/v1/usage", params={"thread_id": thread_id})
    assert r.status_code == 200, r.text
    return list(r.json()["usage"])


async def wait_final(client: httpx.AsyncClient, thread_id: str, within: float = 3.0) -> dict:
    """The thread's last assistant row, once it is no longer streaming."""
    with anyio.fail_after(within):
        while True:
            assistants = [m for m in await messages(client, thread_id) if m["role"] == "assistant"]
            if assistants and assistants[-1]["status"] != "streaming":
                return assistants[-1]
            await anyio.sleep(0.02)


# --- every stream of the corpus ------------------------------------------------------


def check_parts(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [p["type"] for p in actual] == [p["type"] for p in expected], actual
    for got, want in zip(actual, expected, strict=True):
        if want["type"] in ("text", "reasoning"):
            check_text(got["text"], want["text"])
            continue
        for key, value in want.items():
            if value is ...:
                assert got.get(key) is not None, f"{key} missing in {got}"
            else:
                assert got.get(key) == value, (key, got)
        if "result" not in want:
            assert "result" not in got, got


def check_stream_matches(stream: Stream, case: StreamCase) -> None:
    """The streamed chunks carry the same content as the expected parts."""
    check_text(stream.text, case.text)
    check_text(stream.reasoning, case.reasoning)
    calls = [p for p in case.parts if p["type"] == "tool-call"]
    available = stream.of_type("tool-input-available")
    assert [(c["toolCallId"], c["toolName"], c["input"]) for c in available] == [
        (c["toolCallId"], c["toolName"], c["args"]) for c in calls
    ]
    for c in available:  # the fragments streamed assemble to the same JSON text
        fragments = [d["inputTextDelta"] for d in stream.of_type("tool-input-delta")
                     if d["toolCallId"] == c["toolCallId"]]
        want = next(p for p in calls if p["toolCallId"] == c["toolCallId"])
        assert "".join(fragments) == want["argsText"]
    results = [p["toolCallId"] for p in calls if "result" in p]
    assert [c["toolCallId"] for c in stream.of_type("tool-output-available")] == results


@pytest.mark.parametrize("case", cases())
async def test_stream_through_the_gateway(
    database_url: str, case: StreamCase, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = turn(case.model, "Hello there, model")
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(case.body(), delay=0.001))
        async with run_gateway(database_url, **gateway_env(fake)) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns", json=body)
            validate_ui_stream(s)
            check_stream_matches(s, case)
            assistant = await wait_final(client, thread)
            rows = await usage_rows(client, thread)
            req = fake.requests[0]

    # what the upstream was asked
    assert len(fake.requests) == 1  # no retry after a mid-stream error
    if case.model.startswith("openai:"):
        assert req.path == "/v1/chat/completions"
        assert req.headers["authorization"] == f"Bearer {OPENAI_KEY}"
        assert req.json["stream_options"] == {"include_usage": True}
    else:
        assert req.path == "/v1/messages"
        assert req.headers["x-api-key"] == ANTHROPIC_KEY
    assert req.json["model"] == case.model.partition(":")[2]
    assert req.json["messages"][-1]["content"] == body["text"]

    # what was persisted
    assert assistant["status"] == ("error" if case.finish == "error" else "complete")
    assert assistant["turn_id"] == body["turn_id"]
    assert s.chunks[0]["messageId"] == str(assistant["id"])
    stored = assistant["content"]
    if case.finish == "error":  # a failed reply ends with the reason its stream gave
        assert stored[-1] == {"type": "error", "errorText": s.of_type("error")[0]["errorText"]}
        stored = stored[:-1]
    check_parts(stored, list(case.parts))
    assert len(rows) == 1
    row = rows[0]
    assert row["message_id"] == assistant["id"]
    if case.usage is None:  # never reported: estimated from the characters
        prompt = estimate_tokens(len(body["text"]))
        completion = estimate_tokens(
            sum(len(p.get("text", "")) + len(p.get("argsText", "")) for p in assistant["content"])
        )
        assert row["estimated"] is True
    else:
        prompt, completion = case.usage
        assert row["estimated"] is False
    assert row["cost_micros"] == cost(case.price, prompt, completion)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        prompt, completion, prompt + completion
    )
    # reported usage is booked under the provider's model name, an estimate under the
    # turn's model string
    assert list(row["model_breakdown"]) == [
        case.model if case.usage is None else case.usage_model
    ]

    # what the browser was told
    finish = s.of_type("finish")[0]
    assert finish["finishReason"] == case.finish
    assert finish["messageMetadata"]["usage"] == {
        "inputTokens": prompt, "outputTokens": completion, "totalTokens": prompt + completion,
        "costMicros": row["cost_micros"], "estimated": row["estimated"],
    }
    errors = s.of_type("error")
    if case.finish == "error":
        assert [e["errorText"] for e in errors] == [UpstreamProtocolError.safe_message]
    else:
        assert errors == []
    raw = json.dumps([e.data for e in s.events]) + json.dumps(assistant) + json.dumps(rows)
    # neither the keys nor the provider's error text, nor even its error type and code
    for secret in [OPENAI_KEY, ANTHROPIC_KEY, *case.provider_texts, *case.error_includes]:
        assert secret not in raw
        assert secret not in caplog.text
    if case.price is None:  # an unpriced model costs 0 and says so once
        warnings = [r for r in caplog.records if "price_unknown" in r.getMessage()]
        assert len(warnings) == 1


# --- disconnect ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "k"), [("deepseek-reasoning", 8), ("anthropic-thinking", 5)]
)
async def test_browser_disconnect_closes_upstream_within_100ms(
    database_url: str, scenario: str, k: int
) -> None:
    streamed_case = fixture_case(scenario)
    model = streamed_case.model
    async with FakeUpstream() as fake:
        # slow, and held open at the end: the generation is still running when we leave
        fake.enqueue(FakeResponse.sse(streamed_case.body(), delay=0.05, hold_open=True))
        env = gateway_env(fake, TURNGATE_ON_DISCONNECT="cancel")
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            url = f"/v1/threads/{thread}/turns"
            stream = Stream(0, {})
            async with client.stream("POST", url, json=turn(model)) as response:
                stream.status, stream.headers = response.status_code, dict(response.headers)
                await parse_sse(response.aiter_lines(), stream, limit=k)
                left = time.monotonic()  # the browser goes away now
            req = fake.requests[0]
            gone = await req.wait_disconnected(within=1.0)
            print(f"upstream closed {1000 * (gone - left):.1f} ms after the browser left")
            assert gone - left < 0.1, f"upstream closed {1000 * (gone - left):.0f} ms after"
            assert not req.completed
            validate_ui_stream(stream, complete=False)
            assistant = await wait_final(client, thread)
            rows = await usage_rows(client, thread)
    assert assistant["status"] == "cancelled"
    streamed = stream.reasoning or stream.text
    stored = "".join(p.get("text", "") for p in assistant["content"])
    assert streamed and stored.startswith(streamed)
    # Neither provider had sent final figures: the row is an estimate, and says so.
    assert len(rows) == 1
    assert rows[0]["estimated"] is True
    assert rows[0]["completion_tokens"] == estimate_tokens(len(stored))
    if model.startswith("anthropic"):
        # ... but the input tokens Anthropic reported when its stream opened are real.
        assert streamed_case.first_usage is not None
        assert rows[0]["prompt_tokens"] == streamed_case.first_usage[0]


# --- third-party adapter -----------------------------------------------------------


async def test_entry_point_adapter_end_to_end(database_url: str, tmp_path: Path) -> None:
    from tests.test_adapter_third_party import ensure_installed

    ensure_installed(tmp_path)
    env = {"TURNGATE_PRICES": json.dumps(PRICES), "ECHO2_PREFIX": "echo:"}
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        assert "echo2" in gw.ctx.adapters.names
        thread = await gw.new_thread(client)
        body = turn("echo2:v1", "one two three")
        s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns", json=body)
        validate_ui_stream(s)
        assert s.text == "echo: three two one "
        assistant = await wait_final(client, thread)
        rows = await usage_rows(client, thread)
    assert type(gw.ctx.adapters.get("echo2")).__module__ == "turngate_echo2"
    assert assistant["status"] == "complete"
    assert assistant["content"] == [{"type": "text", "text": "echo: three two one "}]
    assert len(rows) == 1
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (3, 4)
    assert rows[0]["cost_micros"] == cost("echo2", 3, 4)
    assert rows[0]["estimated"] is False


# --- history ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [("openai-text", "openai-single-tool"), ("anthropic-text", "anthropic-tool-use")],
)
async def test_second_turn_sends_the_first_turn(database_url: str, first: str, second: str) -> None:
    model, first_text = fixture_case(first).model, fixture_case(first).text
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(fixture_case(first).body(), delay=0.001),
                     FakeResponse.sse(fixture_case(second).body(), delay=0.001))
        async with run_gateway(database_url, **gateway_env(fake)) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            url = f"/v1/threads/{thread}/turns"
            s1 = await stream_request(client, "POST", url, json=turn(model, "What's the weather?"))
            validate_ui_stream(s1)
            await wait_final(client, thread)
            s2 = await stream_request(client, "POST", url, json=turn(model, "And tomorrow?"))
            validate_ui_stream(s2)
            await wait_final(client, thread)
            msgs = await messages(client, thread)
    assert len(fake.requests) == 2
    assert fake.requests[0].json["messages"] == [
        {"role": "user", "content": "What's the weather?"}
    ]
    assert fake.requests[1].json["messages"] == [
        {"role": "user", "content": "What's the weather?"},
        {"role": "assistant", "content": first_text},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert [m["status"] for m in msgs if m["role"] == "assistant"] == ["complete", "complete"]


# --- errors before and around the upstream ------------------------------------------


async def test_unknown_adapter_is_400_naming_the_available_ones(database_url: str) -> None:
    async with FakeUpstream() as fake:
        async with run_gateway(database_url, **gateway_env(fake)) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            r = await client.post(f"/v1/threads/{thread}/turns", json=turn("nope:some-model"))
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "unknown_adapter"
            for name in ("scripted", "openai", "anthropic"):
                assert name in error["message"]
            assert "nope" in error["message"]
            assert await messages(client, thread) == []
            assert await usage_rows(client, thread) == []
    assert fake.requests == []


@pytest.mark.parametrize("model", ["openai:gpt-4o", "anthropic:claude-sonnet-4-5"])
async def test_upstream_401_is_a_safe_error(
    database_url: str, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = OPENAI_KEY if model.startswith("openai") else ANTHROPIC_KEY
    provider_text = f"Incorrect API key provided: {key}. You can find your API key at x."
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.json(401, {"error": {
            "type": "invalid_request_error", "code": "invalid_api_key",
            "message": provider_text}}))
        async with run_gateway(database_url, **gateway_env(fake)) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                     json=turn(model))
            validate_ui_stream(s)
            assistant = await wait_final(client, thread)
            rows = await usage_rows(client, thread)
    assert len(fake.requests) == 1  # a 401 is not retried
    assert [e["errorText"] for e in s.of_type("error")] == [
        UpstreamStatusError("", 401).safe_message
    ]
    assert s.of_type("finish")[0]["finishReason"] == "error"
    assert assistant["status"] == "error"
    assert assistant["content"] == [
        {"type": "error", "errorText": UpstreamStatusError("", 401).safe_message}
    ]
    assert len(rows) == 1 and rows[0]["estimated"] is True
    everything = json.dumps([e.data for e in s.events]) + json.dumps(assistant) + json.dumps(rows)
    for secret in (key, "Incorrect API key", "find your API key"):
        assert secret not in everything
        assert secret not in caplog.text
    assert "upstream_error" in caplog.text  # the failure itself is logged, safely


async def test_one_retry_on_429_before_anything_streamed(database_url: str) -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.json(429, {"error": {"type": "rate_limit_exceeded"}},
                              headers={"retry-after": "0"}),
            FakeResponse.sse(OPENAI_TEXT.body(), delay=0.001),
        )
        async with run_gateway(database_url, **gateway_env(fake)) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                     json=turn("openai:gpt-4o"))
            validate_ui_stream(s)
            assistant = await wait_final(client, thread)
    assert len(fake.requests) == 2
    assert s.text == OPENAI_TEXT.text and s.of_type("error") == []
    assert assistant["status"] == "complete"


async def test_upstream_unreachable_is_a_safe_error(database_url: str) -> None:
    env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1", "OPENAI_API_KEY": OPENAI_KEY}
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        gw.ctx.adapters.get("openai").retry_delay = 0.01  # type: ignore[attr-defined]
        thread = await gw.new_thread(client)
        s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                 json=turn("openai:gpt-4o"))
        validate_ui_stream(s)
        assistant = await wait_final(client, thread)
    assert [e["errorText"] for e in s.of_type("error")] == [
        "The model provider could not be reached."
    ]
    assert assistant["status"] == "error"
    assert "127.0.0.1" not in json.dumps([e.data for e in s.events])


async def test_history_after_tool_turn_keeps_text_parts_apart(database_url: str) -> None:
    """An assistant turn with text, tool calls and more text is sent back as its text
    parts separated by a blank line (not glued into one run-on sentence); the
    calls are not sent (no tool results to pair them with in the Messages API)."""
    tools = fixture_case("anthropic-server-tool")
    model = tools.model
    async with FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.sse(tools.body(), delay=0.001),
            FakeResponse.sse(fixture_case("anthropic-text").body(), delay=0.001),
        )
        async with run_gateway(database_url, **gateway_env(fake)) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            url = f"/v1/threads/{thread}/turns"
            validate_ui_stream(await stream_request(client, "POST", url, json=turn(model, "USD?")))
            await wait_final(client, thread)
            validate_ui_stream(await stream_request(client, "POST", url, json=turn(model, "Ok")))
            await wait_final(client, thread)
    assert fake.requests[1].json["messages"] == [
        {"role": "user", "content": "USD?"},
        {"role": "assistant", "content":
            "I'll search for today's ferry timetable first."
            "\n\nFound it. Now I'll ask the booking tool for seats."},
        {"role": "user", "content": "Ok"},
    ]


PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNk"
         "YAAAAAYAAjCB0C8AAAAASUVORK5CYII=")


@pytest.mark.parametrize("model", ["openai:gpt-4o", "anthropic:claude-sonnet-4-5"])
async def test_user_images_reach_the_upstream(database_url: str, model: str) -> None:
    scenario = "openai-text" if model.startswith("openai") else "anthropic-text"
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(fixture_case(scenario).body(), delay=0.001))
        async with run_gateway(database_url, **gateway_env(fake)) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            body = {**turn(model, "What is this?"), "images": [PIXEL]}
            s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns", json=body)
            validate_ui_stream(s)
            await wait_final(client, thread)
    content = fake.requests[0].json["messages"][-1]["content"]
    if model.startswith("openai"):
        assert content == [{"type": "text", "text": "What is this?"},
                           {"type": "image_url", "image_url": {"url": PIXEL}}]
    else:
        media, _, data = PIXEL[len("data:"):].partition(";base64,")
        assert content == [{"type": "text", "text": "What is this?"},
                           {"type": "image", "source": {"type": "base64", "media_type": media,
                                                        "data": data}}]


async def test_upstream_5xx_twice_is_retried_once_then_a_safe_error(database_url: str) -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(*[FakeResponse.json(503, {"error": {"type": "overloaded_error",
                                                         "message": "internal detail"}},
                                         headers={"retry-after": "0"})] * 2)
        async with run_gateway(database_url, **gateway_env(fake)) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                     json=turn("anthropic:claude-sonnet-4-5"))
            validate_ui_stream(s)
            assistant = await wait_final(client, thread)
    assert len(fake.requests) == 2
    assert [e["errorText"] for e in s.of_type("error")] == [
        UpstreamStatusError("", 503).safe_message
    ]
    assert "internal detail" not in json.dumps([e.data for e in s.events])
    assert assistant["status"] == "error"


async def test_disconnect_before_the_first_token_closes_upstream(database_url: str) -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(b"", hold_open=True))  # headers, then silence
        env = gateway_env(fake, TURNGATE_ON_DISCONNECT="cancel")
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            async with client.stream("POST", f"/v1/threads/{thread}/turns",
                                     json=turn("openai:gpt-4o")) as response:
                stream = Stream(response.status_code, dict(response.headers))
                await parse_sse(response.aiter_lines(), stream, limit=2)  # start, start-step
                await fake.wait_for_request()
                left = time.monotonic()
            gone = await fake.requests[0].wait_disconnected(within=1.0)
            assert gone - left < 0.1
            assistant = await wait_final(client, thread)
    assert assistant["status"] == "cancelled"
    assert assistant["content"] == [{"type": "status", "text": "(no text response)"}]


async def test_disconnect_during_the_retry_wait_sends_no_second_request(
    database_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="turngate.adapters")
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.json(429, {"error": {"type": "rate_limit"}},
                                       headers={"retry-after": "2"}))
        env = gateway_env(fake, TURNGATE_ON_DISCONNECT="cancel")
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            async with client.stream("POST", f"/v1/threads/{thread}/turns",
                                     json=turn("openai:gpt-4o")) as response:
                s = Stream(response.status_code, dict(response.headers))
                await parse_sse(response.aiter_lines(), s, limit=2)
                await fake.wait_for_request()
                # The 429 came back and the adapter waits out its Retry-After.
                await until(lambda: [r for r in caplog.records
                                     if r.getMessage().startswith("upstream_retry")],
                            within=5, what="the upstream_retry log line")
            validate_ui_stream(s, complete=False)
            assistant = await wait_final(client, thread)
            # An observation window, not a wait: a retry would come 2 s after the 429.
            await anyio.sleep(2.2)
    assert len(fake.requests) == 1
    assert assistant["status"] == "cancelled"


async def test_upstream_cut_mid_stream_keeps_the_partial_reply(database_url: str) -> None:
    body = OPENAI_TEXT.body()
    cut = body[: body.index(b'" sea"')]  # ends inside an event: no usage, no [DONE]
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(cut, delay=0.001))
        async with run_gateway(database_url, **gateway_env(fake)) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                     json=turn("openai:gpt-4o"))
            validate_ui_stream(s)
            assistant = await wait_final(client, thread)
            rows = await usage_rows(client, thread)
    assert [e["errorText"] for e in s.of_type("error")] == [UpstreamProtocolError.safe_message]
    assert assistant["status"] == "error"
    assert s.text and str(OPENAI_TEXT.text).startswith(s.text)
    reason = {"type": "error", "errorText": UpstreamProtocolError.safe_message}
    assert assistant["content"] == [{"type": "text", "text": s.text}, reason]
    assert rows[0]["estimated"] is True
