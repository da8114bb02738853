"""A new thread's title after its first turn, on both databases over real HTTP.

The title comes from ``TURNGATE_TITLE_MODEL`` (here the scripted adapter) or from the
first words of the user's text; it is written only while the thread is untitled, so
a user's own title wins; the title model's tokens are their own usage row; the
stream carries a transient ``data-title`` chunk (no SSE id, never replayed) when the
title is written before the stream ends; the reply itself is not held up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from gateway.turn import titles
from gateway.turn.titles import TITLE_CHARS, clean_title, first_words
from llm_adapters.base import AdapterRequest
from llm_adapters.events import AdapterEvent
from llm_adapters.scripted import ScriptedAdapter
from persistence import Store, UsageRecord
from tests.fixtures_db import PG_HOST, PG_PORT, PG_USER, RoundTripProxy
from tests.fixtures_server import GatewayServer, run_gateway
from tests.js_support import require_chromium, run_node
from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.tracing import trace_turns
from tests.waiting import Reading, eventually, gateway_idle, until

pytestmark = pytest.mark.anyio

REPLY = "scripted:tokens=3"
IMAGE = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
         "nGNgYGD4DwABBAEAfbLI3wAAAABJRU5ErkJggg==")


def _full_reply(n: int) -> str:
    return " ".join(f"w{i}" for i in range(1, n + 1))


def _title_tasks() -> int:
    """Title tasks still running in this loop (the gateway runs in the test's loop)."""
    return sum(
        1 for t in asyncio.all_tasks()
        if str(getattr(t.get_coro(), "__qualname__", "")).startswith("Titler._from_")
    )


async def titles_settled(gw: GatewayServer) -> None:
    """Until every title the gateway started making has been written or given up."""
    await gateway_idle(gw)

    async def probe() -> int:
        return _title_tasks()

    await eventually(probe, lambda n: n == 0, within=10, what="title tasks still running")


async def _turn(client: httpx.AsyncClient, thread: str, turn_id: str, text: str,
                model: str = REPLY) -> Stream:
    s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                             json={"turn_id": turn_id, "text": text, "model": model})
    validate_ui_stream(s)
    return s


async def _listed_title(client: httpx.AsyncClient, thread: str) -> str | None:
    threads = (await client.get("/v1/threads")).json()["threads"]
    titles: dict[str, str | None] = {t["id"]: t["title"] for t in threads}
    return titles[thread]


async def _usage(client: httpx.AsyncClient, thread: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = (
        await client.get("/v1/usage", params={"thread_id": thread})
    ).json()["usage"]
    return rows


def _title_chunks(s: Stream) -> list[dict[str, Any]]:
    return [e.chunk for e in s.events if e.chunk and e.chunk["type"] == "data-title"]


# -- the words -----------------------------------------------------------------------


def test_first_words_cut_at_a_word_boundary() -> None:
    assert first_words("  Plan a\n\ttrip   to Lisbon ") == "Plan a trip to Lisbon"
    assert first_words(" \n ") is None
    long = "word " * 40
    cut = first_words(long)
    assert cut is not None and len(cut) <= TITLE_CHARS and cut.endswith("word")
    assert cut == " ".join(["word"] * 16)  # 16 × 4 + 15 spaces = 79; one more is 84
    assert first_words("x" * 200) == "x" * TITLE_CHARS  # one long word is cut


def test_a_model_answer_is_cleaned_into_a_title() -> None:
    assert clean_title('Title: "Trip to Lisbon".') == "Trip to Lisbon"
    assert clean_title("\n\n**Lisbon trip**\nmore text") == "Lisbon trip"
    assert clean_title("# “Planning a trip”") == "Planning a trip"
    assert clean_title("  \n ") is None


# -- from the user's words -------------------------------------------------------------


async def test_first_turn_titles_the_thread_from_the_users_words(database_url: str) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        assert await _listed_title(client, thread) is None
        s = await _turn(client, thread, "t1", "  Plan a   trip to\nLisbon in May please ")
        title = "Plan a trip to Lisbon in May please"

        # The chunk: transient, no SSE id, before the closing chunks; the ids around it
        # stay dense, so Last-Event-ID resumes are unaffected.
        [event] = [e for e in s.events if e.id is None]
        assert event.chunk == {"type": "data-title", "transient": True,
                               "data": {"threadId": thread, "title": title}}
        kinds = [e.chunk["type"] if e.chunk else "[DONE]" for e in s.events]
        assert kinds.index("data-title") < kinds.index("finish-step") < kinds.index("finish")
        assert [int(e.id) for e in s.events if e.id is not None] == list(range(len(kinds) - 1))
        assert s.text == "w1 w2 w3 "

        # Written before the stream ended: the list has it as soon as the stream is read.
        assert await _listed_title(client, thread) == title
        row = await gw.store.get_thread(thread, gw.user_id)
        assert row is not None and row.title == title
        # No model was asked: the turn's own usage row only.
        assert [u["usage_type"] for u in await _usage(client, thread)] == ["chat"]

        # A later turn is not a first turn: no chunk, the title stays.
        s2 = await _turn(client, thread, "t2", "something else entirely")
        assert _title_chunks(s2) == []
        assert await _listed_title(client, thread) == title


async def test_the_open_titles_only_an_untitled_threads_first_turn(store: Store) -> None:
    user = await store.create_user("ada")
    text = [{"type": "text", "text": "hello"}]

    async def open_(thread: str, turn_id: str, title: str | None = "T") -> bool:
        opened = await store.open_turn(thread, user, turn_id, text, lease_owner="x",
                                       lease_seconds=30, title=title)
        assert opened.status == "opened"
        if opened.assistant_inserted:  # done: the thread takes its next turn
            assert await store.finalize_turn(
                opened.assistant_message_id or 0, thread, user, [], "complete",
                UsageRecord(prompt_tokens=1, completion_tokens=1, total_tokens=2),
            ) == "ok"
        return opened.titled

    async def title_of(thread: str) -> str | None:
        row = await store.get_thread(thread, user)
        assert row is not None
        return row.title

    fresh, _ = await store.create_thread(user)
    assert await open_(fresh.id, "t1") is True and await title_of(fresh.id) == "T"
    assert await open_(fresh.id, "t1", "again") is False  # a repeat writes nothing
    named, _ = await store.create_thread(user, title="Mine")
    assert await open_(named.id, "t1") is False and await title_of(named.id) == "Mine"
    cleared, _ = await store.create_thread(user)
    assert await open_(cleared.id, "t1", None) is False and await title_of(cleared.id) is None
    # Its second turn is not a first turn.
    assert await open_(cleared.id, "t2") is False and await title_of(cleared.id) is None


async def test_a_cleared_title_is_not_given_again_by_a_later_turn(database_url: str) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        await _turn(client, thread, "t1", "first words here")
        r = await client.patch(f"/v1/threads/{thread}", json={"title": None})
        assert r.status_code == 200 and r.json()["title"] is None
        s = await _turn(client, thread, "t2", "second turn words")
        assert _title_chunks(s) == []
        await titles_settled(gw)
        assert await _listed_title(client, thread) is None


async def test_a_regenerate_does_not_give_back_a_cleared_title(database_url: str) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        await _turn(client, thread, "t1", "first words here")
        r = await client.patch(f"/v1/threads/{thread}", json={"title": None})
        assert r.status_code == 200
        again = await stream_request(client, "POST", f"/v1/threads/{thread}/turns/t1/regenerate",
                                     json={"model": REPLY})
        validate_ui_stream(again)
        assert again.text == "w1 w2 w3 " and _title_chunks(again) == []
        await titles_settled(gw)
        assert await _listed_title(client, thread) is None


async def test_only_an_untitled_threads_first_turn_is_titled_in_the_store(
    database_url: str,
) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        store, user = gw.store, gw.user_id
        thread = await gw.new_thread(client)
        await _turn(client, thread, "t1", "first words here")
        await _turn(client, thread, "t2", "second")
        await store.rename_thread(thread, user, None)
        # Straight to the store, past the request's own check: a later turn is refused.
        assert await store.thread_needs_title(thread, user, "t2") is False
        assert await store.set_title_if_untitled(thread, user, "t2", "later") is False
        # The first turn is still the first; someone else's thread is not theirs.
        other, _ = await gw.new_user("mallory")
        assert await store.thread_needs_title(thread, other, "t1") is False
        assert await store.set_title_if_untitled(thread, other, "t1", "theirs") is False
        assert await store.thread_needs_title(thread, user, "t1") is True
        assert await store.set_title_if_untitled(thread, user, "t1", "first") is True
        # Titled now: nothing overwrites it.
        assert await store.thread_needs_title(thread, user, "t1") is False
        assert await store.set_title_if_untitled(thread, user, "t1", "again") is False
        row = await store.get_thread(thread, user)
        assert row is not None and row.title == "first"


async def test_a_thread_created_with_a_title_keeps_it(database_url: str) -> None:
    async with run_gateway(database_url, TURNGATE_TITLE_MODEL="scripted:tokens=2,trace=tm") \
            as gw, gw.client() as client:
        traces = trace_turns(gw)
        thread = (await client.post("/v1/threads", json={"title": "Mine"})).json()["id"]
        s = await _turn(client, thread, "t1", "words that would make a title")
        assert _title_chunks(s) == []
        await titles_settled(gw)
        assert await _listed_title(client, thread) == "Mine"
        # The title model was never asked (nothing paid for a title that cannot be used).
        assert "tm" not in traces
        assert [u["usage_type"] for u in await _usage(client, thread)] == ["chat"]


async def test_an_image_only_first_message_is_titled_from_the_reply(
    database_url: str,
) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                 json={"turn_id": "t1", "text": "", "images": [IMAGE],
                                       "model": REPLY})
        validate_ui_stream(s)
        assert [c["data"]["title"] for c in _title_chunks(s)] == ["w1 w2 w3"]
        assert await _listed_title(client, thread) == "w1 w2 w3"


# -- from the title model ----------------------------------------------------------------


async def test_title_model_titles_the_thread_and_books_its_own_usage(
    database_url: str,
) -> None:
    async with run_gateway(database_url, TURNGATE_TITLE_MODEL="scripted:tokens=4") as gw, \
            gw.client() as client:
        thread = await gw.new_thread(client)
        started = time.monotonic()
        s = await _turn(client, thread, "t1", "Plan a trip to Lisbon")
        assert s.text == "w1 w2 w3 " and s.chunks[-1]["finishReason"] == "stop"

        async def listed() -> str | None:
            return await _listed_title(client, thread)

        assert await eventually(listed, lambda t: t is not None, within=10,
                                what="the model's title") == "w1 w2 w3 w4"
        # When the model was done before the stream ended, the stream said so too.
        assert [c["data"]["title"] for c in _title_chunks(s)] in ([], ["w1 w2 w3 w4"])
        assert time.monotonic() - started < 10

        rows = await _usage(client, thread)
        by_type = {u["usage_type"]: u for u in rows}
        assert sorted(by_type) == ["chat", "title"] and len(rows) == 2
        title_row, chat_row = by_type["title"], by_type["chat"]
        assert title_row["message_id"] is None and title_row["thread_id"] == thread
        assert chat_row["message_id"] is not None
        assert title_row["completion_tokens"] == 4 and not title_row["estimated"]
        assert title_row["prompt_tokens"] > 0
        assert title_row["total_tokens"] == (title_row["prompt_tokens"]
                                             + title_row["completion_tokens"])
        assert list(title_row["model_breakdown"]) == ["scripted:tokens=4"]
        assert [c["model"] for c in title_row["call_details"]] == ["scripted:tokens=4"]
        # The turn's own row is the reply's alone.
        assert chat_row["completion_tokens"] == 3
        assert list(chat_row["model_breakdown"]) == [REPLY]


async def test_a_users_rename_during_the_title_call_wins(database_url: str) -> None:
    slow = "scripted:tokens=2,delay_ms=300"
    async with run_gateway(database_url, TURNGATE_TITLE_MODEL=slow) as gw, \
            gw.client() as client:
        thread = await gw.new_thread(client)
        s = await _turn(client, thread, "t1", "Plan a trip to Lisbon")
        assert _title_chunks(s) == []  # the model is far slower than the reply
        r = await client.patch(f"/v1/threads/{thread}", json={"title": "My own title"})
        assert r.status_code == 200

        async def title_rows() -> list[dict[str, Any]]:
            return [u for u in await _usage(client, thread) if u["usage_type"] == "title"]

        # The title call ends with its usage row, written with the conditional title.
        [row] = await eventually(title_rows, lambda rows: len(rows) == 1, within=10,
                                 what="the title model's usage row")
        assert row["completion_tokens"] == 2
        assert await _listed_title(client, thread) == "My own title"


async def test_a_failing_title_model_does_not_fail_the_turn(database_url: str) -> None:
    async with run_gateway(database_url, TURNGATE_TITLE_MODEL="scripted:fail_after=0") as gw, \
            gw.client() as client:
        thread = await gw.new_thread(client)
        s = await _turn(client, thread, "t1", "Plan a trip to Lisbon")
        assert s.text == "w1 w2 w3 " and s.chunks[-1]["finishReason"] == "stop"
        assert [c["type"] for c in s.chunks if c["type"] == "error"] == []
        rows = await gw.store.list_messages(thread, gw.user_id)
        assert rows is not None and rows[-1].status == "complete"

        async def listed() -> str | None:
            return await _listed_title(client, thread)

        # The first words instead, and the failed call's tokens still booked (estimated).
        assert await eventually(listed, lambda t: t is not None, within=10,
                                what="the fallback title") == "Plan a trip to Lisbon"
        [row] = [u for u in await _usage(client, thread) if u["usage_type"] == "title"]
        assert row["estimated"] and row["message_id"] is None and row["total_tokens"] > 0
        # The thread takes its next turn.
        await _turn(client, thread, "t2", "next")


async def test_an_unknown_title_adapter_falls_back_to_the_first_words(
    database_url: str,
) -> None:
    async with run_gateway(database_url, TURNGATE_TITLE_MODEL="nosuch:model") as gw, \
            gw.client() as client:
        thread = await gw.new_thread(client)
        s = await _turn(client, thread, "t1", "Plan a trip to Lisbon")
        assert s.chunks[-1]["finishReason"] == "stop"

        async def listed() -> str | None:
            return await _listed_title(client, thread)

        assert await eventually(listed, lambda t: t is not None, within=10,
                                what="the fallback title") == "Plan a trip to Lisbon"
        # Written with the title in one transaction: no call was made, no row.
        assert [u["usage_type"] for u in await _usage(client, thread)] == ["chat"]


class GatedAdapter(ScriptedAdapter):
    """``scripted`` behind a gate: ``gated:gate=KEY,...`` waits for ``gates[KEY]``
    before it streams what ``scripted:...`` streams, and says when it was asked."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, anyio.Event] = {}
        self.asked: dict[str, anyio.Event] = {}

    def gate(self, key: str) -> anyio.Event:
        return self.gates.setdefault(key, anyio.Event())

    def was_asked(self, key: str) -> anyio.Event:
        return self.asked.setdefault(key, anyio.Event())

    @staticmethod
    def _split(model: str) -> tuple[str, str]:
        key, rest = "", []
        for item in model.split(","):
            if item.startswith("gate="):
                key = item.removeprefix("gate=")
            else:
                rest.append(item)
        return key, ",".join(rest)

    def validate_model(self, model: str) -> None:
        super().validate_model(self._split(model)[1])

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        key, model = self._split(request.model)
        self.was_asked(key).set()
        await self.gate(key).wait()
        async with aclosing(super().stream(dataclasses.replace(request, model=model))) as inner:
            async for event in inner:
                yield event


def _gated(gw: GatewayServer) -> GatedAdapter:
    adapter = GatedAdapter()
    gw.ctx.adapters.register("gated", lambda env: adapter)
    return adapter


async def test_a_quick_title_models_title_arrives_before_the_finish(
    database_url: str,
) -> None:
    async with run_gateway(database_url, TURNGATE_TITLE_MODEL="scripted:tokens=2") as gw, \
            gw.client() as client:
        gated = _gated(gw)
        thread = await gw.new_thread(client)
        lines: list[str] = []
        async with client.stream(
            "POST", f"/v1/threads/{thread}/turns",
            json={"turn_id": "t1", "text": "Plan a trip to Lisbon",
                  "model": "gated:gate=reply,tokens=3"},
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                lines.append(line)
                if '"data-title"' in line:
                    # The reply is still held at its gate: the title came beside it.
                    assert not [ln for ln in lines if '"text-delta"' in ln]
                    gated.gate("reply").set()
        assert gated.gate("reply").is_set(), "no data-title chunk before the end"
        events = [json.loads(ln.removeprefix("data: ")) for ln in lines
                  if ln.startswith("data: {")]
        kinds = [e["type"] for e in events]
        assert kinds.count("data-title") == 1 and kinds[-1] == "finish"
        assert kinds.index("data-title") < kinds.index("text-delta") < kinds.index("finish")
        [title] = [e for e in events if e["type"] == "data-title"]
        assert title == {"type": "data-title", "transient": True,
                         "data": {"threadId": thread, "title": "w1 w2"}}
        assert await _listed_title(client, thread) == "w1 w2"
        assert sorted(u["usage_type"] for u in await _usage(client, thread)) == [
            "chat", "title"]


async def test_a_slow_title_model_does_not_hold_the_reply_and_is_stored_after_it(
    database_url: str,
) -> None:
    async with run_gateway(database_url,
                           TURNGATE_TITLE_MODEL="gated:gate=title,tokens=2") as gw, \
            gw.client() as client:
        gated = _gated(gw)
        thread = await gw.new_thread(client)
        # The title model is asked at launch and holds until its gate opens: the reply
        # streams from its first token to its end meanwhile.
        s = await _turn(client, thread, "t1", "Plan a trip to Lisbon",
                        model="scripted:tokens=3")
        with anyio.fail_after(10):  # asked after a check of the thread, beside the reply
            await gated.was_asked("title").wait()
        assert not gated.gate("title").is_set()
        assert s.text == "w1 w2 w3 " and s.chunks[-1]["type"] == "finish"
        assert _title_chunks(s) == []  # not ready before the end: not on the stream
        assert await _listed_title(client, thread) is None
        gated.gate("title").set()

        async def listed() -> str | None:
            return await _listed_title(client, thread)

        # Stored once it comes, with its own usage row.
        assert await eventually(listed, lambda t: t is not None, within=10,
                                what="the late title") == "w1 w2"
        await titles_settled(gw)
        [row] = [u for u in await _usage(client, thread) if u["usage_type"] == "title"]
        assert row["completion_tokens"] == 2 and row["message_id"] is None
        assert row["prompt_tokens"] > 0 and not row["estimated"]


# -- not replayed ------------------------------------------------------------------------


async def test_a_reader_attached_mid_turn_gets_the_title_a_late_one_does_not(
    database_url: str,
) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        body = {"turn_id": "t1", "text": "Plan a trip", "model": "scripted:tokens=30,delay_ms=20"}
        turns = f"/v1/threads/{thread}/turns"
        box: dict[str, Stream] = {}

        async def first() -> None:
            box["first"] = await stream_request(client, "POST", turns, json=body)

        async def attached() -> None:
            # The same turn sent again while it streams: this reader attaches to it.
            await eventually(lambda: _streaming(gw, thread), bool, within=5,
                             what="the turn to stream")
            box["again"] = await stream_request(client, "POST", turns, json=body)

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(attached)
        for s in (box["first"], box["again"]):
            validate_ui_stream(s)
            assert [c["data"]["title"] for c in _title_chunks(s)] == ["Plan a trip"]
        # The same turn sent once more after it ended: a replay, without the title.
        late = await stream_request(client, "POST", turns, json=body)
        validate_ui_stream(late)
        assert late.text == box["first"].text and _title_chunks(late) == []


async def _streaming(gw: GatewayServer, thread: str) -> bool:
    return gw.ctx.relay.running_on_thread(thread) is not None



async def test_the_title_chunk_is_not_replayed(database_url: str) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        live = await _turn(client, thread, "t1", "Plan a trip to Lisbon")
        assert len(_title_chunks(live)) == 1
        kept = [e for e in live.events if e.id is not None]
        # From the relay's copy of the finished turn, then from the stored row.
        from_relay = await stream_request(client, "GET", f"/v1/threads/{thread}/turns/t1/stream")
        for event in kept[:-1]:  # resumes from the relay's copy, from any id
            tail = await stream_request(client, "GET", f"/v1/threads/{thread}/turns/t1/stream",
                                        headers={"last-event-id": event.id or ""})
            assert _title_chunks(tail) == [] and tail.done, event.id
        gw.ctx.relay.retention_seconds = 0
        gw.ctx.relay.sweep()
        from_row = await stream_request(client, "GET", f"/v1/threads/{thread}/turns/t1/stream")
        for replay in (from_relay, from_row):
            validate_ui_stream(replay)
            assert _title_chunks(replay) == []
            assert [e.id for e in replay.events] == [e.id for e in kept]
        # A resume from any id, also from just before where the title was sent, has none.
        for event in kept[:-1]:
            tail = await stream_request(client, "GET", f"/v1/threads/{thread}/turns/t1/stream",
                                        headers={"last-event-id": event.id or ""})
            assert _title_chunks(tail) == [] and tail.done, event.id


# -- the reply is not held up --------------------------------------------------------


async def _first_token_round_trips(
    client: httpx.AsyncClient, proxy: RoundTripProxy, thread: str, turn_id: str
) -> tuple[int, int]:
    """Round trips until the first text delta arrived, and until the stream ended."""
    proxy.reset()
    at_first_token = -1
    async with client.stream(
        "POST", f"/v1/threads/{thread}/turns",
        json={"turn_id": turn_id, "text": "count my round trips",
              "model": "scripted:tokens=3,delay_ms=100"},
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if at_first_token < 0 and '"text-delta"' in line:
                at_first_token = proxy.round_trips
            if line == "data: [DONE]":
                break
    return at_first_token, proxy.round_trips


async def test_a_first_turn_costs_no_round_trip_more_than_a_later_one_on_postgres(
    _pg_session_database: str, pg_url: str, round_trip_proxy: RoundTripProxy,
) -> None:
    # No maintenance pass may fall inside the counted windows.
    quiet = {"TURNGATE_CHECKPOINT_SECONDS": "3600", "TURNGATE_LEASE_SECONDS": "7200"}
    for title_model in ("", "scripted:tokens=2"):
        async with run_gateway(round_trip_proxy.url(_pg_session_database),
                               TURNGATE_TITLE_MODEL=title_model, **quiet) as gw, \
                gw.client() as client:
            earlier = await gw.new_thread(client)  # authenticates: the key is now known
            await _turn(client, earlier, "warm", "warm the pool")
            # The same sequence three times: the pool hands out the same connections in
            # the same order, so by the last round every statement is prepared on them
            # (a first use costs asyncpg one more round trip); the last round counts.
            for round_ in range(3):
                fresh = await gw.new_thread(client)
                await titles_settled(gw)
                later_first, later_total = await _first_token_round_trips(
                    client, round_trip_proxy, earlier, f"later{round_}")
                first_first, first_end = await _first_token_round_trips(
                    client, round_trip_proxy, fresh, "first")
                await titles_settled(gw)
                first_total = round_trip_proxy.round_trips
            assert later_first == 1 and later_total == 2, (later_first, later_total)
            assert await _listed_title(client, fresh) is not None
            if not title_model:
                # The first words go with the open statement: open, final write, as for
                # any later turn, the title already stored when the stream ended.
                assert first_first == 1 and first_end == first_total == 2, (
                    first_first, first_end, first_total)
            else:
                # The model's title costs its own: the check that the thread still
                # wants one and the write with its usage row, both beside the reply
                # (this quick model is done before the reply's first token); one may
                # share a flight with the turn's own.
                assert first_first <= 3 and 3 <= first_total <= 4, (
                    first_first, first_total)


async def test_a_new_threads_first_turn_takes_two_store_operations(
    database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with run_gateway(database_url) as gw, gw.client() as client:
        earlier = await gw.new_thread(client)
        await _turn(client, earlier, "warm", "warm up")
        fresh = await gw.new_thread(client)
        await titles_settled(gw)
        store = gw.ctx.store
        ops: list[str] = []
        run = store._run_statement

        async def counted(fn: Any, *, quiet: bool = False, write: bool) -> Any:
            ops.append(getattr(fn, "__qualname__", "?"))
            return await run(fn, quiet=quiet, write=write)

        monkeypatch.setattr(store, "_run_statement", counted)
        for thread, turn_id in ((earlier, "later"), (fresh, "first")):
            ops.clear()
            s = await _turn(client, thread, turn_id, "Plan a trip to Lisbon")
            await titles_settled(gw)
            # The open (with the title, on the first turn) and the final write.
            assert len(ops) == 2, (turn_id, ops)
        assert [c["data"]["title"] for c in _title_chunks(s)] == ["Plan a trip to Lisbon"]
        assert await _listed_title(client, fresh) == "Plan a trip to Lisbon"
        assert await _listed_title(client, earlier) == "warm up"


async def test_a_slow_title_write_does_not_hold_the_end_of_the_stream(
    _pg_session_database: str, pg_url: str,
) -> None:
    async with run_gateway(pg_url) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                     database=_pg_session_database)
        try:
            blocker = conn.transaction()
            seen: dict[str, float] = {}
            chunks: list[str] = []
            # No words from the user: the title comes from the reply, written after it.
            async with client.stream(
                "POST", f"/v1/threads/{thread}/turns",
                json={"turn_id": "t1", "text": "", "images": [IMAGE],
                      "model": "scripted:tokens=10,delay_ms=50"},
            ) as r:
                async for line in r.aiter_lines():
                    if '"text-delta"' in line and "locked" not in seen:
                        # Opened (its statement bumped the thread): now another session
                        # holds the thread's row, so the title's UPDATE waits for it,
                        # while the reply's final write (its message, its usage row) does
                        # not touch that row.
                        await blocker.start()
                        await conn.fetchval(
                            "SELECT title FROM threads WHERE id = $1 FOR UPDATE", thread)
                        seen["locked"] = time.monotonic()
                    if '"text-delta"' in line:
                        seen["last delta"] = time.monotonic()
                    if line.startswith("data: "):
                        chunks.append(line)
                    if line == "data: [DONE]":
                        seen["done"] = time.monotonic()
            await blocker.rollback()
        finally:
            await conn.close()
        assert not [c for c in chunks if '"data-title"' in c]  # not written: not announced
        assert '"finishReason":"stop"' in chunks[-2]
        # The end waited one second for the title, not the statement timeout (5 s).
        gap = seen["done"] - seen["last delta"]
        assert 1.0 <= gap < 2.5, gap

        async def listed() -> str | None:
            return await _listed_title(client, thread)

        # Once the row is free the title lands.
        assert await eventually(listed, lambda t: t is not None, within=10,
                                what="the title after the lock") == _full_reply(10)


@pytest.mark.browser
async def test_the_page_shows_the_title_models_title_without_a_reload(
    database_url: str,
) -> None:
    chromium = require_chromium()
    slow = "scripted:tokens=2,delay_ms=300"  # lands after the reply: the page asks again
    async with run_gateway(database_url, TURNGATE_TITLE_MODEL=slow) as gw:
        out = await run_node("browser_title.mjs", json.dumps({
            "url": gw.url, "key": gw.key, "chromium": chromium, "model": REPLY,
            "text": "  Plan a   trip to Lisbon ", "expected": "w1 w2",
        }), limit=60)
        assert out["pageErrors"] == []
        # The first words at once (the page's own), the model's title later, in the
        # header and the sidebar; the chat was created untitled.
        assert out["titleWhileStreaming"] == "Plan a trip to Lisbon"
        assert out["titleLater"] == out["sidebar"] == "w1 w2"
        row = await gw.store.get_thread(out["threadId"], gw.user_id)
        assert row is not None and row.title == "w1 w2"
        assert "POST /v1/threads" in out["requests"]


async def test_a_title_model_past_its_timeout_gives_way_to_the_first_words(
    database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(titles, "MODEL_TIMEOUT_SECONDS", 0.5)
    hanging = "scripted:tokens=100,delay_ms=200"  # 20 s of title
    async with run_gateway(database_url, TURNGATE_TITLE_MODEL=hanging) as gw, \
            gw.client() as client:
        thread = await gw.new_thread(client)
        s = await _turn(client, thread, "t1", "Plan a trip to Lisbon")
        assert s.chunks[-1]["finishReason"] == "stop"

        async def listed() -> str | None:
            return await _listed_title(client, thread)

        assert await eventually(listed, lambda t: t is not None, within=10,
                                what="the fallback title") == "Plan a trip to Lisbon"
        [row] = [u for u in await _usage(client, thread) if u["usage_type"] == "title"]
        # Cut after about two deltas: what it said is estimated, not lost.
        assert row["estimated"] and 0 < row["completion_tokens"] < 100


async def test_a_shutdown_during_the_title_call_still_books_its_tokens(
    database_url: str,
) -> None:
    slow = "scripted:tokens=100,delay_ms=200,trace=tm"
    async with run_gateway(database_url, TURNGATE_TITLE_MODEL=slow) as gw, \
            gw.client() as client:
        traces = trace_turns(gw)
        thread = await gw.new_thread(client)
        await _turn(client, thread, "t1", "Plan a trip to Lisbon")
        user = gw.user_id
        await until(lambda: "tm" in traces and traces["tm"].deltas_sent >= 2, within=10,
                    what="the title call under way")
    # The gateway has stopped (its task group cut the call): what was written?
    async with Store(database_url) as store:
        row = await store.get_thread(thread, user)
        assert row is not None and row.title == "Plan a trip to Lisbon"
        usage, _ = await store.list_usage(user, thread_id=thread)
        [title_row] = [u for u in usage if u.usage_type == "title"]
        assert title_row.estimated and title_row.message_id is None
        assert 0 < title_row.completion_tokens < 100
    assert traces["tm"].closed and not traces["tm"].finished


async def test_a_drain_cuts_the_title_call_short_for_the_first_words(
    database_url: str,
) -> None:
    slow = "scripted:tokens=100,delay_ms=200,trace=tm"  # 20 s of title
    async with run_gateway(database_url, TURNGATE_TITLE_MODEL=slow,
                           TURNGATE_SHUTDOWN_GRACE_SECONDS="0.1") as gw, \
            gw.client() as client:
        traces = trace_turns(gw)
        thread = await gw.new_thread(client)
        reading = Reading()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: reading.run(
                client, "POST", f"/v1/threads/{thread}/turns",
                json={"turn_id": "t1", "text": "Plan a trip to Lisbon",
                      "model": "scripted:tokens=200,delay_ms=50"}))
            await reading.events_at_least(4)
            await until(lambda: "tm" in traces and traces["tm"].deltas_sent >= 1, within=10,
                        what="the title call under way")
            assert gw.ctx.shutdown_event is not None
            gw.ctx.shutdown_event.set()  # what SIGTERM does: the drain begins
        s = reading.stream
        assert s is not None
        validate_ui_stream(s)
        assert s.chunks[-1]["finishReason"] == "other"  # interrupted by the drain
        # The call was cut: the first words, on the stream before its end.
        assert [c["data"]["title"] for c in _title_chunks(s)] == ["Plan a trip to Lisbon"]
        await titles_settled(gw)
        assert traces["tm"].closed and not traces["tm"].finished
        row = await gw.store.get_thread(thread, gw.user_id)
        assert row is not None and row.title == "Plan a trip to Lisbon"
        # What the cut call said is booked, estimated.
        [title_row] = [u for u in await _usage(client, thread) if u["usage_type"] == "title"]
        assert title_row["estimated"] and 0 < title_row["completion_tokens"] < 100
