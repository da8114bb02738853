"""Approval and client-side tools driven by the real AI SDK client (npm ``ai``).

tests/js/aisdk_tools.mjs runs the SDK's chat engine (what ``useChat`` runs) with
``addToolApprovalResponse``, ``onToolCall`` + ``addToolOutput`` and
``sendAutomaticallyWhen``: the paused reply continues as one assistant message, in
the client and in the database, and a resubmission sent twice continues once.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from gateway.turn.events import DENIED_TEXT
from tests.fixtures_server import GatewayServer, run_gateway
from tests.js_support import run_node
from tests.test_agent_loop import TEST_SERVER

pytestmark = pytest.mark.anyio

SERVERS = {"t": {**TEST_SERVER, "approval": ["echo"]}}
ENV = {"TURNGATE_MCP_CONFIG": json.dumps({"mcpServers": SERVERS})}
ECHO = "scripted:call=t__echo,arg.text=hi"
LOCATION = {"name": "get_location", "description": "Where the user is",
            "inputSchema": {"type": "object", "properties": {}}}


async def drive(gw: GatewayServer, scenario: str, **opts: Any) -> tuple[str, dict[str, Any]]:
    chat_id = f"chat-{uuid.uuid4().hex[:12]}"
    options = {"url": gw.url, "key": gw.key, "chatId": chat_id, **opts}
    out = await run_node("aisdk_tools.mjs", scenario, json.dumps(options))
    assert out["status"] == "ready" and out["error"] is None and not out["errors"], out
    return chat_id, out


async def one_reply_in_db(gw: GatewayServer, chat_id: str, message_id: str) -> Any:
    rows = await gw.store.list_messages(chat_id, gw.user_id)
    assert rows is not None
    assert [r.role for r in rows] == ["user", "assistant"]
    assert str(rows[1].id) == message_id and rows[1].status == "complete"
    usage, _ = await gw.store.list_usage(gw.user_id, thread_id=chat_id, limit=10)
    assert len(usage) == 1 and len(usage[0].call_details) == 2
    return rows[1]


def tool_part(message: dict[str, Any]) -> dict[str, Any]:
    [part] = [p for p in message["parts"] if p["type"].startswith("tool-")]
    return part


async def test_approve(database_url: str) -> None:
    async with run_gateway(database_url, **ENV) as gw:
        chat_id, out = await drive(gw, "approve", model=ECHO)
        user, assistant = out["messages"]
        assert assistant["id"] == out["pausedMessageId"]
        part = tool_part(assistant)
        assert part["type"] == "tool-t__echo" and part["state"] == "output-available"
        assert part["output"] == {"result": "hi"}
        assert part["approval"]["approved"] is True
        assert out["lastText"] == 't__echo answered: {"result": "hi"}'
        assert [r["resubmit"] for r in out["requests"]] == [False, True]
        assert [f["finishReason"] for f in out["finishes"]] == ["tool-calls", "stop"]
        row = await one_reply_in_db(gw, chat_id, assistant["id"])
        assert row.content[0]["result"] == {"result": "hi"}
        assert row.content[1]["text"] == out["lastText"]


async def test_deny(database_url: str) -> None:
    async with run_gateway(database_url, **ENV) as gw:
        chat_id, out = await drive(gw, "deny", model=ECHO)
        _, assistant = out["messages"]
        part = tool_part(assistant)
        assert part["state"] == "output-denied"
        assert out["lastText"] == f"t__echo answered: Error: {DENIED_TEXT} Reason: not today"
        row = await one_reply_in_db(gw, chat_id, assistant["id"])
        assert row.content[0]["denied"] is True


async def test_client_tool(database_url: str) -> None:
    async with run_gateway(database_url) as gw:
        chat_id, out = await drive(gw, "client", model="scripted:call=get_location",
                                   tools=[LOCATION])
        _, assistant = out["messages"]
        part = tool_part(assistant)
        assert part["type"] == "tool-get_location" and part["state"] == "output-available"
        assert part["output"] == {"city": "Paris"}
        assert out["toolCalls"] == ["get_location"]
        assert out["lastText"] == 'get_location answered: {"city": "Paris"}'
        assert [r["resubmit"] for r in out["requests"]] == [False, True]
        row = await one_reply_in_db(gw, chat_id, assistant["id"])
        assert row.content[0]["result"] == {"city": "Paris"}


async def test_double_answer_continues_once(database_url: str) -> None:
    async with run_gateway(database_url, **ENV) as gw:
        chat_id, out = await drive(gw, "double", model=ECHO)
        assert [sorted(r["statuses"]) for r in out["requests"] if r["resubmit"]] == [[200, 409]]
        _, assistant = out["messages"]
        assert tool_part(assistant)["state"] == "output-available"
        await one_reply_in_db(gw, chat_id, assistant["id"])
