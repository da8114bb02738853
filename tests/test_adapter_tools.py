"""Tools in the adapters' requests: the tool list in each provider's form, and tool
calls with their results sent back in the provider's own form, in the turn (a step
after a tool call) and in the history of later turns.

The two-step tests run a real MCP tool (``mcp-server-time`` over stdio) between
two requests to a fake upstream: the second request carries the tool's real
output. The scripted adapter's ``call=`` script is tested the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.tools.config import parse_config
from gateway.tools.servers import ToolHub
from llm_adapters.anthropic import AnthropicAdapter, to_anthropic_messages
from llm_adapters.base import AdapterRequest, ChatMessage, ToolSpec
from llm_adapters.events import Finish, TextDelta, ToolCallStart, Usage
from llm_adapters.openai import OpenAIAdapter, to_openai_messages
from llm_adapters.scripted import ScriptedAdapter, parse_options
from tests.upstream_fakes import FakeResponse, FakeUpstream, fixture, run_adapter

pytestmark = pytest.mark.anyio

TIME_SERVER = str(Path(sys.executable).parent / "mcp-server-time")
TIME_CONFIG = parse_config({"mcpServers": {"time": {
    "command": TIME_SERVER, "args": ["--local-timezone", "UTC"]}}})
SPEC = ToolSpec("lookup", "Look a thing up",
                {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]})


def sse(*frames: tuple[str | None, dict[str, Any]]) -> bytes:
    out = []
    for event, data in frames:
        head = f"event: {event}\n" if event else ""
        out.append(f"{head}data: {json.dumps(data)}\n\n")
    return "".join(out).encode()


def openai_tool_call(call_id: str, name: str, args: str) -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> Any:
        return (None, {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                       "usage": usage})

    return sse(
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                               "function": {"name": name, "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[:5]}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[5:]}}]}),
        chunk({}, "tool_calls", {"prompt_tokens": 50, "completion_tokens": 9}),
    ) + b"data: [DONE]\n\n"


def anthropic_tool_use(call_id: str, name: str, args: str) -> bytes:
    return sse(
        ("message_start", {"type": "message_start", "message": {
            "model": "claude-x", "usage": {"input_tokens": 40, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "tool_use", "id": call_id,
                                                   "name": name, "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "input_json_delta", "partial_json": args}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                           "usage": {"output_tokens": 12}}),
        ("message_stop", {"type": "message_stop"}),
    )


def user(text: str) -> ChatMessage:
    return ChatMessage("user", [{"type": "text", "text": text}])


async def run_with_tool(adapter: Any, fake: FakeUpstream, hub: ToolHub,
                        model: str) -> tuple[dict[str, Any], Any]:
    """Step 1: the model calls the tool; run it through the hub; step 2 with the result."""
    history = [user("What time is it in Tokyo?")]
    first = await run_adapter(adapter, AdapterRequest(model, history, tools=hub.specs))
    assert first.error is None and first.of(Finish)[-1].reason == "tool-calls"
    [(call_id, name, args_text)] = first.tool_calls
    result = await hub.call(name, json.loads(args_text))
    answered = ChatMessage("assistant", [{
        "type": "tool-call", "toolCallId": call_id, "toolName": name,
        "args": json.loads(args_text), "argsText": args_text, "result": result}])
    second = await run_adapter(adapter, AdapterRequest(model, [*history, answered],
                                                       tools=hub.specs))
    assert second.error is None and second.text
    return fake.requests[1].json, result


async def test_openai_sends_tools_and_the_real_tool_result() -> None:
    args = json.dumps({"timezone": "Asia/Tokyo"})
    async with ToolHub(TIME_CONFIG) as hub, FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(openai_tool_call("call_T1", "time__get_current_time", args)),
                     FakeResponse.sse(fixture("openai-text-usage.sse")))
        adapter = OpenAIAdapter({"OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "k"})
        async with adapter:
            body, result = await run_with_tool(adapter, fake, hub, "gpt-4o")
    first = fake.requests[0].json
    tool = next(t for t in first["tools"] if t["function"]["name"] == "time__get_current_time")
    assert tool == {"type": "function", "function": {
        "name": "time__get_current_time",
        "description": "Get current time in a specific timezone",
        "parameters": hub.get("time__get_current_time").input_schema}}  # type: ignore[union-attr]
    assert [t["function"]["name"] for t in first["tools"]] == [
        "time__convert_time", "time__get_current_time"]
    assert result["timezone"] == "Asia/Tokyo"
    assert body["messages"] == [
        {"role": "user", "content": "What time is it in Tokyo?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_T1", "type": "function",
            "function": {"name": "time__get_current_time", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_T1", "content": json.dumps(result)},
    ]
    assert len(body["tools"]) == 2


async def test_anthropic_sends_tools_and_the_real_tool_result() -> None:
    args = json.dumps({"timezone": "Asia/Tokyo"})
    async with ToolHub(TIME_CONFIG) as hub, FakeUpstream() as fake:
        fake.enqueue(
            FakeResponse.sse(anthropic_tool_use("toolu_T1", "time__get_current_time", args)),
            FakeResponse.sse(fixture("anthropic-text-usage.sse")))
        adapter = AnthropicAdapter({"ANTHROPIC_BASE_URL": fake.url, "ANTHROPIC_API_KEY": "k"})
        async with adapter:
            body, result = await run_with_tool(adapter, fake, hub, "claude-x")
        schema = dict(hub.get("time__get_current_time").input_schema)  # type: ignore[union-attr]
    first = fake.requests[0].json
    assert first["tools"][1] == {"name": "time__get_current_time",
                                 "description": "Get current time in a specific timezone",
                                 "input_schema": schema}
    assert body["messages"] == [
        {"role": "user", "content": "What time is it in Tokyo?"},
        {"role": "assistant", "content": [{
            "type": "tool_use", "id": "toolu_T1", "name": "time__get_current_time",
            "input": {"timezone": "Asia/Tokyo"}}]},
        {"role": "user", "content": [{
            "type": "tool_result", "tool_use_id": "toolu_T1", "content": json.dumps(result)}]},
    ]


# A finished agent turn in the history: text, two parallel calls (one failed), more
# text, a third call, the final text; then the next user turn.
AGENT_TURN = ChatMessage("assistant", [
    {"type": "reasoning", "text": "thinking"},
    {"type": "text", "text": "Let me check."},
    {"type": "tool-call", "toolCallId": "c1", "toolName": "lookup", "args": {"q": "a"},
     "argsText": "{\"q\": \"a\"}", "result": {"found": 1}},
    {"type": "tool-call", "toolCallId": "c2", "toolName": "lookup", "args": {"q": "b"},
     "argsText": "{\"q\": \"b\"}", "errorText": "tool 'lookup' did not answer within 5 s"},
    {"type": "text", "text": "One more."},
    {"type": "tool-call", "toolCallId": "c3", "toolName": "lookup", "args": {"q": "c"},
     "argsText": "", "result": "plain text"},
    {"type": "tool-call", "toolCallId": "c4", "toolName": "lookup", "args": {}},  # unanswered
    {"type": "text", "text": "Done."},
])
HISTORY = [user("first"), AGENT_TURN, user("second")]


def test_openai_history_with_steps() -> None:
    assert to_openai_messages(HISTORY) == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "lookup", "arguments": "{\"q\": \"a\"}"}},
            {"id": "c2", "type": "function",
             "function": {"name": "lookup", "arguments": "{\"q\": \"b\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"found\": 1}"},
        {"role": "tool", "tool_call_id": "c2",
         "content": "Error: tool 'lookup' did not answer within 5 s"},
        {"role": "assistant", "content": "One more.", "tool_calls": [
            {"id": "c3", "type": "function",
             "function": {"name": "lookup", "arguments": "{\"q\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "c3", "content": "plain text"},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "second"},
    ]


def test_anthropic_history_with_steps() -> None:
    assert to_anthropic_messages(HISTORY) == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "c1", "name": "lookup", "input": {"q": "a"}},
            {"type": "tool_use", "id": "c2", "name": "lookup", "input": {"q": "b"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "{\"found\": 1}"},
            {"type": "tool_result", "tool_use_id": "c2", "is_error": True,
             "content": "Error: tool 'lookup' did not answer within 5 s"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "One more."},
            {"type": "tool_use", "id": "c3", "name": "lookup", "input": {"q": "c"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c3", "content": "plain text"}]},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "second"},
    ]


def test_anthropic_next_user_turn_joins_the_tool_results() -> None:
    # A turn that ended right after its tool results (e.g. cut at the step limit):
    # the next user text joins the results, so the roles still alternate.
    ended = ChatMessage("assistant", [
        {"type": "tool-call", "toolCallId": "c1", "toolName": "lookup", "args": {"q": "a"},
         "result": 1}])
    assert to_anthropic_messages([user("first"), ended, user("and now?")]) == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "c1", "name": "lookup", "input": {"q": "a"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "1"},
            {"type": "text", "text": "and now?"}]},
    ]


def test_provider_executed_calls_stay_out_of_the_history() -> None:
    # A call the provider ran itself (an Anthropic server tool) is not sent back as
    # a client tool call: the texts around it form one assistant message.
    served = ChatMessage("assistant", [
        {"type": "text", "text": "Searching."},
        {"type": "tool-call", "toolCallId": "srvtoolu_1", "toolName": "web_search",
         "args": {"q": "x"}, "result": [{"url": "u"}], "providerExecuted": True},
        {"type": "text", "text": "Found it."}])
    history = [user("first"), served, user("second")]
    expected_text = "Searching.\n\nFound it."
    assert to_anthropic_messages(history)[1] == {"role": "assistant", "content": expected_text}
    assert to_openai_messages(history)[1] == {"role": "assistant", "content": expected_text}


async def test_tools_join_raw_option_tools() -> None:
    raw = {"type": "function", "function": {"name": "raw", "parameters": {"type": "object"}}}
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(fixture("openai-text-usage.sse")),
                     FakeResponse.sse(fixture("openai-text-usage.sse")))
        async with OpenAIAdapter({"OPENAI_BASE_URL": fake.url + "/v1"}) as adapter:
            await run_adapter(adapter, AdapterRequest("m", [user("hi")], {"tools": [raw]},
                                                      tools=(SPEC,)))
            await run_adapter(adapter, AdapterRequest("m", [user("hi")]))
    assert fake.requests[0].json["tools"] == [
        {"type": "function", "function": {"name": "lookup", "description": "Look a thing up",
                                          "parameters": dict(SPEC.input_schema)}}, raw]
    assert "tools" not in fake.requests[1].json  # no tools, no key


# -- the scripted adapter's tool script ------------------------------------------------


async def test_scripted_calls_the_named_tool_then_answers_with_its_result() -> None:
    model = "call=time__get_current_time,arg.timezone=Asia/Tokyo"
    adapter = ScriptedAdapter()
    history = [user("earlier"), ChatMessage("assistant", [{"type": "text", "text": "x"}]),
               user("What time is it?")]
    first = await run_adapter(adapter, AdapterRequest(model, history))
    assert first.error is None
    assert first.tool_calls == [("call_2_1", "time__get_current_time",
                                 "{\"timezone\": \"Asia/Tokyo\"}")]
    assert first.of(Finish) == [Finish("tool-calls")] and len(first.of(Usage)) == 1
    async with ToolHub(TIME_CONFIG) as hub:
        result = await hub.call("time__get_current_time", {"timezone": "Asia/Tokyo"})
    answered = ChatMessage("assistant", [{
        "type": "tool-call", "toolCallId": "call_2_1", "toolName": "time__get_current_time",
        "args": {"timezone": "Asia/Tokyo"}, "result": result}])
    second = await run_adapter(adapter, AdapterRequest(model, [*history, answered]))
    assert second.error is None and second.of(Finish) == [Finish("stop")]
    assert not second.of(ToolCallStart)
    assert second.text == f"time__get_current_time answered: {json.dumps(result)}"
    assert len(second.of(TextDelta)) > 1  # streamed in pieces

    failed = ChatMessage("assistant", [{
        "type": "tool-call", "toolCallId": "call_2_1", "toolName": "time__get_current_time",
        "args": {}, "errorText": "boom"}])
    third = await run_adapter(adapter, AdapterRequest(model, [*history, failed]))
    assert third.text == "time__get_current_time answered: Error: boom"


async def test_scripted_parallel_calls_and_rounds() -> None:
    model = "call=t__add,arg.a=1,arg.b=%2C,parallel=2,rounds=2"
    adapter = ScriptedAdapter()
    history = [user("go")]
    parts: list[dict[str, Any]] = []
    for step in range(2):
        run = await run_adapter(adapter, AdapterRequest(model, [*history,
                                ChatMessage("assistant", parts)] if parts else history))
        calls = run.tool_calls
        assert [c[0] for c in calls] == [f"call_1_{2 * step + 1}", f"call_1_{2 * step + 2}"]
        assert all(json.loads(c[2]) == {"a": 1, "b": ","} for c in calls)
        parts = parts + [{"type": "tool-call", "toolCallId": c[0], "toolName": c[1],
                          "args": json.loads(c[2]), "result": i} for i, c in enumerate(calls)]
    final = await run_adapter(adapter, AdapterRequest(model, [*history,
                              ChatMessage("assistant", parts)]))
    assert final.text == "t__add answered: 0\nt__add answered: 1"


def test_scripted_call_options() -> None:
    opts = parse_options("call=x__y,arg.n=3,arg.s=hello%20world,arg.o=%7B%22k%22%3A1%7D")
    assert opts.call == "x__y" and opts.parallel == 1 and opts.rounds == 1
    assert dict(opts.args) == {"n": 3, "s": "hello world", "o": {"k": 1}}
    with pytest.raises(ValueError, match="call= must name a tool"):
        parse_options("call=")
    with pytest.raises(ValueError, match="parallel"):
        parse_options("call=x,parallel=many")
    with pytest.raises(ValueError, match=r"expected one of .*call, arg\.<name>"):
        parse_options("cal=x")
