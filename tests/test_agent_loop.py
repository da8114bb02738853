"""The agent loop: the gateway runs the tools the model calls and calls the model again.

Real MCP servers (``mcp-server-time`` over stdio; ``tests/mcp_servers.py`` over
streamable HTTP and over stdio), real HTTP to a real gateway on both databases,
and fake OpenAI and Anthropic upstreams that call a tool on the first request and
answer on the second: the second request must carry the real tool result in the
provider's own form; the stream has one step per model call; the stored row holds
the call with its result and the final text; one usage row sums both calls.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.turn.tools import MAX_OUTPUT_CHARS, cap_output, max_steps_text
from tests.fixtures_server import GatewayServer, run_gateway
from tests.mcp_servers import http_server
from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.upstream_fakes import FakeResponse, FakeUpstream

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
TIME_SERVER = str(Path(sys.executable).parent / "mcp-server-time")
TIME = {"command": TIME_SERVER, "args": ["--local-timezone", "UTC"]}
TEST_SERVER: dict[str, Any] = {"command": sys.executable, "args": ["-m", "tests.mcp_servers"],
                               "cwd": str(ROOT)}
PRICES = {"gpt-4o": {"input": 2.5, "output": 10}, "claude-sonnet-4": {"input": 3, "output": 15}}


def mcp_env(servers: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"TURNGATE_MCP_CONFIG": json.dumps({"mcpServers": servers}), **extra}


# -- fake provider streams -----------------------------------------------------------


def openai_sse(chunks: list[dict[str, Any]], usage: tuple[int, int]) -> bytes:
    base = {"id": "chatcmpl-agent", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o"}
    lines = [{**base, "choices": [c]} for c in chunks]
    lines.append({**base, "choices": [],
                  "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}})
    return b"".join(b"data: " + json.dumps(x).encode() + b"\n\n" for x in lines) + \
        b"data: [DONE]\n\n"


def openai_tool_call(call_id: str, name: str, args: dict[str, Any]) -> bytes:
    text = json.dumps(args)
    return openai_sse([
        {"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None},
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                               "function": {"name": name, "arguments": ""}}]},
         "finish_reason": None},
        {"index": 0, "delta": {"tool_calls": [{"index": 0,
                                               "function": {"arguments": text[:5]}}]},
         "finish_reason": None},
        {"index": 0, "delta": {"tool_calls": [{"index": 0,
                                               "function": {"arguments": text[5:]}}]},
         "finish_reason": None},
        {"index": 0, "delta": {}, "finish_reason": "tool_calls"},
    ], (40, 12))


def openai_text(text: str) -> bytes:
    return openai_sse([
        {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None},
        {"index": 0, "delta": {}, "finish_reason": "stop"},
    ], (90, 7))


def anthropic_sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n"
        for e in events
    )


def anthropic_message(blocks: list[dict[str, Any]], stop: str, usage: tuple[int, int]) -> bytes:
    events: list[dict[str, Any]] = [{"type": "message_start", "message": {
        "id": "msg_agent", "type": "message", "role": "assistant", "model": "claude-sonnet-4",
        "content": [], "usage": {"input_tokens": usage[0], "output_tokens": 1}}}]
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            events += [
                {"type": "content_block_start", "index": i,
                 "content_block": {"type": "text", "text": ""}},
                {"type": "content_block_delta", "index": i,
                 "delta": {"type": "text_delta", "text": block["text"]}},
            ]
        else:
            text = json.dumps(block["input"])
            events += [
                {"type": "content_block_start", "index": i, "content_block": {
                    "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}},
                {"type": "content_block_delta", "index": i,
                 "delta": {"type": "input_json_delta", "partial_json": text[:4]}},
                {"type": "content_block_delta", "index": i,
                 "delta": {"type": "input_json_delta", "partial_json": text[4:]}},
            ]
        events.append({"type": "content_block_stop", "index": i})
    events += [
        {"type": "message_delta", "delta": {"stop_reason": stop},
         "usage": {"output_tokens": usage[1]}},
        {"type": "message_stop"},
    ]
    return anthropic_sse(events)


# -- helpers -------------------------------------------------------------------------


async def run_turn(gw: GatewayServer, client: httpx.AsyncClient, model: str,
                   text: str = "What time is it in Tokyo?") -> tuple[str, str, Stream]:
    thread = await gw.new_thread(client)
    turn_id = uuid.uuid4().hex
    stream = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                  json={"turn_id": turn_id, "text": text, "model": model})
    return thread, turn_id, stream


async def assistant(client: httpx.AsyncClient, thread: str) -> dict[str, Any]:
    r = await client.get(f"/v1/threads/{thread}/messages")
    assert r.status_code == 200, r.text
    rows = [m for m in r.json()["messages"] if m["role"] == "assistant"]
    return dict(rows[-1])


async def usage_rows(gw: GatewayServer, thread: str) -> list[Any]:
    rows, _ = await gw.store.list_usage(gw.user_id, thread_id=thread, limit=10)
    return list(rows)


def same_events(a: Stream, b: Stream) -> bool:
    """The same events with the same ids (JSON compared as values: PostgreSQL's jsonb
    stores an object's keys in its own order). Transient chunks (a new thread's
    ``data-title``) are sent live only, never replayed: they are left out."""
    def parsed(s: Stream) -> list[tuple[str | None, Any]]:
        out = [(e.id, e.data if e.data == "[DONE]" else json.loads(e.data)) for e in s.events]
        return [(i, d) for i, d in out if not (isinstance(d, dict) and d.get("transient"))]
    return parsed(a) == parsed(b)


def kinds(stream: Stream) -> list[str]:
    return [c["type"] for c in stream.chunks]


# -- the loop with the scripted adapter ------------------------------------------------


async def test_scripted_turn_runs_a_stdio_tool_and_answers(database_url: str) -> None:
    model = "scripted:call=time__get_current_time,arg.timezone=Asia/Tokyo"
    env = mcp_env({"time": TIME}, TURNGATE_RELAY_RETENTION_SECONDS="0")  # replays: the row
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        thread, _, stream = await run_turn(gw, client, model)
        validate_ui_stream(stream)
        assert kinds(stream).count("start-step") == 2
        assert kinds(stream).count("finish-step") == 2
        [call] = stream.of_type("tool-input-available")
        assert call["toolName"] == "time__get_current_time"
        assert call["input"] == {"timezone": "Asia/Tokyo"}
        [output] = stream.of_type("tool-output-available")
        assert output["toolCallId"] == call["toolCallId"]
        assert output["output"]["timezone"] == "Asia/Tokyo"
        assert output["output"]["datetime"].endswith("+09:00")
        # The output came before the second step, and the answer quotes it.
        order = kinds(stream)
        assert order.index("tool-output-available") < len(order) - order[::-1].index(
            "start-step") - 1
        assert stream.text.startswith("time__get_current_time answered: {")
        assert '"timezone": "Asia/Tokyo"' in stream.text

        row = await assistant(client, thread)
        assert row["status"] == "complete"
        tool, text = row["content"]
        assert tool["type"] == "tool-call" and tool["result"] == output["output"]
        assert "state" not in tool and "step" not in tool
        assert text == {"type": "text", "text": stream.text, "step": 1}
        [usage] = await usage_rows(gw, thread)
        assert len(usage.call_details) == 2
        assert usage.total_tokens == sum(c["total_tokens"] for c in usage.call_details)
        assert not usage.estimated
        assert stream.of_type("finish")[0]["messageMetadata"]["usage"]["totalTokens"] == \
            usage.total_tokens

        # The stored turn replays as it streamed (same chunks, same ids).
        r = await stream_request(client, "GET",
                                 f"/v1/threads/{thread}/turns/{row['turn_id']}/stream")
        assert same_events(r, stream)


async def test_parallel_calls_run_concurrently_and_errors_reach_the_model(
    database_url: str,
) -> None:
    """Two calls of one step run at once (two ``hang`` calls end in one timeout, not
    two); a tool error is a ``tool-output-error`` the model reads as ``Error:``."""
    servers = {"t": {**TEST_SERVER, "timeoutSeconds": 1.5}}
    async with run_gateway(database_url, **mcp_env(servers)) as gw, gw.client() as client:
        t0 = anyio_time()
        thread, _, stream = await run_turn(gw, client, "scripted:call=t__hang,parallel=2")
        elapsed = anyio_time() - t0
        validate_ui_stream(stream)
        errors = stream.of_type("tool-output-error")
        assert len(errors) == 2
        assert all(e["errorText"] == "tool 't__hang' did not answer within 1.5 s" for e in errors)
        assert elapsed < 2.9, f"the calls ran one after the other ({elapsed:.2f} s)"
        assert stream.text.count("t__hang answered: Error: tool 't__hang' did not answer") == 2
        row = await assistant(client, thread)
        assert [p.get("errorText") for p in row["content"][:2]] == [e["errorText"]
                                                                     for e in errors]

        thread, _, stream = await run_turn(gw, client, "scripted:call=t__fail,arg.reason=nope")
        [error] = stream.of_type("tool-output-error")
        assert error["errorText"] == "tool 't__fail' failed: Error executing tool fail"
        assert stream.text == f"t__fail answered: Error: {error['errorText']}"


def anyio_time() -> float:
    import time

    return time.monotonic()


async def test_max_steps_ends_with_an_error_sentence(database_url: str) -> None:
    env = mcp_env({"t": TEST_SERVER}, TURNGATE_MAX_STEPS="2")
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        thread, _, stream = await run_turn(gw, client,
                                           "scripted:call=t__echo,arg.text=hi,rounds=5")
        validate_ui_stream(stream)
        assert kinds(stream).count("start-step") == 2
        assert len(stream.of_type("tool-output-available")) == 2
        assert stream.of_type("error")[0]["errorText"] == max_steps_text(2)
        row = await assistant(client, thread)
        assert row["status"] == "error"
        assert row["content"][-1] == {"type": "error", "errorText": max_steps_text(2)}
        [usage] = await usage_rows(gw, thread)
        assert len(usage.call_details) == 2


def test_large_outputs_are_capped() -> None:
    assert cap_output("x" * MAX_OUTPUT_CHARS) == "x" * MAX_OUTPUT_CHARS
    assert cap_output({"a": 1}) == {"a": 1}
    long = cap_output({"text": "y" * 40_000})
    assert isinstance(long, str) and long.startswith('{"text": "yyy')
    assert long.endswith(f"\n[output truncated: 40012 characters, the first {MAX_OUTPUT_CHARS} "
                         "shown]")
    assert len(long) < MAX_OUTPUT_CHARS + 80


async def test_a_large_output_is_capped_in_the_turn(database_url: str) -> None:
    servers = {"t": {**TEST_SERVER, "env": {"BIG": "z" * 33_000}}}
    model = "scripted:call=t__environ,arg.name=BIG"
    async with run_gateway(database_url, **mcp_env(servers)) as gw, gw.client() as client:
        thread, _, stream = await run_turn(gw, client, model)
        assert stream.status == 200, stream.body
        [output] = stream.of_type("tool-output-available")
        assert output["output"] == "z" * 32_000 + (
            "\n[output truncated: 33000 characters, the first 32000 shown]")
        row = await assistant(client, thread)
        assert row["content"][0]["result"] == output["output"]


# -- real providers' wire formats (fake upstreams) -------------------------------------


async def test_openai_upstream_gets_the_real_tool_result(database_url: str) -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(openai_tool_call(
            "call_tokyo", "time__get_current_time", {"timezone": "Asia/Tokyo"})))
        fake.enqueue(FakeResponse.sse(openai_text("It is late evening in Tokyo.")))
        env = mcp_env({"time": TIME}, OPENAI_BASE_URL=fake.url + "/v1", OPENAI_API_KEY="k",
                      TURNGATE_PRICES=json.dumps(PRICES))
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            thread, _, stream = await run_turn(gw, client, "openai:gpt-4o")
            validate_ui_stream(stream)
            assert kinds(stream).count("start-step") == 2
            [output] = stream.of_type("tool-output-available")
            assert output["toolCallId"] == "call_tokyo"
            assert output["output"]["datetime"].endswith("+09:00")

            first, second = fake.requests
            assert [t["function"]["name"] for t in first.json["tools"]] == [
                "time__convert_time", "time__get_current_time"]
            messages = second.json["messages"]
            assert messages[-2] == {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": "call_tokyo", "type": "function", "function": {
                    "name": "time__get_current_time",
                    "arguments": '{"timezone": "Asia/Tokyo"}'}}]}
            assert messages[-1]["role"] == "tool" and messages[-1]["tool_call_id"] == "call_tokyo"
            assert json.loads(messages[-1]["content"]) == output["output"]

            row = await assistant(client, thread)
            assert row["status"] == "complete"
            assert row["content"][0]["result"] == output["output"]
            assert row["content"][1] == {"type": "text", "step": 1,
                                         "text": "It is late evening in Tokyo."}
            [usage] = await usage_rows(gw, thread)
            assert [(c["prompt_tokens"], c["completion_tokens"]) for c in usage.call_details] \
                == [(40, 12), (90, 7)]
            assert (usage.prompt_tokens, usage.completion_tokens) == (130, 19)
            assert usage.cost_micros == sum(c["cost_micros"] for c in usage.call_details) \
                == round(130 * 2.5 + 19 * 10)


async def test_anthropic_upstream_gets_the_real_tool_result_over_http_mcp(
    database_url: str,
) -> None:
    async with FakeUpstream() as fake, http_server() as web:
        fake.enqueue(FakeResponse.sse(anthropic_message(
            [{"type": "text", "text": "Let me add them."},
             {"type": "tool_use", "id": "toolu_add", "name": "web__add",
              "input": {"a": 2, "b": 40}}], "tool_use", (300, 20))))
        fake.enqueue(FakeResponse.sse(anthropic_message(
            [{"type": "text", "text": "The sum is 42."}], "end_turn", (350, 6))))
        env = mcp_env({"web": {"url": web.url}}, ANTHROPIC_BASE_URL=fake.url,
                      ANTHROPIC_API_KEY="k", TURNGATE_PRICES=json.dumps(PRICES))
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            thread, _, stream = await run_turn(gw, client, "anthropic:claude-sonnet-4",
                                               "What is 2 + 40?")
            validate_ui_stream(stream)
            assert kinds(stream).count("start-step") == 2
            [output] = stream.of_type("tool-output-available")
            assert output == {"type": "tool-output-available", "toolCallId": "toolu_add",
                              "output": {"sum": 42}}
            first, second = fake.requests
            assert "web__add" in [t["name"] for t in first.json["tools"]]
            messages = second.json["messages"]
            assert messages[-2] == {"role": "assistant", "content": [
                {"type": "text", "text": "Let me add them."},
                {"type": "tool_use", "id": "toolu_add", "name": "web__add",
                 "input": {"a": 2, "b": 40}}]}
            assert messages[-1] == {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_add", "content": '{"sum": 42}'}]}

            row = await assistant(client, thread)
            assert [p["type"] for p in row["content"]] == ["text", "tool-call", "text"]
            assert row["content"][1]["result"] == {"sum": 42}
            assert row["content"][2] == {"type": "text", "text": "The sum is 42.", "step": 1}
            assert stream.text == "Let me add them.The sum is 42."
            [usage] = await usage_rows(gw, thread)
            assert [(c["prompt_tokens"], c["completion_tokens"]) for c in usage.call_details] \
                == [(300, 20), (350, 6)]
            assert usage.total_tokens == 676


async def test_parallel_outputs_replay_as_they_streamed(database_url: str) -> None:
    """Outputs of one step stream as the tools finish; the stored turn replays the
    same chunks with the same ids (the event map keeps their order)."""
    env = mcp_env({"t": TEST_SERVER}, TURNGATE_RELAY_RETENTION_SECONDS="0")  # replays: the row
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        thread, turn_id, stream = await run_turn(
            gw, client, "scripted:call=t__echo,arg.text=hi,parallel=3,rounds=2")
        validate_ui_stream(stream)
        assert kinds(stream).count("start-step") == 3
        assert len(stream.of_type("tool-output-available")) == 6
        r = await stream_request(client, "GET", f"/v1/threads/{thread}/turns/{turn_id}/stream")
        assert same_events(r, stream)
        row = await assistant(client, thread)
        assert [p.get("step", 0) for p in row["content"]] == [0, 0, 0, 1, 1, 1, 2]
