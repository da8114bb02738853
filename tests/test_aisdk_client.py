"""Interop with the real AI SDK client (npm ``ai``, pinned in tests/js/package-lock.json).

tests/js/aisdk_chat.mjs runs the SDK's own chat engine (``AbstractChat`` with
``DefaultChatTransport``, what ``useChat`` runs) against a real gateway on
both databases; these tests check what it printed and what the database holds.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import httpx
import pytest

from tests.fixtures_server import GatewayServer, run_gateway
from tests.js_support import run_node

pytestmark = pytest.mark.anyio


async def _chat(gw: GatewayServer, scenario: str, chat_id: str, **opts: Any) -> dict[str, Any]:
    options = {"url": gw.url, "key": gw.key, "chatId": chat_id, **opts}
    return await run_node("aisdk_chat.mjs", scenario, json.dumps(options))


def _text(message: dict[str, Any]) -> str:
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


async def _rows(gw: GatewayServer, thread_id: str) -> list[Any]:
    rows = await gw.store.list_messages(thread_id, gw.user_id)
    assert rows is not None
    return rows


async def test_normal_reply(database_url: str) -> None:
    async with run_gateway(database_url) as gw:
        chat_id = f"chat-{uuid.uuid4().hex[:12]}"
        out = await _chat(gw, "normal", chat_id, text="one two three",
                          model="scripted:tokens=8,reasoning=2,tools=1")
        assert out["status"] == "ready" and out["error"] is None, out
        user, assistant = out["messages"]
        assert out["lastText"] == "".join(f"w{i} " for i in range(1, 9))
        assert out["finishes"] == [{"messageId": assistant["id"], "isAbort": False,
                                    "isDisconnect": False, "isError": False,
                                    "finishReason": "stop"}]
        kinds = [p["type"] for p in assistant["parts"]]
        # The chat's title came to onData as a transient part, not kept in the message.
        assert out["data"] == [{"type": "data-title", "transient": True,
                                "data": {"threadId": chat_id, "title": "one two three"}}]
        assert kinds == ["step-start", "reasoning", "tool-lookup", "text"], kinds
        tool = assistant["parts"][2]
        assert tool["state"] == "output-available"
        assert tool["input"] == {"query": "q1", "n": 1}
        usage = assistant["metadata"]["usage"]
        assert usage["inputTokens"] == 3 and usage["outputTokens"] > 0

        # The database: the chat id is the thread, the SDK's message id is the turn id,
        # and the assistant row id is the id the client now holds. The chat was created
        # untitled; its first turn titled it before the stream ended.
        thread = await gw.store.get_thread(chat_id, gw.user_id)
        assert thread is not None and thread.title == "one two three"
        rows = await _rows(gw, chat_id)
        assert [r.role for r in rows] == ["user", "assistant"]
        assert rows[0].turn_id == user["id"] == rows[1].turn_id
        assert rows[0].content == [{"type": "text", "text": "one two three"}]
        assert str(rows[1].id) == assistant["id"]
        assert rows[1].status == "complete"
        assert rows[1].content[-1] == {"type": "text", "text": out["lastText"]}
        usage_rows, _ = await gw.store.list_usage(gw.user_id, thread_id=chat_id)
        assert [u.message_id for u in usage_rows] == [rows[1].id]
        assert usage_rows[0].total_tokens == usage["totalTokens"]

        # What a reload renders (?format=ui) is what the live stream built: the same
        # ids and parts (part ids included), and every metadata key the stream set.
        async with gw.client() as client:
            r = await client.get(f"/v1/threads/{chat_id}/messages", params={"format": "ui"})
        stored = r.json()["messages"]
        assert [m["id"] for m in stored] == [m["id"] for m in out["messages"]]
        for live, kept in zip(out["messages"], stored, strict=True):
            assert kept["parts"] == live["parts"]
            for key, value in (live.get("metadata") or {}).items():
                assert kept["metadata"][key] == value, key


async def test_stop_mid_stream_is_stored_cancelled(database_url: str) -> None:
    # The default policy (grace), with a short grace: nobody comes back, so it ends.
    async with run_gateway(database_url, TURNGATE_DISCONNECT_GRACE_SECONDS="0.5") as gw:
        chat_id = f"chat-{uuid.uuid4().hex[:12]}"
        out = await _chat(gw, "stop", chat_id, stopAfterChars=12,
                          model="scripted:tokens=200,delay_ms=20")
        assert out["status"] == "ready" and out["error"] is None, out
        assert [f["isAbort"] for f in out["finishes"]] == [True]
        client_text = out["lastText"]
        assert len(client_text) >= 12
        assert len(client_text) < len("".join(f"w{i} " for i in range(1, 201)))

        # useChat's stop() only drops the connection; the gateway cancels after the grace.
        rows = []
        for _ in range(200):
            rows = await _rows(gw, chat_id)
            if rows[-1].status != "streaming":
                break
            await anyio.sleep(0.02)
        assistant = rows[-1]
        assert assistant.status == "cancelled"
        stored = "".join(p.get("text", "") for p in assistant.content if p["type"] == "text")
        # What was stored is the reply the client saw, maybe a few deltas longer
        # (those in flight when the connection closed), and far from the whole reply.
        assert stored.startswith(client_text), (stored, client_text)
        assert len(stored) < 200 * 4
        usage_rows, _ = await gw.store.list_usage(gw.user_id, thread_id=chat_id)
        assert len(usage_rows) == 1 and usage_rows[0].message_id == assistant.id


async def test_resume_after_dropped_connection(database_url: str) -> None:
    # Resume needs the generation to outlive the dropped connection.
    async with run_gateway(database_url, TURNGATE_ON_DISCONNECT="continue") as gw:
        chat_id = f"chat-{uuid.uuid4().hex[:12]}"
        out = await _chat(gw, "resume", chat_id, dropAfterBytes=900,
                          model="scripted:tokens=40,delay_ms=25")
        drop = out["afterDrop"]
        assert drop["status"] == "error", drop
        full = "".join(f"w{i} " for i in range(1, 41))
        assert 0 < len(drop["text"]) < len(full), drop
        # After resumeStream(): the replay rebuilt the message, no duplicated text.
        assert out["status"] == "ready" and out["error"] is None, out
        assert len(out["messages"]) == 2
        assistant = out["messages"][-1]
        assert _text(assistant) == full
        assert out["finishes"][-1]["finishReason"] == "stop"
        rows = await _rows(gw, chat_id)
        assert [r.role for r in rows] == ["user", "assistant"]
        assert str(rows[1].id) == assistant["id"] == drop["messageId"]
        assert rows[1].status == "complete"
        assert rows[1].content == [{"type": "text", "text": full}]


async def test_history_seeded_from_format_ui(database_url: str) -> None:
    async with run_gateway(database_url) as gw:
        chat_id = f"chat-{uuid.uuid4().hex[:12]}"
        first = await _chat(gw, "normal", chat_id, text="alpha beta",
                            model="scripted:tokens=3,tools=1")
        assert first["status"] == "ready", first
        out = await _chat(gw, "history", chat_id, text="gamma delta epsilon",
                          model="scripted:tokens=4")
        assert out["status"] == "ready" and out["error"] is None, out
        seeded = out["seeded"]
        # The stored history has the ids the client had when it streamed it.
        assert [m["id"] for m in seeded] == [m["id"] for m in first["messages"]]
        assert [p["type"] for p in seeded[1]["parts"]] == ["step-start", "tool-lookup", "text"]
        assert _text(seeded[1]) == _text(first["messages"][1])
        assert out["afterIdleResume"] == {"status": "ready", "count": 2}
        assert len(out["messages"]) == 4
        assert _text(out["messages"][-1]) == "w1 w2 w3 w4 "
        # The server used its stored history: the prompt counted every earlier word.
        usage = out["messages"][-1]["metadata"]["usage"]
        assert usage["inputTokens"] > 3
        rows = await _rows(gw, chat_id)
        assert [r.role for r in rows] == ["user", "assistant"] * 2
        assert rows[2].turn_id == out["messages"][2]["id"]


async def test_routes_errors_and_ownership(database_url: str) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        chat_id = f"chat-{uuid.uuid4().hex[:12]}"
        body = {"id": chat_id, "trigger": "submit-message", "model": "scripted:tokens=2",
                "messages": [{"id": "m1", "role": "user",
                              "parts": [{"type": "text", "text": "hi"}]}]}
        r = await client.post("/api/chat", json=body)
        assert r.status_code == 200
        assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
        # The docs' variant {id, message} for a second turn.
        r = await client.post("/api/chat", json={
            "id": chat_id, "model": "scripted:tokens=2",
            "message": {"id": "m2", "role": "user", "parts": [{"type": "text", "text": "x"}]}})
        assert r.status_code == 200 and "data: [DONE]" in r.text
        assert len(await _rows(gw, chat_id)) == 4
        # Idle thread: 204 on the resume endpoint.
        r = await client.get(f"/api/chat/{chat_id}/stream")
        assert r.status_code == 204

        _, other_key = await gw.new_user("mallory")
        async with httpx.AsyncClient(base_url=gw.url, headers=gw.auth(other_key)) as other:
            r = await other.post("/api/chat", json=body)
            assert r.status_code == 404, r.text
            # Someone else's chat: the same answer as an unknown one (nothing to resume).
            r = await other.get(f"/api/chat/{chat_id}/stream")
            assert r.status_code == 204 and r.content == b""
            r = await other.get(f"/v1/threads/{chat_id}/messages", params={"format": "ui"})
            assert r.status_code == 404
        assert len(await _rows(gw, chat_id)) == 4

        r = await client.post("/api/chat", json={"id": chat_id, "messages": []})
        # useChat shows the body as the error message: a sentence, the code in a header.
        assert r.status_code == 400 and r.headers["x-turngate-error-code"] == "missing_messages"
        assert r.headers["content-type"].startswith("text/plain")
        assert r.text == (
            'Messages must be a non-empty array of UI messages (or send "message").')
        r = await client.post("/api/chat", json={"messages": body["messages"]})
        assert r.status_code == 400
        async with httpx.AsyncClient(base_url=gw.url) as anonymous:
            r = await anonymous.post("/api/chat", json=body)
        assert r.status_code == 401 and r.headers["x-turngate-error-code"] == "unauthorized"
        assert r.text[0].isupper() and r.text.endswith(".") and "{" not in r.text
        # An unknown chat id on the resume endpoint (useChat({resume: true}) on a new
        # chat's mount): 204, and nothing is written.
        r = await client.get(f"/api/chat/chat-{uuid.uuid4().hex[:12]}/stream")
        assert r.status_code == 204 and r.content == b""
