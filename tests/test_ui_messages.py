"""Stored rows → AI SDK UIMessages (``?format=ui``), unit level and over HTTP."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from gateway.api.ui_messages import to_ui_messages
from persistence.rows import MessageRow
from tests.fixtures_server import GatewayServer

PNG = "data:image/png;base64,iVBORw0KGgo="


def _row(id: int, role: str, content: list[dict[str, Any]], status: str = "complete",
         turn_id: str | None = "t1") -> MessageRow:
    return MessageRow(id=id, thread_id="th", role=role, content=content, status=status,
                      turn_id=turn_id, created_at="2026-01-01T00:00:00Z",
                      updated_at="2026-01-01T00:00:00Z")


def test_user_message_ids_and_parts() -> None:
    docs = [{"id": "d1", "title": "Spec", "document_type": "pdf"}]
    [with_turn, legacy] = to_ui_messages([
        _row(1, "user", [{"type": "text", "text": "look"}, {"type": "image", "image": PNG},
                         {"type": "mentioned-documents", "documents": docs}]),
        _row(7, "user", [{"type": "text", "text": "old"}], turn_id=None),
    ])
    assert with_turn["id"] == "t1" and with_turn["role"] == "user"
    assert with_turn["parts"] == [
        {"type": "text", "text": "look"},
        {"type": "file", "mediaType": "image/png", "url": PNG},
        {"type": "data-mentioned-documents", "data": {"documents": docs}},
    ]
    assert with_turn["metadata"]["turnId"] == "t1"
    assert legacy["id"] == "7" and "turnId" not in legacy["metadata"]


def test_assistant_parts_in_order_with_tool_states() -> None:
    content = [
        {"type": "reasoning", "text": "think"},
        {"type": "tool-call", "toolCallId": "c1", "toolName": "lookup", "args": {"q": 1},
         "argsText": '{"q":1}', "result": {"a": 2}},
        {"type": "tool-call", "toolCallId": "c2", "toolName": "lookup", "args": {"q": 2},
         "argsText": '{"q":2}'},
        {"type": "text", "text": "done"},
    ]
    [msg] = to_ui_messages([_row(42, "assistant", content, status="cancelled")])
    assert msg["id"] == "42" and msg["role"] == "assistant"
    assert msg["metadata"]["status"] == "cancelled"
    assert msg["parts"] == [
        {"type": "step-start"},
        {"type": "reasoning", "id": "r1", "text": "think", "state": "done"},
        {"type": "tool-lookup", "toolCallId": "c1", "input": {"q": 1},
         "state": "output-available", "output": {"a": 2}},
        {"type": "tool-lookup", "toolCallId": "c2", "input": {"q": 2},
         "state": "output-error",
         "errorText": "The tool call did not finish: the reply ended first."},
        {"type": "text", "text": "done", "state": "done"},
    ]


def test_streaming_shell_and_status_placeholder() -> None:
    shell, streaming, empty = to_ui_messages([
        _row(1, "assistant", [{"type": "text", "text": ""}], status="streaming"),
        _row(2, "assistant", [{"type": "text", "text": "par"},
                              {"type": "tool-call", "toolCallId": "c", "toolName": "x",
                               "args": {}, "argsText": "{}"}], status="streaming"),
        _row(3, "assistant", [{"type": "status", "text": "(no text response)"}]),
    ])
    assert shell["parts"] == []
    assert streaming["parts"][1] == {"type": "text", "text": "par", "state": "streaming"}
    assert streaming["parts"][2]["state"] == "input-available"
    assert empty["parts"] == [] and empty["metadata"]["notice"] == "(no text response)"


@pytest.mark.anyio
async def test_format_ui_over_http(gateway: GatewayServer) -> None:
    async with gateway.client() as client:
        thread = await gateway.new_thread(client)
        turn_id = uuid.uuid4().hex
        r = await client.post(f"/v1/threads/{thread}/turns", json={
            "turn_id": turn_id, "text": "hi", "images": [PNG], "model": "scripted:tokens=2"})
        assert r.status_code == 200
        start_id = next(line for line in r.text.splitlines() if '"start"' in line)
        r = await client.get(f"/v1/threads/{thread}/messages", params={"format": "ui"})
        assert r.status_code == 200
        user, assistant = r.json()["messages"]
        assert user["id"] == turn_id
        assert user["parts"][1] == {"type": "file", "mediaType": "image/png", "url": PNG}
        assert f'"messageId":"{assistant["id"]}"' in start_id
        assert assistant["parts"][-1] == {"type": "text", "text": "w1 w2 ", "state": "done"}
        r = await client.get(f"/v1/threads/{thread}/messages", params={"format": "xml"})
        assert r.status_code == 400
