"""Client-side tools: declared by the turn, called by the model, run by the client.

A call pauses the turn (``requires_action``) after ``tool-input-available``; the
client's output (``POST .../continue`` with ``toolOutputs``) continues the same
message, and the model gets it in the provider's form with the same tools offered
again. A bad ``tools`` declaration is a 400 that writes nothing.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fixtures_server import run_gateway
from tests.sse_client import stream_request, validate_ui_stream
from tests.test_agent_loop import TEST_SERVER, openai_text, openai_tool_call
from tests.upstream_fakes import FakeResponse, FakeUpstream

pytestmark = pytest.mark.anyio

LOCATION = {"name": "get_location", "description": "Where the user is",
            "inputSchema": {"type": "object", "properties": {"precise": {"type": "boolean"}}}}


async def reply(client: Any, thread: str) -> dict[str, Any]:
    r = await client.get(f"/v1/threads/{thread}/messages")
    return dict([m for m in r.json()["messages"] if m["role"] == "assistant"][-1])


async def usage(client: Any, thread: str) -> list[dict[str, Any]]:
    return list((await client.get("/v1/usage", params={"thread_id": thread})).json()["usage"])


async def test_client_tool_output_continues_the_same_message(database_url: str) -> None:
    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(openai_tool_call("call_loc", "get_location",
                                                       {"precise": True})))
        fake.enqueue(FakeResponse.sse(openai_text("You are in Paris.")))
        env = {"OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "k"}
        async with run_gateway(database_url, **env) as gw, gw.client() as client:
            thread = await gw.new_thread(client)
            first = await stream_request(client, "POST", f"/v1/threads/{thread}/turns", json={
                "turn_id": "t1", "text": "Where am I?", "model": "openai:gpt-4o",
                "tools": [LOCATION]})
            validate_ui_stream(first)
            [call] = first.of_type("tool-input-available")
            assert call["toolName"] == "get_location" and call["input"] == {"precise": True}
            assert not first.of_type("tool-approval-request")
            assert first.of_type("finish")[0]["finishReason"] == "tool-calls"
            assert (await reply(client, thread))["status"] == "requires_action"
            assert fake.requests[0].json["tools"] == [{"type": "function", "function": {
                "name": "get_location", "description": "Where the user is",
                "parameters": LOCATION["inputSchema"]}}]

            second = await stream_request(
                client, "POST", f"/v1/threads/{thread}/turns/t1/continue",
                json={"toolOutputs": [{"toolCallId": "call_loc", "output": {"city": "Paris"}}]})
            validate_ui_stream(second, continues=frozenset({"call_loc"}))
            assert second.chunks[0]["messageId"] == first.chunks[0]["messageId"]
            assert second.of_type("tool-output-available") == [
                {"type": "tool-output-available", "toolCallId": "call_loc",
                 "output": {"city": "Paris"}}]
            assert second.text == "You are in Paris."
            request = fake.requests[1].json
            assert request["tools"] == fake.requests[0].json["tools"]
            assert request["messages"][-1] == {"role": "tool", "tool_call_id": "call_loc",
                                               "content": '{"city": "Paris"}'}
            row = await reply(client, thread)
            assert row["status"] == "complete"
            assert row["content"][0]["result"] == {"city": "Paris"}
            assert row["content"][1] == {"type": "text", "text": "You are in Paris.", "step": 1}
            [used] = await usage(client, thread)
            assert [(c["prompt_tokens"], c["completion_tokens"])
                    for c in used["call_details"]] == [(40, 12), (90, 7)]


async def test_client_tool_error_reaches_the_model(database_url: str) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        first = await stream_request(client, "POST", f"/v1/threads/{thread}/turns", json={
            "turn_id": "t1", "text": "where?", "model": "scripted:call=get_location",
            "tools": [LOCATION]})
        [call] = first.of_type("tool-input-available")
        second = await stream_request(
            client, "POST", f"/v1/threads/{thread}/turns/t1/continue",
            json={"toolOutputs": [{"toolCallId": call["toolCallId"],
                                   "errorText": "permission denied"}]})
        validate_ui_stream(second, continues=frozenset({call["toolCallId"]}))
        assert second.of_type("tool-output-error")[0]["errorText"] == "permission denied"
        assert second.text == "get_location answered: Error: permission denied"
        row = await reply(client, thread)
        assert row["content"][0]["errorText"] == "permission denied"


@pytest.mark.parametrize("tools,message", [
    ("nope", "tools must be an array, not a string"),
    ([{"name": "has space"}], "tools[0].name 'has space' must match ^[a-zA-Z0-9_-]{1,64}$"),
    ([{"name": "a"}, {"name": "a"}], "tools[1].name 'a' is given twice"),
    ([{"name": "a", "inputSchema": {"type": "string"}}], "tools[0].inputSchema"),
    ([{"name": "a", "description": 5}], "tools[0].description must be a string"),
])
async def test_bad_tools_are_refused_and_write_nothing(
    database_url: str, tools: Any, message: str,
) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        r = await client.post(f"/v1/threads/{thread}/turns", json={
            "turn_id": "t1", "text": "hi", "model": "scripted", "tools": tools})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_tools"
        assert message in r.json()["error"]["message"]
        r = await client.get(f"/v1/threads/{thread}/messages")
        assert r.json()["messages"] == []
        r = await client.post("/api/chat", json={
            "id": thread, "tools": tools,
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text",
                                                                  "text": "hi"}]}]})
        assert r.status_code == 400 and message[1:] in r.text  # a sentence there
        r = await client.get(f"/v1/threads/{thread}/messages")
        assert r.json()["messages"] == []


async def test_a_client_tool_may_not_shadow_a_gateway_tool(database_url: str) -> None:
    env = {"TURNGATE_MCP_CONFIG": json.dumps({"mcpServers": {"t": TEST_SERVER}})}
    async with run_gateway(database_url, **env) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        r = await client.post(f"/v1/threads/{thread}/turns", json={
            "turn_id": "t1", "text": "hi", "model": "scripted",
            "tools": [{"name": "t__echo"}]})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == (
            "tool name 't__echo' is taken by a tool of this gateway's MCP servers; "
            "choose another name")
