"""The real ``useChat`` (``@ai-sdk/react``) in headless Chromium against the gateway.

tests/js/usechat/app.jsx is a plain React 19 page on ``useChat`` with
``resume: true`` and ``DefaultChatTransport`` (packages pinned in
tests/js/package-lock.json); tests/js/usechat_driver.mjs bundles it with
esbuild, serves it from its own loopback port (another origin than the gateway)
and drives Debian's Chromium, one JSON command per line, so that each test can
check the database between the steps a user takes. The gateway runs with its
default settings (disconnect ``grace``) except CORS. Screenshots land in
test-artifacts/.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from tests.fixtures_server import GatewayServer, run_gateway
from tests.js_support import ARTIFACTS, JS_DIR, require_chromium, require_node

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

SHORT = "scripted:tokens=5"
LONG = "scripted:tokens=300,delay_ms=30"


def words(n: int) -> str:
    """The scripted model's reply of ``n`` tokens."""
    return "".join(f"w{i} " for i in range(1, n + 1))


class Driver:
    """usechat_driver.mjs: one browser for the module, one JSON command per line."""

    def __init__(self, proc: Process, stderr: Any) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.stdout = BufferedByteReceiveStream(proc.stdout)
        self.stderr = stderr

    async def read(self, limit: float) -> dict[str, Any]:
        with anyio.fail_after(limit):
            line = await self.stdout.receive_until(b"\n", 50_000_000)
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def cmd(self, op: str, limit: float = 30, **args: Any) -> Any:
        assert self.proc.stdin is not None
        await self.proc.stdin.send((json.dumps({"op": op, **args}) + "\n").encode())
        answer = await self.read(limit)
        if not answer["ok"]:
            self.stderr.seek(0)
            raise AssertionError(
                f"{op} {args}: {answer['error']}\npage errors: {answer.get('pageErrors')}\n"
                f"driver stderr:\n{self.stderr.read()[-3000:]}"
            )
        assert answer["pageErrors"] == [], answer["pageErrors"]
        return answer["value"]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module scope, for the module-wide browser below


@pytest.fixture(scope="module")
async def driver() -> AsyncIterator[Driver]:
    """The page bundled and served, and Chromium launched, once for the module."""
    chromium = require_chromium()
    node = require_node()
    with tempfile.TemporaryFile("w+") as stderr:
        proc = await anyio.open_process(
            [node, str(JS_DIR / "usechat_driver.mjs"), json.dumps({"chromium": chromium})],
            cwd=JS_DIR, stderr=stderr,
        )
        try:
            drv = Driver(proc, stderr)
            started = await drv.read(60)
            if not started["ok"]:
                stderr.seek(0)
                raise AssertionError(f"{started}\n{stderr.read()[-3000:]}")
            yield drv
        finally:
            with anyio.move_on_after(15, shield=True):
                if proc.returncode is None and proc.stdin is not None:
                    try:
                        await proc.stdin.send(b'{"op":"close"}\n')
                        await proc.stdin.aclose()
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                with anyio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


class Page:
    """The useChat page in its own browser context, on one gateway."""

    def __init__(self, drv: Driver, gw: GatewayServer, db: str) -> None:
        self.drv = drv
        self.gw = gw
        self.db = db

    async def cmd(self, op: str, limit: float = 30, **args: Any) -> Any:
        return await self.drv.cmd(op, limit, **args)

    async def open(self, chat_id: str, model: str) -> None:
        await self.cmd("open", chat=chat_id, model=model)

    async def eval(self, expr: str) -> Any:
        return await self.cmd("eval", expr=expr)

    async def wait(self, expr: str, timeout_ms: int = 20000) -> None:
        try:
            await self.cmd("wait", limit=timeout_ms / 1000 + 5, expr=expr, timeoutMs=timeout_ms)
        except AssertionError as exc:
            # Say what the page showed and what the gateway answered instead.
            raise AssertionError(
                f"{exc}\npage: {await self.shown()}\nresponses: {await self.responses()}"
            ) from None

    async def send(self, text: str, model: str | None = None) -> None:
        if model is not None:
            await self.set_model(model)
        await self.cmd("send", text=text)

    async def set_model(self, model: str) -> None:
        await self.eval(f"window.currentModel = {json.dumps(model)}")

    async def ready_with(self, text: str) -> None:
        """Wait until the chat is ready and its last reply shows ``text``."""
        await self.wait(
            f"tg.status() === 'ready' && tg.assistantText() === {json.dumps(text)}"
        )

    async def shown(self) -> dict[str, Any]:
        state: dict[str, Any] = await self.eval(
            "({status: tg.status(), error: tg.error(), messages: tg.messages(),"
            " chatErrors: window.chatErrors})"
        )
        return state

    async def wire_at_stop(self) -> str:
        """The last body chunks of the stopped response, timed against the Stop press."""
        chunks: list[list[Any]] = await self.eval(
            "window.wire.filter(w => w.method === 'POST').at(-1)?.chunks.slice(-4) ?? []"
        )
        stopped_at = await self.eval("window.stoppedAt")
        return "; ".join(f"{t - stopped_at:+d} ms {text.strip()[-60:]!r}" for t, text in chunks)

    async def responses(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self.cmd("responses")
        return found

    async def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"usechat-{name}-{self.db}.png"
        await self.cmd("screenshot", path=str(path))
        assert path.exists() and path.stat().st_size > 3000


@asynccontextmanager
async def usechat_page(drv: Driver, database_url: str, **env: str) -> AsyncIterator[Page]:
    """A gateway on ``database_url`` (CORS open, otherwise default) and a fresh page."""
    db = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    failure: Exception | None = None
    async with run_gateway(database_url, TURNGATE_CORS_ORIGINS="*", **env) as gw:
        await drv.cmd("newPage", gateway=gw.url, key=gw.key)
        try:
            yield Page(drv, gw, db)
        except Exception as exc:
            # Raised out of run_gateway's task group, a failure would cancel the server
            # instead of stopping it (unclosed sockets, which the suite treats as errors
            # at exit): stop it first, then fail.
            failure = exc
    if failure is not None:
        raise failure


def new_chat_id() -> str:
    return f"chat-{uuid.uuid4().hex[:12]}"


async def stored(gw: GatewayServer, chat_id: str, include: str = "") -> list[dict[str, Any]]:
    """The thread's messages through the gateway's API (native format)."""
    async with gw.client() as client:
        params = {"include": include} if include else {}
        r = await client.get(f"/v1/threads/{chat_id}/messages", params=params)
    assert r.status_code == 200, r.text
    messages: list[dict[str, Any]] = r.json()["messages"]
    return messages


def text_of(message: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in message["content"] if p["type"] == "text")


# Deltas the gateway had handed to the connection when Stop closed it, but the page never
# showed (they crossed the Stop on the way): a few on a loaded machine, at 30 ms a delta.
IN_FLIGHT_AT_STOP = 8


def assert_stored_as_stopped(stored: str, shown: str, wire: str) -> None:
    """A stopped reply is stored as the gateway sent it up to the Stop: what the page
    showed, plus at most the few deltas that were in flight, never what it generated after."""
    assert stored.startswith(shown), (stored, shown, wire)
    extra = len(stored.split()) - len(shown.split())
    assert 0 <= extra <= IN_FLIGHT_AT_STOP, (extra, stored, shown, wire)


async def settled(gw: GatewayServer, chat_id: str, include: str = "") -> list[dict[str, Any]]:
    """The thread's messages once no row is still ``streaming``."""
    with anyio.fail_after(15):
        while True:
            rows = await stored(gw, chat_id, include)
            if all(r["status"] != "streaming" for r in rows):
                return rows
            await anyio.sleep(0.05)


def generations(gw: GatewayServer) -> float:
    value = gw.ctx.metrics.registry.get_sample_value("turngate_generations_started_total")
    return value or 0.0


def is_sentence(text: str) -> bool:
    text = text.strip()
    return (bool(text) and text[0].isupper() and text[-1] in ".!?" and " " in text
            and not text.startswith(("{", "[")))


async def test_new_chat_mounts_without_error(driver: Driver, database_url: str) -> None:
    async with usechat_page(driver, database_url) as page:
        chat_id = new_chat_id()
        await page.open(chat_id, SHORT)
        resume_path = f"/api/chat/{chat_id}/stream"
        with anyio.fail_after(10):
            while not [r for r in await page.responses() if r["path"] == resume_path]:
                await anyio.sleep(0.05)
        await page.wait("tg.status() === 'ready'")
        state = await page.shown()
        assert state["status"] == "ready" and state["error"] is None, state
        assert state["messages"] == [] and state["chatErrors"] == []
        resumes = [r for r in await page.responses() if r["path"] == resume_path]
        assert [(r["method"], r["status"]) for r in resumes] == [("GET", 204)], resumes
        # Nothing was written for the chat the page only looked at.
        async with page.gw.client() as client:
            r = await client.get(f"/v1/threads/{chat_id}/messages")
        assert r.status_code == 404
        await page.screenshot("new-chat")

        # And the chat works from there.
        await page.send("hello")
        await page.ready_with(words(5))
        rows = await settled(page.gw, chat_id)
        assert [(r["role"], r["status"]) for r in rows] == [
            ("user", "complete"), ("assistant", "complete")]


async def test_stop_then_send_at_once(driver: Driver, database_url: str) -> None:
    async with usechat_page(driver, database_url) as page:
        chat_id = new_chat_id()
        await page.open(chat_id, LONG)
        await page.send("tell me a long story")
        # Stop as the reply on screen reaches 30 characters, then send at once.
        shown_at_stop: str = await page.eval("tg.stopWhenShown(30)")
        await page.send("something else", model=SHORT)
        await page.ready_with(words(5))

        state = await page.shown()
        assert state["error"] is None and state["chatErrors"] == [], state
        roles = [m["role"] for m in state["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"], state
        stopped_shown = state["messages"][1]["text"]
        assert stopped_shown == shown_at_stop, (stopped_shown, shown_at_stop)
        # Two answered POSTs (the first one's body was then aborted by Stop): no 409.
        posts = [r for r in await page.responses() if r["method"] == "POST"]
        assert [r["status"] for r in posts if r["status"] is not None] == [200, 200], posts
        await page.screenshot("stop-then-send")

        rows = await settled(page.gw, chat_id)
        assert [(r["role"], r["status"]) for r in rows] == [
            ("user", "complete"), ("assistant", "cancelled"),
            ("user", "complete"), ("assistant", "complete")], rows
        assert_stored_as_stopped(text_of(rows[1]), shown_at_stop, await page.wire_at_stop())
        assert str(rows[1]["id"]) == state["messages"][1]["id"]
        assert text_of(rows[3]) == words(5)
        assert str(rows[3]["id"]) == state["messages"][3]["id"]
        usage, _ = await page.gw.store.list_usage(page.gw.user_id, thread_id=chat_id)
        assert sorted(str(u.message_id) for u in usage) == [str(rows[1]["id"]), str(rows[3]["id"])]


async def test_reload_mid_reply_resumes_to_one_message(driver: Driver, database_url: str) -> None:
    async with usechat_page(driver, database_url) as page:
        chat_id = new_chat_id()
        await page.open(chat_id, LONG)
        await page.send("tell me a long story")
        await page.wait("tg.assistantText().length >= 40")
        before: str = await page.eval("tg.assistantText()")
        assert len(before) < len(words(300))
        await page.cmd("reload")
        await page.wait("tg.assistantText().length > 0")
        await page.wait(
            f"tg.status() === 'ready' && tg.assistantText() === {json.dumps(words(300))}",
            timeout_ms=25000,
        )
        state = await page.shown()
        assert state["error"] is None and state["chatErrors"] == [], state
        assert [m["role"] for m in state["messages"]] == ["user", "assistant"], state
        assert state["messages"][1]["text"].startswith(before)
        resumes = [r for r in await page.responses()
                   if r["path"] == f"/api/chat/{chat_id}/stream"]
        # One resume before the chat existed (204), one after the reload (the live reply).
        assert [r["status"] for r in resumes if r["status"] is not None] == [204, 200], resumes
        await page.screenshot("reload-resumed")

        rows = await settled(page.gw, chat_id, "superseded")
        assert [(r["role"], r["status"]) for r in rows] == [
            ("user", "complete"), ("assistant", "complete")], rows
        assert text_of(rows[1]) == words(300)
        assert str(rows[1]["id"]) == state["messages"][1]["id"]

        # Loaded again once complete: the stored UI messages show the same thing.
        await page.cmd("reload")
        await page.wait(
            f"tg.status() === 'ready' && tg.assistantText() === {json.dumps(words(300))}")
        again = await page.shown()
        assert again["messages"] == state["messages"] and again["error"] is None, again


async def _regenerate_to(page: Page, chat_id: str, old: dict[str, Any], model: str,
                         text: str, click: str = "#regenerate") -> dict[str, Any]:
    """Press Regenerate (``click``: the chat's button, or the reply's own ↻) with
    ``model``; check the page and the database; the new reply as shown."""
    await page.set_model(model)
    finished = await page.eval("window.finishes.length")
    await page.eval(f"document.querySelector({json.dumps(click)}).click()")
    await page.wait(f"window.finishes.length > {finished}"
                    " && !['submitted', 'streaming'].includes(tg.status())")
    return await _check_regenerated(page, chat_id, old, text)


async def _check_regenerated(page: Page, chat_id: str, old: dict[str, Any],
                             text: str) -> dict[str, Any]:
    state = await page.shown()
    regenerates = [r for r in await page.responses() if r.get("trigger") == "regenerate-message"]
    context = f"page: {state}\nregenerate requests: {regenerates}"
    assert state["status"] == "ready" and state["error"] is None, context
    new: dict[str, Any] = state["messages"][-1]
    assert new["role"] == "assistant" and new["text"] == text, context
    assert new["id"] != old["id"], context
    assert old["id"] not in [m["id"] for m in state["messages"]], context
    rows = await settled(page.gw, chat_id, "superseded")
    by_id = {str(r["id"]): r for r in rows}
    assert by_id[old["id"]]["status"] == "superseded", by_id[old["id"]]
    assert by_id[new["id"]]["status"] == "complete" and text_of(by_id[new["id"]]) == text
    assert by_id[new["id"]]["turn_id"] == by_id[old["id"]]["turn_id"]
    # The default list leaves the superseded reply out: it is what the page shows
    # (a user message's id on the page is its turn id, a reply's is the row id).
    visible = await stored(page.gw, chat_id)
    assert [r["turn_id"] if r["role"] == "user" else str(r["id"]) for r in visible] == [
        m["id"] for m in state["messages"]]
    return new


async def test_regenerate_after_complete_and_failed_and_twice(
    driver: Driver, database_url: str
) -> None:
    async with usechat_page(driver, database_url) as page:
        chat_id = new_chat_id()
        gw = page.gw
        await page.open(chat_id, SHORT)

        # After a complete reply, with another model.
        await page.send("first question")
        await page.ready_with(words(5))
        old = (await page.shown())["messages"][-1]
        await _regenerate_to(page, chat_id, old, "scripted:tokens=7", words(7))

        # After a failed reply: the failure reads as a sentence, Regenerate answers anew.
        await page.send("second question", model="scripted:tokens=10,fail_after=3")
        await page.wait("tg.status() === 'error'")
        state = await page.shown()
        assert is_sentence(state["error"]), state
        failed = state["messages"][-1]
        assert failed["role"] == "assistant" and failed["text"] == words(3), state
        rows = await settled(gw, chat_id)
        assert str(rows[-1]["id"]) == failed["id"]
        assert rows[-1]["status"] not in ("complete", "superseded"), rows[-1]
        await _regenerate_to(page, chat_id, failed, "scripted:tokens=6", words(6))
        await page.screenshot("regenerated-after-failure")

        # Regenerate clicked twice quickly (two requests): one generation, one new reply.
        old = (await page.shown())["messages"][-1]
        count = generations(gw)
        await page.set_model("scripted:tokens=8,delay_ms=20")
        await page.eval("{ const b = document.querySelector('#regenerate'); b.click(); b.click() }")
        await page.wait(f"tg.status() === 'ready' && tg.assistantText() === {json.dumps(words(8))}"
                        f" && tg.messages().at(-1).id !== {json.dumps(old['id'])}")
        new = await _check_regenerated(page, chat_id, old, words(8))
        regenerates = [r for r in await page.responses()
                       if r.get("trigger") == "regenerate-message" and r["status"] is not None]
        assert [r["status"] for r in regenerates][-2:] == [200, 200], regenerates
        assert generations(gw) == count + 1
        rows = await settled(gw, chat_id, "superseded")
        replies = [r for r in rows if r["role"] == "assistant"
                   and r["turn_id"] == rows[-1]["turn_id"]]
        # this turn's replies: the failed one, the first regenerated one, and the new one
        assert [r["status"] for r in replies] == ["superseded", "superseded", "complete"], replies
        assert str(rows[-1]["id"]) == new["id"]
        await page.screenshot("regenerated-twice")


# Long enough to be mid-reply at Stop, short enough that a wrong attach ends quickly.
STOPPABLE = "scripted:tokens=100,delay_ms=30"


async def _stop_then_regenerate(driver: Driver, database_url: str, click: str) -> None:
    async with usechat_page(driver, database_url) as page:
        chat_id = new_chat_id()
        await page.open(chat_id, STOPPABLE)
        await page.send("a question to stop")
        # Stop, then Regenerate at once (the stopped generation is still in its grace).
        shown_at_stop = await page.eval("tg.stopWhenShown(20)")
        await page.wait("tg.status() === 'ready'")
        stopped = (await page.shown())["messages"][-1]
        assert stopped["role"] == "assistant" and stopped["text"] == shown_at_stop
        await _regenerate_to(page, chat_id, stopped, "scripted:tokens=4", words(4), click)
        rows = await settled(page.gw, chat_id, "superseded")
        stored_text = text_of(next(r for r in rows if str(r["id"]) == stopped["id"]))
        assert_stored_as_stopped(stored_text, shown_at_stop, await page.wire_at_stop())
        usage, _ = await page.gw.store.list_usage(page.gw.user_id, thread_id=chat_id)
        # one usage row per reply, the superseded one's included
        assert sorted(str(u.message_id) for u in usage) == sorted(
            str(r["id"]) for r in rows if r["role"] == "assistant")
        await page.screenshot("regenerated-after-stop")


async def test_regenerate_reply_after_stop(driver: Driver, database_url: str) -> None:
    """The reply's own ↻: ``regenerate({messageId})``."""
    await _stop_then_regenerate(driver, database_url, "#messages .msg.assistant:last-child .regen")


async def test_regenerate_after_stop(driver: Driver, database_url: str) -> None:
    """The chat's Regenerate button: ``regenerate()``, which sends no messageId."""
    await _stop_then_regenerate(driver, database_url, "#regenerate")


async def test_error_reads_as_a_sentence(driver: Driver, database_url: str) -> None:
    async with usechat_page(driver, database_url) as page:
        chat_id = new_chat_id()
        await page.open(chat_id, "nope:x")
        await page.send("hello")
        await page.wait("tg.status() === 'error'")
        state = await page.shown()
        message = state["error"]
        assert message and is_sentence(message), state
        assert not message.lstrip().startswith("{")
        posts = [r for r in await page.responses() if r["method"] == "POST"]
        assert len(posts) == 1 and 400 <= (posts[0]["status"] or 0) < 500, posts
        assert posts[0]["errorCode"], posts
        await page.screenshot("error")
