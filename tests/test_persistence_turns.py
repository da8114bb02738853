"""The turn writers on both databases: idempotency, races, busy threads, leases."""

from __future__ import annotations

import anyio
import pytest

from persistence import Store, TurnOpened, UsageRecord, build_user_content
from tests.fixtures_db import MakeThread
from tests.waiting import clock_past, lease_lapsed

USAGE = UsageRecord(prompt_tokens=3, completion_tokens=5, total_tokens=8, cost_micros=42)
USAGE_OTHER = UsageRecord(prompt_tokens=1, completion_tokens=1, total_tokens=2, estimated=True)


async def _open(store: Store, thread_id: str, owner: int, turn: str, **kw: float) -> TurnOpened:
    return await store.open_turn(
        thread_id,
        owner,
        turn,
        build_user_content(f"hello {turn}"),
        lease_owner="proc-1",
        lease_seconds=kw.get("lease_seconds", 60.0),
    )


async def _count(store: Store, sql: str) -> int:
    return int(await store._db.fetch_val(sql))


async def _gather(*fns: object) -> list[object]:
    results: list[object] = [None] * len(fns)

    async def run(i: int, fn: object) -> None:
        results[i] = await fn()  # type: ignore[operator]

    async with anyio.create_task_group() as tg:
        for i, fn in enumerate(fns):
            tg.start_soon(run, i, fn)
    return results


@pytest.mark.anyio
async def test_fifty_concurrent_opens_of_one_turn_write_one_pair(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    results = await _gather(*[lambda: _open(store, thread_id, user_id, "t1")] * 50)
    assert {r.status for r in results} == {"opened"}  # type: ignore[attr-defined]
    assert len({(r.user_message_id, r.assistant_message_id) for r in results}) == 1  # type: ignore[attr-defined]
    assert sum(r.user_inserted for r in results) == 1  # type: ignore[attr-defined]
    assert sum(r.assistant_inserted for r in results) == 1  # type: ignore[attr-defined]
    assert await _count(store, "SELECT count(*) FROM messages") == 2
    first = results[0]
    assert isinstance(first, TurnOpened)
    assert first.user_message_id is not None and first.assistant_message_id is not None
    assert first.user_message_id < first.assistant_message_id


@pytest.mark.anyio
async def test_fifty_turns_on_fifty_threads_write_fifty_pairs(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    threads = [await make_thread() for _ in range(50)]
    results = await _gather(
        *[(lambda t=t, i=i: _open(store, t, user_id, f"turn-{i}")) for i, t in enumerate(threads)]
    )
    assert all(isinstance(r, TurnOpened) and r.status == "opened" for r in results)
    ids = {(r.user_message_id, r.assistant_message_id) for r in results}  # type: ignore[attr-defined]
    assert len(ids) == 50
    assert await _count(store, "SELECT count(*) FROM messages") == 100


@pytest.mark.anyio
async def test_fifty_different_turns_on_one_thread_open_exactly_one(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    results = await _gather(
        *[(lambda i=i: _open(store, thread_id, user_id, f"turn-{i}")) for i in range(50)]
    )
    opened = [r for r in results if r.status == "opened"]  # type: ignore[attr-defined]
    busy = [r for r in results if r.status == "busy"]  # type: ignore[attr-defined]
    assert len(opened) == 1 and len(busy) == 49
    winner = opened[0]
    assert isinstance(winner, TurnOpened)
    turns = await store.list_messages(thread_id, user_id)
    assert turns is not None and len(turns) == 2  # the losers wrote nothing
    # Every loser names the winner's turn as the one holding the thread.
    assert {b.busy_turn_id for b in busy} == {turns[0].turn_id}  # type: ignore[attr-defined]
    assert turns[1].id == winner.assistant_message_id


@pytest.mark.anyio
async def test_repeat_open_recovers_and_reports_assistant_status(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    first = await _open(store, thread_id, user_id, "t1")
    assert first.user_inserted and first.assistant_inserted
    assert first.assistant_status == "streaming"
    before = await store.get_thread(thread_id, user_id)
    assert before is not None
    await clock_past(store, before.updated_at)
    again = await _open(store, thread_id, user_id, "t1")
    assert (again.user_message_id, again.assistant_message_id) == (
        first.user_message_id,
        first.assistant_message_id,
    )
    assert not again.user_inserted and not again.assistant_inserted
    assert again.assistant_status == "streaming"
    after = await store.get_thread(thread_id, user_id)
    assert before is not None and after is not None
    assert after.updated_at == before.updated_at  # no insert, no bump
    assert first.assistant_message_id is not None
    assert (
        await store.finalize_turn(
            first.assistant_message_id,
            thread_id,
            user_id,
            [{"type": "text", "text": "hi"}],
            "complete",
            USAGE,
        )
        == "ok"
    )
    replay = await _open(store, thread_id, user_id, "t1")
    assert replay.status == "opened" and replay.assistant_status == "complete"


@pytest.mark.anyio
async def test_open_bumps_thread_updated_at_on_insert(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    before = await store.get_thread(thread_id, user_id)
    assert before is not None
    await clock_past(store, before.updated_at)
    await _open(store, thread_id, user_id, "t1")
    after = await store.get_thread(thread_id, user_id)
    assert before is not None and after is not None
    assert after.updated_at > before.updated_at


@pytest.mark.anyio
async def test_open_on_foreign_or_missing_thread_writes_nothing(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    mallory = await store.create_user("mallory")
    thread_id = await make_thread()
    assert (await _open(store, thread_id, mallory, "t1")).status == "thread_not_found"
    assert (await _open(store, "nope", user_id, "t1")).status == "thread_not_found"
    assert await _count(store, "SELECT count(*) FROM messages") == 0
    assert await store.list_messages(thread_id, mallory) is None
    assert await store.list_messages(thread_id, user_id) == []


@pytest.mark.anyio
@pytest.mark.parametrize("order", ["append_first", "open_first", "concurrent"])
async def test_append_racing_open_creates_no_duplicates(
    store: Store, user_id: int, make_thread: MakeThread, order: str
) -> None:
    thread_id = await make_thread()
    content = build_user_content("hello t1")

    async def append() -> object:
        return await store.append_message(thread_id, user_id, "user", content, "t1")

    async def open_() -> object:
        return await _open(store, thread_id, user_id, "t1")

    if order == "append_first":
        appended, opened = await append(), await open_()
    elif order == "open_first":
        opened, appended = await open_(), await append()
    else:
        results = await _gather(*([append, open_] * 10))
        appended, opened = results[0], results[1]
        assert len({r.id for r in results[0::2]}) == 1  # type: ignore[attr-defined]
        assert len({r.user_message_id for r in results[1::2]}) == 1  # type: ignore[attr-defined]
    assert isinstance(opened, TurnOpened) and opened.status == "opened"
    assert appended is not None
    assert appended.id == opened.user_message_id  # type: ignore[attr-defined]
    assert await _count(store, "SELECT count(*) FROM messages WHERE role = 'user'") == 1
    assert await _count(store, "SELECT count(*) FROM messages WHERE role = 'assistant'") == 1
    # The legacy assistant append also lands on the shell.
    shell = await store.append_message(
        thread_id, user_id, "assistant", [{"type": "text", "text": "x"}], "t1"
    )
    assert shell is not None and shell.id == opened.assistant_message_id
    assert not shell.inserted and shell.outcome == "race_recovered"
    assert await _count(store, "SELECT count(*) FROM token_usage") == 0


@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_racing_opens_never_report_their_own_turn_busy(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    """300 rounds of 10 opens and 10 legacy appends of one turn at once, each on a new
    thread: every open resolves to the same pair of rows, none answers ``busy``.

    On PostgreSQL an open whose snapshot predates the winner's commit passes its checks
    and then collides on the thread's one-streaming-row index; that collision must be
    resolved against the winner's rows, not reported as the thread being busy.
    """
    content = build_user_content("hello t1")
    for round_ in range(300):
        thread_id = await make_thread()

        async def append(thread_id: str = thread_id) -> object:
            return await store.append_message(thread_id, user_id, "user", content, "t1")

        async def open_(thread_id: str = thread_id) -> object:
            return await _open(store, thread_id, user_id, "t1")

        results = await _gather(*([append, open_] * 10))
        opens = [r for r in results[1::2] if isinstance(r, TurnOpened)]
        assert len(opens) == 10
        assert [o.status for o in opens] == ["opened"] * 10, (round_, opens)
        assert len({(o.user_message_id, o.assistant_message_id) for o in opens}) == 1
        assert sum(o.assistant_inserted for o in opens) == 1
        assert len({r.id for r in results[0::2]}) == 1  # type: ignore[attr-defined]
    assert await _count(store, "SELECT count(*) FROM messages WHERE role = 'user'") == 300
    assert await _count(store, "SELECT count(*) FROM messages WHERE role = 'assistant'") == 300


@pytest.mark.anyio
async def test_a_different_turn_racing_for_the_thread_is_reported_busy(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    """Opens of two turns of one thread at once: exactly one turn gets the thread, and
    every open of the other names the winner as the busy turn (never itself)."""
    for _ in range(30):
        thread_id = await make_thread()

        async def open_a(thread_id: str = thread_id) -> object:
            return await _open(store, thread_id, user_id, "a")

        async def open_b(thread_id: str = thread_id) -> object:
            return await _open(store, thread_id, user_id, "b")

        results = [r for r in await _gather(*([open_a, open_b] * 5))
                   if isinstance(r, TurnOpened)]
        winners = {t for t, r in zip("ab" * 5, results, strict=True) if r.status == "opened"}
        assert len(winners) == 1
        (winner,) = winners
        for turn, r in zip("ab" * 5, results, strict=True):
            if turn == winner:
                assert r.status == "opened"
            else:
                assert r.status == "busy" and r.busy_turn_id == winner


@pytest.mark.anyio
async def test_append_without_turn_id_and_on_foreign_thread(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    a = await store.append_message(thread_id, user_id, "user", [{"type": "text", "text": "a"}])
    b = await store.append_message(thread_id, user_id, "user", [{"type": "text", "text": "a"}])
    assert a is not None and b is not None and a.inserted and b.inserted and a.id != b.id
    other = await store.create_user("bob")
    assert await store.append_message(thread_id, other, "user", [], "t9") is None
    with pytest.raises(ValueError):
        await store.append_message(thread_id, user_id, "system", [], "t9")


@pytest.mark.anyio
async def test_finalize_twice_and_concurrently_writes_one_usage_row(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    opened = await _open(store, thread_id, user_id, "t1")
    mid = opened.assistant_message_id
    assert mid is not None
    text = [{"type": "text", "text": "done"}]
    outcomes = await _gather(
        *[lambda: store.finalize_turn(mid, thread_id, user_id, text, "complete", USAGE)] * 10
    )
    assert sorted(outcomes) == ["ok"] + ["row_missing"] * 9  # type: ignore[type-var]
    again = await store.finalize_turn(mid, thread_id, user_id, [], "error", USAGE)
    assert again == "row_missing"
    assert await _count(store, "SELECT count(*) FROM token_usage") == 1
    turn = await store.get_turn(thread_id, "t1")
    assert turn.assistant is not None
    assert turn.assistant.status == "complete" and turn.assistant.content == text
    rows, cursor = await store.list_usage(user_id)
    assert cursor is None and len(rows) == 1
    assert (rows[0].message_id, rows[0].total_tokens, rows[0].cost_micros) == (mid, 8, 42)
    assert rows[0].estimated is False and rows[0].thread_id == thread_id


@pytest.mark.anyio
async def test_finalize_empty_content_stores_status_marker(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    opened = await _open(store, thread_id, user_id, "t1")
    assert opened.assistant_message_id is not None
    empty = [{"type": "text", "text": ""}, {"type": "reasoning", "text": ""}]
    outcome = await store.finalize_turn(
        opened.assistant_message_id, thread_id, user_id, empty, "cancelled", USAGE
    )
    assert outcome == "ok"
    turn = await store.get_turn(thread_id, "t1")
    assert turn.assistant is not None and turn.assistant.status == "cancelled"
    assert turn.assistant.content == [{"type": "status", "text": "(no text response)"}]


@pytest.mark.anyio
async def test_finalize_keeps_tool_call_only_content(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    opened = await _open(store, thread_id, user_id, "t1")
    assert opened.assistant_message_id is not None
    parts = [
        {"type": "tool-call", "toolCallId": "c1", "toolName": "x", "args": {}, "argsText": "{}"}
    ]
    await store.finalize_turn(
        opened.assistant_message_id, thread_id, user_id, parts, "complete", USAGE
    )
    turn = await store.get_turn(thread_id, "t1")
    assert turn.assistant is not None and turn.assistant.content == parts


@pytest.mark.anyio
async def test_finalize_with_bad_status_fails_without_raising(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    opened = await _open(store, thread_id, user_id, "t1")
    assert opened.assistant_message_id is not None
    assert (
        await store.finalize_turn(
            opened.assistant_message_id, thread_id, user_id, [], "weird", USAGE
        )
        == "failed"
    )


@pytest.mark.anyio
async def test_busy_thread_then_free_after_finalize(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    first = await _open(store, thread_id, user_id, "t1")
    busy = await _open(store, thread_id, user_id, "t2")
    assert busy.status == "busy" and busy.busy_turn_id == "t1"
    assert busy.user_message_id is None
    assert await _count(store, "SELECT count(*) FROM messages") == 2
    assert first.assistant_message_id is not None
    await store.finalize_turn(first.assistant_message_id, thread_id, user_id, [], "complete", USAGE)
    assert (await _open(store, thread_id, user_id, "t2")).status == "opened"


@pytest.mark.anyio
async def test_expired_lease_is_interrupted_by_the_next_turn(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    first = await _open(store, thread_id, user_id, "t1", lease_seconds=0.05)
    assert first.assistant_message_id is not None
    assert await store.checkpoint(
        first.assistant_message_id,
        [{"type": "text", "text": "twelve chars"}],
        lease_owner="proc-1",
        lease_seconds=0.05,
    )
    await lease_lapsed(store, first.assistant_message_id)
    second = await _open(store, thread_id, user_id, "t2")
    assert second.status == "opened" and second.assistant_inserted
    old = await store.get_turn(thread_id, "t1")
    assert old.assistant is not None and old.assistant.status == "interrupted"
    assert old.assistant.content == [{"type": "text", "text": "twelve chars"}]
    rows, _ = await store.list_usage(user_id, thread_id=thread_id)
    assert len(rows) == 1 and rows[0].estimated and rows[0].completion_tokens == 3
    assert rows[0].prompt_tokens == 0 and rows[0].message_id == first.assistant_message_id
    # The owner finishing after all (it outlived its lease): the final content wins
    # over the reaper's interrupted, and its usage replaces the estimate, one row still.
    final = [{"type": "text", "text": "twelve chars and the rest"}]
    late = await store.finalize_turn(
        first.assistant_message_id, thread_id, user_id, final, "complete", USAGE
    )
    assert late == "ok"
    old = await store.get_turn(thread_id, "t1")
    assert old.assistant is not None
    assert (old.assistant.status, old.assistant.content) == ("complete", final)
    rows, _ = await store.list_usage(user_id, thread_id=thread_id)
    assert [(r.message_id, r.total_tokens, r.estimated) for r in rows] == [
        (first.assistant_message_id, USAGE.total_tokens, False)
    ]
    # A row that is final for good is not overwritten, and its usage row stays.
    again = await store.finalize_turn(
        first.assistant_message_id, thread_id, user_id, [], "error", USAGE_OTHER
    )
    assert again == "row_missing"
    rows, _ = await store.list_usage(user_id, thread_id=thread_id)
    assert [(r.total_tokens, r.estimated) for r in rows] == [(USAGE.total_tokens, False)]


@pytest.mark.anyio
async def test_recover_expired_turns(store: Store, user_id: int, make_thread: MakeThread) -> None:
    t1, t2 = await make_thread(), await make_thread()
    short = await _open(store, t1, user_id, "a", lease_seconds=0.05)
    live = await _open(store, t2, user_id, "b", lease_seconds=60)
    assert short.assistant_message_id is not None and live.assistant_message_id is not None
    await store.checkpoint(
        short.assistant_message_id,
        [{"type": "reasoning", "text": "abcd"}, {"type": "text", "text": "efghi"}],
        lease_owner="proc-1",
        lease_seconds=0.05,
    )
    await lease_lapsed(store, short.assistant_message_id)
    assert await store.recover_expired_turns() == [short.assistant_message_id]
    assert await store.recover_expired_turns() == []
    rows, _ = await store.list_usage(user_id)
    assert [(r.message_id, r.completion_tokens, r.estimated) for r in rows] == [
        (short.assistant_message_id, 3, True)
    ]
    live_turn = await store.get_turn(t2, "b")
    assert live_turn.assistant is not None and live_turn.assistant.status == "streaming"


@pytest.mark.anyio
async def test_checkpoint_requires_streaming_and_lease_owner(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    opened = await _open(store, thread_id, user_id, "t1")
    mid = opened.assistant_message_id
    assert mid is not None
    part = [{"type": "text", "text": "partial"}]
    assert await store.checkpoint(mid, part, lease_owner="proc-1", lease_seconds=30)
    assert not await store.checkpoint(mid, [], lease_owner="proc-2", lease_seconds=30)
    turn = await store.get_turn(thread_id, "t1")
    assert turn.assistant is not None and turn.assistant.content == part
    await store.finalize_turn(mid, thread_id, user_id, part, "complete", USAGE)
    assert not await store.checkpoint(mid, [], lease_owner="proc-1", lease_seconds=30)


@pytest.mark.anyio
async def test_reclaim_takes_back_a_reaped_row_unless_the_thread_moved_on(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    first = await _open(store, thread_id, user_id, "t1", lease_seconds=0.05)
    mid = first.assistant_message_id
    assert mid is not None
    await lease_lapsed(store, mid)
    assert await store.recover_expired_turns() == [mid]
    assert await _count(store, "SELECT count(*) FROM token_usage") == 1
    part = [{"type": "text", "text": "more than the checkpoint"}]
    # A plain checkpoint does not touch a row that is not ours any more.
    assert not await store.checkpoint(mid, part, lease_owner="proc-1", lease_seconds=30)
    # Its owner takes it back with a reclaim.
    assert await store.checkpoint(mid, part, lease_owner="proc-1", lease_seconds=30,
                                  reclaim=True)
    turn = await store.get_turn(thread_id, "t1")
    assert turn.assistant is not None
    assert (turn.assistant.status, turn.assistant.content) == ("streaming", part)
    # The reaper's estimate went with the reclaim: no usage row until the final one.
    assert await _count(store, "SELECT count(*) FROM token_usage") == 0
    # Another process cannot reclaim a row that streams under ours.
    assert not await store.checkpoint(mid, part, lease_owner="proc-2", lease_seconds=30,
                                      reclaim=True)
    # Reaped again, and a new turn streams on the thread: the reclaim is refused.
    assert await store.checkpoint(mid, part, lease_owner="proc-1", lease_seconds=0.05)
    await lease_lapsed(store, mid)
    second = await _open(store, thread_id, user_id, "t2")
    assert second.assistant_inserted
    assert not await store.checkpoint(mid, part, lease_owner="proc-1", lease_seconds=30,
                                      reclaim=True)
    turn = await store.get_turn(thread_id, "t1")
    assert turn.assistant is not None and turn.assistant.status == "interrupted"
    assert await _count(store, "SELECT count(*) FROM token_usage") == 1
    # A finished row is never reclaimed.
    assert second.assistant_message_id is not None
    await store.finalize_turn(second.assistant_message_id, thread_id, user_id, part,
                              "complete", USAGE)
    assert not await store.checkpoint(second.assistant_message_id, part,
                                      lease_owner="proc-1", lease_seconds=30, reclaim=True)
