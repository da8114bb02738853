from __future__ import annotations

import pytest

from persistence import Store, UsageRecord, build_user_content
from tests.fixtures_db import MakeThread

USAGE = UsageRecord(prompt_tokens=3, completion_tokens=5, total_tokens=8, cost_micros=42,
                    model_breakdown={"m": {"completion_tokens": 5}})


@pytest.mark.anyio
async def test_open_and_finalize_smoke(store: Store, user_id: int, make_thread: MakeThread) -> None:
    """A turn opens once (a repeat open returns the same rows) and its finalize stores
    the final content and status on the assistant row and exactly one usage row."""
    thread_id = await make_thread()
    opened = await store.open_turn(
        thread_id, user_id, "t1", build_user_content("hi"), lease_owner="p1", lease_seconds=30
    )
    assert opened.status == "opened", opened
    assert opened.assistant_message_id is not None
    again = await store.open_turn(
        thread_id, user_id, "t1", build_user_content("hi"), lease_owner="p1", lease_seconds=30
    )
    assert (again.user_message_id, again.assistant_message_id) == (
        opened.user_message_id, opened.assistant_message_id)
    assert not again.user_inserted and not again.assistant_inserted
    msgs = await store.list_messages(thread_id, user_id)
    assert msgs is not None
    assert [(m.role, m.status) for m in msgs] == [("user", "complete"), ("assistant", "streaming")]
    assert (await store.list_usage(user_id, thread_id=thread_id))[0] == []

    reply = [{"type": "text", "text": "hello back"}]
    outcome = await store.finalize_turn(
        opened.assistant_message_id, thread_id, user_id, reply, "complete", USAGE
    )
    assert outcome == "ok"

    turn = await store.get_turn(thread_id, "t1")
    assert turn.user is not None and turn.user.content == build_user_content("hi")
    assert turn.assistant is not None
    assert (turn.assistant.id, turn.assistant.status, turn.assistant.content) == (
        opened.assistant_message_id, "complete", reply)
    usage, _ = await store.list_usage(user_id, thread_id=thread_id)
    assert [
        (u.message_id, u.thread_id, u.user_id, u.usage_type, u.prompt_tokens,
         u.completion_tokens, u.total_tokens, u.cost_micros, u.model_breakdown, u.estimated)
        for u in usage
    ] == [(opened.assistant_message_id, thread_id, user_id, "chat", 3, 5, 8, 42,
           {"m": {"completion_tokens": 5}}, False)]
    # A finalized turn is replayed, not reopened.
    replay = await store.open_turn(
        thread_id, user_id, "t1", build_user_content("hi"), lease_owner="p1", lease_seconds=30
    )
    assert replay.status == "opened" and replay.assistant_status == "complete"
    assert not replay.assistant_inserted
