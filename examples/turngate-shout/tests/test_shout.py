"""The shout adapter, tested through a live turngate with ``turngate.testing`` only."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from turngate.testing import (
    Stream,
    live_server,
    open_turn,
    resume_turn,
    start_turn,
    validate_ui_stream,
    wait_final,
)
from turngate.testing.conformance import check_adapter

pytestmark = pytest.mark.anyio

TEXT = "the quick brown fox jumps over the lazy dog again and again"
REPLY = "".join(word.upper() + " " for word in TEXT.split())


async def test_registered_through_the_entry_point() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="turngate.adapters")}
    assert found.get("shout") == "turngate_shout:ShoutAdapter", found
    async with live_server() as server:
        _, stream = await start_turn(server.client, await server.new_thread(), TEXT,
                                     model="no-such-adapter")
        assert stream.status == 400 and b"shout" in stream.body, stream.body


async def test_reply_and_usage() -> None:
    async with live_server() as server:
        thread = await server.new_thread()
        turn_id, stream = await start_turn(server.client, thread, TEXT, model="shout")
        validate_ui_stream(stream)
        assert stream.text == REPLY
        final = await wait_final(server.client, thread, turn_id)
        assert final.status == "complete" and final.text == REPLY
        [usage] = final.usage
        assert usage["estimated"] is False
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (12, 12)


async def test_a_bad_model_string_is_a_400_naming_it() -> None:
    async with live_server() as server:
        _, stream = await start_turn(server.client, await server.new_thread(), TEXT,
                                     model="shout:volume=11")
        assert stream.status == 400 and b"volume=11" in stream.body, stream.body


async def test_disconnect_at_every_index() -> None:
    model = "shout:delay_ms=5"
    # "cancel": the turn ends as the browser leaves (the default, "grace", waits 5 s
    # for the browser to come back first).
    async with live_server(env={"TURNGATE_ON_DISCONNECT": "cancel"}) as server:
        _, whole = await start_turn(server.client, await server.new_thread(), TEXT, model=model)
        last_delta = max(i for i, c in enumerate(whole.chunks) if c["type"] == "text-delta")
        for k in range(1, len(whole.events)):
            thread = await server.new_thread()
            async with open_turn(server.client, thread, TEXT, model=model) as turn:
                await turn.read(k)  # then the block ends: the browser closes the connection
            final = await wait_final(server.client, thread, turn.turn_id)
            delivered = turn.stream.text
            assert len(final.usage) == 1, (k, final.usage)
            if k <= last_delta:  # it left while words were still coming: cancelled there
                assert final.status == "cancelled", (k, final.status)
                assert final.usage[0]["estimated"] is True
                assert final.text.startswith(delivered) and REPLY.startswith(final.text), k
            else:
                assert final.status == "complete" and final.text == REPLY, (k, final.status)


async def test_resume_with_last_event_id() -> None:
    env = {"TURNGATE_ON_DISCONNECT": "continue"}
    async with live_server(env=env) as server:
        thread = await server.new_thread()
        turn_id, first = await start_turn(server.client, thread, TEXT, model="shout:delay_ms=5",
                                          leave_after=5)
        rest = await resume_turn(server.client, thread, turn_id, first.last_id)
        stitched = Stream(200, rest.headers, first.events + rest.events)
        validate_ui_stream(stitched)
        # A new thread's title is a transient chunk, sent without an id: not numbered.
        numbered = [e for e in stitched.events if '"transient":true' not in e.data]
        assert [int(e.id or -1) for e in numbered] == list(range(len(numbered)))
        assert stitched.text == REPLY
        final = await wait_final(server.client, thread, turn_id)
        assert final.status == "complete" and final.usage[0]["estimated"] is False


async def test_an_upstream_failure_is_a_safe_error() -> None:
    async with live_server() as server:
        thread = await server.new_thread()
        turn_id, stream = await start_turn(server.client, thread, TEXT,
                                           model="shout:fail_after=2")
        validate_ui_stream(stream)
        [error] = stream.of_type("error")
        assert "shout failed" not in error["errorText"]
        final = await wait_final(server.client, thread, turn_id)
        assert final.status == "error" and final.text == "THE QUICK "


async def test_passes_the_conformance_checks() -> None:
    report = await check_adapter("shout:delay_ms=1")  # the registered adapter
    assert report.ok, "\n".join(report.lines())
