"""The chat page's features in a real browser, checked against the database.

tests/js/browser_page.mjs drives Debian's headless Chromium (playwright-core)
through Markdown, hostile HTML, copy, regenerate, rename, the model picker, a
failed reply after reload, images (button and paste), Escape to stop, rejected
sends, layout at 360 and 1280 px, dark mode and delete, on a real gateway on
both databases. tests/js/browser_approval.mjs approves and denies a tool call
waiting for approval (the test MCP server over stdio). Screenshots land in
test-artifacts/page-*-<db>.png.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from gateway.turn.events import DENIED_TEXT
from gateway.turn.titles import first_words
from tests.fixtures_server import GatewayServer, run_gateway
from tests.js_support import ARTIFACTS, require_chromium, run_node

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

MARKDOWN = """## Plan for **today**

Some *emphasis*, `inline code` and a [docs link](https://example.com/docs).

- first item
- second item with **bold**
  - nested item

1. one
2. two

| Name | Qty |
| --- | ---: |
| apples | 3 |
| pears | 5 |

```python
print("hi <b>")
```

### Done"""

HOSTILE = """<img src=x onerror="window.__xss.push('img');alert('img')">
<script>window.__xss.push('script');alert('script')</script>
[click me](javascript:window.__xss.push('link'))
<a href="javascript:alert('a')">raw anchor</a>
<svg onload="window.__xss.push('svg');alert('svg')"><circle r=5></circle></svg>
<iframe src="javascript:alert('iframe')"></iframe>
[data](data:text/html,<script>alert(1)</script>) and <javascript:alert(2)>
**still bold** and https://example.org/safe."""

WIDE = ("A very long word: " + "x" * 300 + "\n\n| " + " | ".join(f"column {i}" for i in range(14))
        + " |\n|" + "---|" * 14 + "\n| " + " | ".join("value" for _ in range(14)) + " |\n\n"
        "```\n" + "code " * 80 + "\n```\n")

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="
)


async def test_chat_page_features_end_to_end(gateway: GatewayServer) -> None:
    chromium = require_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    db = "postgresql" if gateway.store.url.startswith("postgresql") else "sqlite"
    out = await run_node("browser_page.mjs", json.dumps({
        "url": gateway.url, "key": gateway.key, "chromium": chromium, "db": db,
        "artifacts": str(ARTIFACTS), "markdown": MARKDOWN, "hostile": HOSTILE, "wide": WIDE,
    }), limit=150)
    (ARTIFACTS / f"page-result-{db}.json").write_text(json.dumps(out, indent=1))
    assert out["pageErrors"] == [], out["pageErrors"]
    store, user = gateway.store, gateway.user_id
    thread = out["threadId"]
    rows = await store.list_messages(thread, user, include_superseded=True)
    assert rows is not None
    by_id = {r.id: r for r in rows}

    # -- Markdown renders as such, while it streams and after --
    md = out["markdown"]
    assert out["headingWhileStreaming"] == "busy"
    # the new chat's title shows as soon as the message is taken, not after the reply:
    # the page's first words, the same as the server's title after the first turn
    assert out["titleWhileStreaming"] == first_words(MARKDOWN)
    assert md["h2"] == ["Plan for today"] and md["h3"] == ["Done"]
    assert md["li"][:2] == ["first item", "second item with boldnested item"]
    assert "nested item" in md["li"]
    assert md["ol"] == ["one", "two"]
    assert md["th"] == ["Name", "Qty"] and md["td"] == ["apples", "3", "pears", "5"]
    assert md["strong"] == ["today", "bold"] and md["em"] == ["emphasis"]
    assert md["code"] == ["inline code"]
    assert md["pre"] == ['print("hi <b>")'] and md["lang"] == ["python"]
    assert md["copyButtons"] == 1 and md["literal"] is False
    assert md["links"] == [{"href": "https://example.com/docs", "rel": "noopener noreferrer",
                            "target": "_blank"}]
    reply = out["markdownReply"]
    assert reply["raw"] == MARKDOWN and reply["status"] == "complete"
    stored = by_id[int(reply["id"])]
    assert "".join(p["text"] for p in stored.content if p["type"] == "text") == MARKDOWN
    assert reply["model"] == "scripted:chunk=9,delay_ms=50" and reply["when"] == stored.created_at
    assert reply["cost"] == "$0 (free model)"

    # -- copy --
    assert out["copiedReply"] == MARKDOWN
    assert out["copiedCode"] == 'print("hi <b>")'

    # -- hostile HTML: nothing ran, it shows as text, links only http(s) --
    assert out["dialogs"] == [] and out["xss"] == [] and out["xssFinal"] == []
    for dom in (out["hostileDom"], out["reloadedDom"]):
        assert dom["hostile"] == []
        for tag in ("img", "script", "svg", "iframe", "circle"):
            assert tag not in dom["tags"], (tag, dom["tags"])
        safe = ("https://", "http://", "mailto:")
        assert all(link["href"].startswith(safe) for link in dom["links"])
        assert all(link["rel"] == "noopener noreferrer" for link in dom["links"])
        assert {"href": "https://example.org/safe", "rel": "noopener noreferrer",
                "target": "_blank", "text": "https://example.org/safe"} in dom["links"]
        assert len(dom["links"]) == 2, dom["links"]  # the docs link and that one
    shown = out["hostileReply"]["text"]
    for literal in ("<img src=x onerror=", "<script>", "javascript:window.__xss.push('link')",
                    "<svg onload=", '<a href="javascript:alert', "<iframe"):
        assert literal in shown, literal
    assert out["hostileReply"]["raw"] == HOSTILE
    assert not [e for e in out["consoleErrors"] if "status of 400" not in e], out["consoleErrors"]

    # -- regenerate: the old reply superseded, the new one stored, one button only --
    assert out["regenerateButtons"] == 1
    old_id, new_id = int(out["beforeRegenerate"]["id"]), int(out["afterRegenerate"]["id"])
    assert new_id != old_id and out["afterRegenerate"]["raw"] == "w1 w2 w3 "
    assert by_id[old_id].status == "superseded" and by_id[new_id].status == "complete"
    assert by_id[new_id].turn_id == by_id[old_id].turn_id
    assert out["repliesAfterRegenerate"] == 2

    # -- rename --
    assert out["renamedTitle"] == out["reloadedTitle"] == "Markdown and friends"
    row = await store.get_thread(thread, user)
    assert row is not None and row.title == "Markdown and friends"
    assert out["reloadedH2"] == 1

    # -- model picker and a failed reply's reason after reload --
    assert "scripted" in out["modelOptions"]
    assert any("fail_after" in m for m in out["modelOptions"])
    failed = by_id[int(out["failedAfterReload"]["id"])]
    assert failed.status == "error"
    reason = next(p["errorText"] for p in failed.content if p["type"] == "error")
    assert reason in out["failedLive"]["error"] and reason in out["failedAfterReload"]["error"]
    assert out["failedAfterReload"]["status"] == "error"
    assert "fail_after" in (out["failedAfterReload"]["model"] or "")
    assert out["failedInView"] is True

    # -- images: both shown in the bubble and stored as sent --
    image_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert out["buttonImage"] == image_url and out["pasteImage"] == image_url
    users = {r.content[0]["text"]: r for r in rows if r.role == "user"}
    for text in ("an image by button", "an image by paste"):
        assert users[text].content[1] == {"type": "image", "image": image_url}
    assert "only PNG, JPEG, GIF and WebP" in out["wrongTypeBanner"]
    assert "huge.png" in out["tooLargeBanner"] and "8 MB" in out["tooLargeBanner"]
    assert out["refusedAttached"] == 0 and out["dropped"] == 1

    # -- Escape stopped the reply; stored cancelled and partial --
    stopped = by_id[int(out["stopped"]["id"])]
    assert stopped.status == "cancelled" and out["stopped"]["status"] == "cancelled"
    text = "".join(p["text"] for p in stopped.content if p["type"] == "text")
    assert 0 < len(text) < len("".join(f"w{i} " for i in range(1, 301)))
    assert out["stopped"]["raw"] == text
    assert out["titleAfterStop"] == "Markdown and friends"  # the title stays through Stop

    # -- rejected sends: text kept, reason shown, nothing stored or shown as sent --
    rejected = out["rejected"]
    assert rejected["input"] == "keep this text"
    assert "nosuch" in rejected["banner"] and rejected["usersAfter"] == rejected["usersBefore"]
    assert out["rejectedNew"] == {"input": "keep this too", "threads": 1, "users": 0,
                                  "title": "New chat"}
    assert "keep this text" not in users and "keep this too" not in users
    threads, _ = await store.list_threads(user)
    assert [t.id for t in threads] == [thread]

    # -- layout: nothing overflows at 360 and 1280 px; the composer is usable --
    for width in (360, 1280):
        layout = out[f"layout{width}"]
        assert layout["scrollWidth"] <= layout["width"], layout
        assert layout["wide"] == [], layout["wide"]
        assert layout["sendVisible"] is True
    assert out["layout360"]["inputWidth"] >= 180 and out["layout360"]["sidebarRight"] <= 0
    assert out["layout1280"]["sidebarRight"] == 240
    assert out["sidebarOpen"]["sidebarRight"] > 200
    assert out["narrowSend"]["raw"] == "typed at 360 px "
    assert out["sidebarClosedBy"] == "escape, scrim, choice"
    assert out["unpriced"]["cost"].startswith("cost unknown (no price for ")
    assert out["unpriced"]["cost"] != "$0"
    assert "the limit is 100000" in out["tooLong"]["banner"] and out["tooLong"]["kept"] == 100001
    assert not [r for r in rows if r.role == "user" and len(r.content[0]["text"]) > 100000]
    assert out["darkBackground"] != out["lightBackground"]
    assert out["focusOutline"]["outline"] != "none"
    assert out["shiftEnter"] == "line one\nline two"

    # -- delete while a reply runs: cancelled, finalized, then gone; usage kept --
    deleted = out["deletedThread"]
    assert deleted != thread and await store.get_thread(deleted, user) is None
    assert await store.list_messages(deleted, user) is None
    usage, _ = await store.list_usage(user, thread_id=deleted)
    assert len(usage) == 1 and 0 < usage[0].completion_tokens < 1000
    assert out["afterDelete"] == {"title": "New chat", "threads": 1, "messages": 0}

    # -- favicon, no 404 anywhere, the bad-key banner in words --
    assert out["favicon"] == {"status": 200, "type": "image/svg+xml"}
    assert not [r for r in out["badResponses"] if r.startswith("404")], out["badResponses"]
    assert out["foreignRequests"] == []  # no CDN, nothing but the gateway
    assert "`" not in out["badKeyBanner"] and "not accepted" in out["badKeyBanner"]
    for name in ("markdown", "failed", "w360", "w1280", "w360-sidebar", "w360-dark"):
        path = ARTIFACTS / f"page-{name}-{db}.png"
        assert path.exists() and path.stat().st_size > 5_000, path


# -- a tool call waiting for approval: Approve / Deny ------------------------------------

APPROVAL_SERVERS = {"t": {"command": sys.executable, "args": ["-m", "tests.mcp_servers"],
                          "cwd": str(Path(__file__).resolve().parent.parent),
                          "approval": ["touch"]}}


async def approval_in_page(database_url: str, tmp_path: Path, approve: bool
                           ) -> tuple[dict[str, Any], Path, GatewayServer, list[Any]]:
    chromium = require_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    db = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    target = tmp_path / "touched"
    env = {"TURNGATE_MCP_CONFIG": json.dumps({"mcpServers": APPROVAL_SERVERS})}
    async with run_gateway(database_url, **env) as gw:
        out = await run_node("browser_approval.mjs", json.dumps({
            "url": gw.url, "key": gw.key, "chromium": chromium, "db": db,
            "artifacts": str(ARTIFACTS), "approve": approve, "text": "touch the file",
            "model": f"scripted:call=t__touch,arg.path={quote(str(target), safe='')}",
        }), limit=90)
        rows = await gw.store.list_messages(out["threadId"], gw.user_id)
        assert rows is not None
        usage, _ = await gw.store.list_usage(gw.user_id, thread_id=out["threadId"])
    assert out["pageErrors"] == [], out["pageErrors"]
    # Paused: one reply, its call waiting, with the two buttons.
    [paused] = out["paused"]
    assert paused["status"] == "requires_action" and paused["badge"] == "Waiting for you"
    [tool] = paused["tools"]
    assert tool["name"] == "Tool: t__touch" and tool["state"] == "waiting for your approval"
    assert tool["result"] is None
    assert tool["buttons"] == [
        {"text": "Approve", "label": "Approve the call of t__touch", "disabled": False},
        {"text": "Deny", "label": "Deny the call of t__touch", "disabled": False}]
    # The click POSTed the answer to .../continue, once.
    assistant = [r for r in rows if r.role == "assistant"]
    [reply] = assistant
    approval_id = reply.content[0]["approval"]["id"]
    assert out["continues"] == [{
        "method": "POST",
        "path": f"/v1/threads/{out['threadId']}/turns/{reply.turn_id}/continue",
        "body": {"approvals": [{"approvalId": approval_id, "approved": approve}]}}]
    # The continued stream went into the same message: never a second reply on screen.
    assert out["seen"]["maxReplies"] == 1
    for view in (out["after"], out["reloaded"]):
        [shown] = view
        assert shown["id"] == paused["id"] == str(reply.id)
        assert shown["status"] == "complete" and shown["tools"][0]["buttons"] == []
    assert len(usage) == 1 and len(usage[0].call_details) == 2
    return out, target, reply, rows


async def test_page_approves_a_tool_call(database_url: str, tmp_path: Path) -> None:
    out, target, reply, _ = await approval_in_page(database_url, tmp_path, approve=True)
    assert target.read_text() == "touched\n"  # it ran, once
    result = f"touched {target}"
    assert reply.status == "complete" and reply.content[0]["result"] == {"result": result}
    assert result in out["seen"]["continuedText"]  # streamed into the paused reply's node
    assert "t__touch answered: " in out["seen"]["continuedText"]
    for view in (out["after"], out["reloaded"]):
        tool = view[0]["tools"][0]
        assert tool["state"] == "done" and result in tool["result"]
        assert view[0]["text"].startswith("t__touch answered: ")


async def test_page_denies_a_tool_call(database_url: str, tmp_path: Path) -> None:
    out, target, reply, _ = await approval_in_page(database_url, tmp_path, approve=False)
    assert not target.exists()  # it never ran
    call = reply.content[0]
    assert reply.status == "complete" and call["denied"] is True and "result" not in call
    assert DENIED_TEXT in out["seen"]["continuedText"]
    for view in (out["after"], out["reloaded"]):
        tool = view[0]["tools"][0]
        assert tool["state"] == "denied" and tool["result"].startswith("Denied: " + DENIED_TEXT)
        assert view[0]["text"].startswith("t__touch answered: Error: ")
