"""A tool that needs approval pauses the turn; an answer continues the same message.

Real MCP server (``tests/mcp_servers.py`` over stdio, ``"approval": ["echo"]``),
real HTTP, both databases: the pause (``requires_action``, usage so far, thread
free), approve and deny through ``POST .../continue``, the same ``messageId``,
one usage row counting every call once, a double or concurrent answer continuing
once, and bad answers refused with nothing written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gateway.turn.events import DENIED_TEXT
from tests.fixtures_server import GatewayServer, run_gateway
from tests.sse_client import Stream, stream_request, validate_ui_stream

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {"t": {"command": sys.executable, "args": ["-m", "tests.mcp_servers"],
                 "cwd": str(ROOT), "approval": ["echo"]}}
ENV = {"TURNGATE_MCP_CONFIG": json.dumps({"mcpServers": SERVERS})}
MODEL = "scripted:call=t__echo,arg.text=hi"


async def paused_turn(gw: GatewayServer, client: httpx.AsyncClient,
                      model: str = MODEL) -> tuple[str, Stream]:
    thread = await gw.new_thread(client)
    stream = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                  json={"turn_id": "t1", "text": "echo hi", "model": model})
    validate_ui_stream(stream)
    return thread, stream


async def reply(client: httpx.AsyncClient, thread: str) -> dict[str, Any]:
    r = await client.get(f"/v1/threads/{thread}/messages")
    return dict([m for m in r.json()["messages"] if m["role"] == "assistant"][-1])


async def usage(client: httpx.AsyncClient, thread: str) -> list[dict[str, Any]]:
    return list((await client.get("/v1/usage", params={"thread_id": thread})).json()["usage"])


async def answer(client: httpx.AsyncClient, thread: str, body: dict[str, Any]) -> Stream:
    return await stream_request(client, "POST", f"/v1/threads/{thread}/turns/t1/continue",
                                json=body)


async def test_approval_pauses_then_approve_continues_the_same_message(
    database_url: str,
) -> None:
    async with run_gateway(database_url, **ENV) as gw, gw.client() as client:
        thread, first = await paused_turn(gw, client)
        [call] = first.of_type("tool-input-available")
        [request] = first.of_type("tool-approval-request")
        assert request["toolCallId"] == call["toolCallId"]
        assert request["approvalId"].startswith("approval_")
        assert not first.of_type("tool-output-available")
        assert first.of_type("finish")[0]["finishReason"] == "tool-calls"
        row = await reply(client, thread)
        assert row["status"] == "requires_action"
        assert row["content"][0]["approval"] == {"id": request["approvalId"]}
        [paused_usage] = await usage(client, thread)
        assert len(paused_usage["call_details"]) == 1
        # The thread is free meanwhile: its messages and a resume answer at once.
        resumed = await stream_request(client, "GET", f"/v1/threads/{thread}/turns/t1/stream")
        assert resumed.of_type("tool-approval-request") == [request]

        second = await answer(client, thread, {"approvals": [
            {"approvalId": request["approvalId"], "approved": True}]})
        validate_ui_stream(second, continues=frozenset({call["toolCallId"]}))
        assert second.chunks[0]["messageId"] == first.chunks[0]["messageId"]
        [output] = second.of_type("tool-output-available")
        assert output == {"type": "tool-output-available", "toolCallId": call["toolCallId"],
                          "output": {"result": "hi"}}
        assert second.text == 't__echo answered: {"result": "hi"}'

        row = await reply(client, thread)
        assert row["status"] == "complete" and str(row["id"]) == first.chunks[0]["messageId"]
        assert row["content"][0]["result"] == {"result": "hi"}
        assert row["content"][1] == {"type": "text", "text": second.text, "step": 1}
        [used] = await usage(client, thread)
        assert len(used["call_details"]) == 2
        assert used["call_details"][0] == paused_usage["call_details"][0]
        assert used["total_tokens"] == sum(c["total_tokens"] for c in used["call_details"])

        # Answering again continues nothing.
        again = await answer(client, thread, {"approvals": [
            {"approvalId": request["approvalId"], "approved": True}]})
        assert again.status == 409
        assert json.loads(again.body)["error"]["code"] == "not_paused"
        assert len((await usage(client, thread))[0]["call_details"]) == 2


async def test_deny_tells_the_model(database_url: str) -> None:
    async with run_gateway(database_url, **ENV) as gw, gw.client() as client:
        thread, first = await paused_turn(gw, client)
        [request] = first.of_type("tool-approval-request")
        second = await answer(client, thread, {"approvals": [
            {"approvalId": request["approvalId"], "approved": False, "reason": "not now"}]})
        validate_ui_stream(second, continues=frozenset({request["toolCallId"]}))
        assert second.of_type("tool-output-denied") == [
            {"type": "tool-output-denied", "toolCallId": request["toolCallId"]}]
        assert second.text == f"t__echo answered: Error: {DENIED_TEXT} Reason: not now"
        row = await reply(client, thread)
        assert row["status"] == "complete"
        assert row["content"][0]["denied"] is True
        assert row["content"][0]["errorText"] == f"{DENIED_TEXT} Reason: not now"
        assert "result" not in row["content"][0]
        [used] = await usage(client, thread)
        assert len(used["call_details"]) == 2


async def test_concurrent_answers_continue_once(database_url: str) -> None:
    async with run_gateway(database_url, **ENV) as gw, gw.client() as client:
        thread, first = await paused_turn(gw, client, MODEL + ",delay_ms=20")
        [request] = first.of_type("tool-approval-request")
        body = {"approvals": [{"approvalId": request["approvalId"], "approved": True}]}
        results: list[Stream] = []

        async def send() -> None:
            results.append(await answer(client, thread, body))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(send)
        assert sorted(r.status for r in results) == [200, 409, 409, 409]
        [ok] = [r for r in results if r.status == 200]
        assert len(ok.of_type("tool-output-available")) == 1
        [used] = await usage(client, thread)
        assert len(used["call_details"]) == 2
        r = await client.get(f"/v1/threads/{thread}/messages")
        assert [m["role"] for m in r.json()["messages"]] == ["user", "assistant"]


async def test_bad_answers_write_nothing(database_url: str) -> None:
    async with run_gateway(database_url, **ENV) as gw, gw.client() as client:
        thread, first = await paused_turn(gw, client)
        [request] = first.of_type("tool-approval-request")
        bad: list[tuple[Any, str]] = [
            ({"approvals": [{"approvalId": "nope", "approved": True}]}, "invalid_answer"),
            ({"approvals": [{"approvalId": request["approvalId"], "approved": "yes"}]},
             "invalid_answers"),
            ({"toolOutputs": [{"toolCallId": request["toolCallId"], "output": 1}]},
             "invalid_answer"),
            ({"toolOutputs": [{"toolCallId": "x"}]}, "invalid_answers"),
            ({}, "invalid_answer"),
            ([], "invalid_body"),
        ]
        for body, code in bad:
            r = await client.post(f"/v1/threads/{thread}/turns/t1/continue", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["code"] == code, (body, r.text)
        assert (await reply(client, thread))["status"] == "requires_action"
        assert len((await usage(client, thread))[0]["call_details"]) == 1

        # Someone else's thread, or a turn that is not there: 404.
        _, other_key = await gw.new_user("mallory")
        async with gw.client(headers=gw.auth(other_key)) as other:
            r = await other.post(f"/v1/threads/{thread}/turns/t1/continue", json={
                "approvals": [{"approvalId": request["approvalId"], "approved": True}]})
            assert r.status_code == 404
        r = await client.post(f"/v1/threads/{thread}/turns/t9/continue", json={
            "approvals": [{"approvalId": request["approvalId"], "approved": True}]})
        assert r.status_code == 404
        assert (await reply(client, thread))["status"] == "requires_action"


async def test_usechat_resubmit_continues_the_same_message(database_url: str) -> None:
    """``POST /api/chat`` as ``useChat`` sends it after ``addToolApprovalResponse``: the
    messages end with the assistant's reply, its tool part ``approval-responded``."""
    async with run_gateway(database_url, **ENV) as gw, gw.client() as client:
        user = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "echo hi"}]}
        first = await stream_request(client, "POST", "/api/chat", json={
            "id": "chat-1", "trigger": "submit-message", "model": MODEL, "messages": [user]})
        validate_ui_stream(first)
        [call] = first.of_type("tool-input-available")
        [request] = first.of_type("tool-approval-request")
        message_id = first.chunks[0]["messageId"]
        assistant = {"id": message_id, "role": "assistant", "parts": [
            {"type": "step-start"},
            {"type": "tool-t__echo", "toolCallId": call["toolCallId"],
             "state": "approval-responded", "input": call["input"],
             "approval": {"id": request["approvalId"], "approved": True}}]}
        body = {"id": "chat-1", "trigger": "submit-message", "model": MODEL,
                "messages": [user, assistant]}
        second = await stream_request(client, "POST", "/api/chat", json=body)
        validate_ui_stream(second, continues=frozenset({call["toolCallId"]}))
        assert second.chunks[0]["messageId"] == message_id
        assert second.text == 't__echo answered: {"result": "hi"}'
        row = await reply(client, "chat-1")
        assert row["status"] == "complete" and str(row["id"]) == message_id
        [used] = await usage(client, "chat-1")
        assert len(used["call_details"]) == 2
        # The same resubmit again continues nothing.
        again = await client.post("/api/chat", json=body)
        assert again.status_code == 409


async def test_history_as_ui_messages_lets_a_reload_answer(database_url: str) -> None:
    """``?format=ui`` gives a paused call as ``approval-requested`` with its approval
    id (what ``addToolApprovalResponse`` needs after a reload), and a finished turn
    one ``step-start`` per model call."""
    async with run_gateway(database_url, **ENV) as gw, gw.client() as client:
        thread, first = await paused_turn(gw, client)
        [request] = first.of_type("tool-approval-request")

        async def ui_reply() -> dict[str, Any]:
            r = await client.get(f"/v1/threads/{thread}/messages", params={"format": "ui"})
            return dict(r.json()["messages"][-1])

        paused = await ui_reply()
        assert paused["metadata"]["status"] == "requires_action"
        assert paused["parts"] == [
            {"type": "step-start"},
            {"type": "tool-t__echo", "toolCallId": request["toolCallId"],
             "input": {"text": "hi"}, "approval": {"id": request["approvalId"]},
             "state": "approval-requested"}]
        await answer(client, thread, {"approvals": [
            {"approvalId": request["approvalId"], "approved": True}]})
        done = await ui_reply()
        assert [p["type"] for p in done["parts"]] == [
            "step-start", "tool-t__echo", "step-start", "text"]
        assert done["parts"][1]["state"] == "output-available"
        assert done["parts"][1]["approval"] == {"id": request["approvalId"], "approved": True}


async def test_a_continuation_may_pause_again(database_url: str) -> None:
    """Two rounds of calls, each approved: the message pauses twice, continues twice,
    and its one usage row counts each of the three model calls once."""
    async with run_gateway(database_url, **ENV) as gw, gw.client() as client:
        thread, first = await paused_turn(gw, client, MODEL + ",rounds=2")
        [request] = first.of_type("tool-approval-request")
        second = await answer(client, thread, {"approvals": [
            {"approvalId": request["approvalId"], "approved": True}]})
        validate_ui_stream(second, continues=frozenset({request["toolCallId"]}))
        [again] = second.of_type("tool-approval-request")
        assert again["toolCallId"] != request["toolCallId"]
        assert second.of_type("finish")[0]["finishReason"] == "tool-calls"
        assert (await reply(client, thread))["status"] == "requires_action"
        assert len((await usage(client, thread))[0]["call_details"]) == 2
        third = await answer(client, thread, {"approvals": [
            {"approvalId": again["approvalId"], "approved": True}]})
        validate_ui_stream(third, continues=frozenset({again["toolCallId"]}))
        assert third.chunks[0]["messageId"] == first.chunks[0]["messageId"]
        row = await reply(client, thread)
        assert row["status"] == "complete"
        assert [p.get("step", 0) for p in row["content"]] == [0, 1, 2]
        [used] = await usage(client, thread)
        assert len(used["call_details"]) == 3
        assert used["total_tokens"] == sum(c["total_tokens"] for c in used["call_details"])
