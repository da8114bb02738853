"""The chat page in a real browser: headless Chromium driven by playwright-core.

tests/js/browser_chat.mjs opens the page with ``#key=...``, sends a message,
sees tokens arrive, presses Stop mid-reply, reloads, and reads the partial
reply back from the page; this test checks that and the database. The
screenshots land in test-artifacts/.
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures_server import GatewayServer
from tests.js_support import ARTIFACTS, require_chromium, run_node

pytestmark = [pytest.mark.anyio, pytest.mark.browser]


async def test_page_send_stop_reload_shows_stored_partial(gateway: GatewayServer) -> None:
    chromium = require_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    db = "postgresql" if gateway.store.url.startswith("postgresql") else "sqlite"
    screenshot = ARTIFACTS / f"chat-page-{db}.png"
    text = "Tell me a long story please"
    out = await run_node("browser_chat.mjs", json.dumps({
        "url": gateway.url, "key": gateway.key, "chromium": chromium,
        "screenshot": str(screenshot), "text": text,
        "model": "scripted:tokens=300,delay_ms=40,reasoning=3,tools=1",
    }), limit=50)
    assert out["pageErrors"] == [], out["pageErrors"]
    # The key moved from the URL to localStorage.
    assert "key=" not in out["urlAfterLoad"]
    assert out["storedKey"] == gateway.key
    # Tokens arrived one after another, reasoning and the tool call shown apart.
    first, later = out["seen"]
    assert first.startswith("w1 ") and len(later) > len(first) and later.startswith(first)
    assert out["reasoningShown"] == 1 and out["toolsShown"] == 1
    stopped_text = out["textAtStop"]
    assert stopped_text.startswith(later)

    # The database: the reply was cancelled, partial, and has its usage row.
    rows = await gateway.store.list_messages(out["afterReload"]["activeThread"], gateway.user_id)
    assert rows is not None and [r.role for r in rows] == ["user", "assistant"]
    user, assistant = rows
    assert user.content == [{"type": "text", "text": text}]
    assert assistant.status == "cancelled"
    stored = "".join(p["text"] for p in assistant.content if p["type"] == "text")
    full = "".join(f"w{i} " for i in range(1, 301))
    assert stored.startswith(later) and len(stored) < len(full)
    usage, _ = await gateway.store.list_usage(gateway.user_id, thread_id=user.thread_id)
    assert len(usage) == 1 and usage[0].message_id == assistant.id

    # After the reload the page shows exactly what is stored.
    shown = out["afterReload"]
    assert shown["status"] == "cancelled"
    assert shown["messageId"] == str(assistant.id)
    assert shown["text"] == stored
    assert shown["user"] == text
    assert shown["reasoning"] == "r1 r2 r3 "
    assert shown["tools"] == 1
    assert shown["tokens"].startswith(f"{usage[0].total_tokens} tokens")
    assert shown["cost"].startswith("$")
    assert "Stopped" in shown["meta"]
    assert shown["threads"] == [text]
    assert "not accepted" in out["badKeyBanner"]
    assert screenshot.exists() and screenshot.stat().st_size > 10_000
