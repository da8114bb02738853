"""``Store.finalize_turns``: many turns in one statement (PostgreSQL) or one
transaction (SQLite), with the outcomes and rules of ``finalize_turn``."""

from __future__ import annotations

import anyio
import pytest

from persistence import FinalizeItem, Store, UsageRecord, build_user_content
from persistence.content import NO_TEXT_MARKER
from tests.fixtures_db import MakeThread, RoundTripProxy

USAGE = UsageRecord(prompt_tokens=3, completion_tokens=5, total_tokens=8, cost_micros=42,
                    model_breakdown={"m": {"total_tokens": 8}}, call_details=[{"n": 1}])


async def _streaming(store: Store, owner: int, threads: list[str]) -> list[int]:
    """One streaming assistant row per thread (a thread holds one streaming turn)."""
    ids = []
    for thread_id in threads:
        opened = await store.open_turn(
            thread_id, owner, "t1", build_user_content("hi"), lease_owner="p",
            lease_seconds=60,
        )
        assert opened.assistant_message_id is not None
        ids.append(opened.assistant_message_id)
    return ids


async def _count(store: Store, sql: str) -> int:
    return int(await store._db.fetch_val(sql))


def _text(s: str) -> list[dict[str, object]]:
    return [{"type": "text", "text": s}]


@pytest.mark.anyio
async def test_batch_outcomes_content_and_one_usage_row_each(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    threads = [await make_thread() for _ in range(5)]
    ids = await _streaming(store, user_id, threads)
    # Row 4 is final already: row_missing, its content kept, its usage row written once.
    assert await store.finalize_turn(ids[4], threads[4], user_id, _text("old"), "complete",
                                     USAGE) == "ok"
    items = [
        FinalizeItem(ids[0], threads[0], user_id, _text("zero"), "complete", USAGE),
        FinalizeItem(ids[1], threads[1], user_id, [{"type": "text", "text": ""}],
                     "cancelled", USAGE),
        FinalizeItem(ids[2], threads[2], user_id, _text("two"), "not-a-status", USAGE),
        FinalizeItem(ids[3], threads[3], user_id, _text("three"), "error", USAGE),
        FinalizeItem(ids[4], threads[4], user_id, _text("new"), "cancelled", USAGE),
        FinalizeItem(10**9, threads[0], user_id, _text("ghost"), "complete", USAGE),
    ]
    outcomes = await store.finalize_turns(items)
    assert outcomes == ["ok", "ok", "failed", "ok", "row_missing", "row_missing"]

    rows = {t: (await store.get_turn(t, "t1")).assistant for t in threads}
    assert all(r is not None for r in rows.values())
    got = {t: (r.status, r.content) for t, r in rows.items() if r is not None}
    assert got[threads[0]] == ("complete", _text("zero"))
    assert got[threads[1]] == ("cancelled", NO_TEXT_MARKER)
    assert got[threads[2]][0] == "streaming"  # the bad item touched nothing
    assert got[threads[3]] == ("error", _text("three"))
    assert got[threads[4]] == ("complete", _text("old"))

    usage, _ = await store.list_usage(user_id)
    by_message = {u.message_id: u for u in usage}
    assert len(usage) == len(by_message) == 5  # ids 0, 1, 3, 4 and the ghost; not 2
    assert set(by_message) == {ids[0], ids[1], ids[3], ids[4], 10**9}
    u = by_message[ids[0]]
    assert (u.total_tokens, u.cost_micros, u.estimated) == (8, 42, False)
    assert u.model_breakdown == USAGE.model_breakdown and u.call_details == USAGE.call_details
    assert u.thread_id == threads[0] and u.user_id == user_id
    # A lease is released with the row.
    leased = await _count(store, "SELECT count(*) FROM messages WHERE lease_owner IS NOT NULL")
    assert leased == 1  # only the untouched streaming row


@pytest.mark.anyio
async def test_same_message_twice_in_a_batch_acts_as_in_order(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    (mid,) = await _streaming(store, user_id, [thread_id])
    outcomes = await store.finalize_turns([
        FinalizeItem(mid, thread_id, user_id, _text("first"), "complete", USAGE),
        FinalizeItem(mid, thread_id, user_id, _text("second"), "cancelled", USAGE),
    ])
    assert outcomes == ["ok", "row_missing"]
    turn = await store.get_turn(thread_id, "t1")
    assert turn.assistant is not None
    assert (turn.assistant.status, turn.assistant.content) == ("complete", _text("first"))
    assert await _count(store, "SELECT count(*) FROM token_usage") == 1


@pytest.mark.anyio
async def test_concurrent_batches_over_the_same_messages(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    threads = [await make_thread() for _ in range(20)]
    ids = await _streaming(store, user_id, threads)
    items = [FinalizeItem(m, t, user_id, _text(t), "complete", USAGE)
             for m, t in zip(ids, threads, strict=True)]
    results: list[list[str]] = []

    async def batch(part: list[FinalizeItem]) -> None:
        results.append(await store.finalize_turns(part))

    async with anyio.create_task_group() as tg:  # overlapping halves, four at once
        for part in (items[:12], items[8:], items[4:16], list(reversed(items))):
            tg.start_soon(batch, part)
    flat = [o for r in results for o in r]
    assert "failed" not in flat
    assert flat.count("ok") == 20  # each message finalized by exactly one item
    assert await _count(store, "SELECT count(*) FROM token_usage") == 20
    assert await _count(store, "SELECT count(*) FROM messages WHERE status = 'complete' "
                               "AND role = 'assistant'") == 20


@pytest.mark.anyio
async def test_empty_batch_and_all_invalid(store: Store, user_id: int) -> None:
    assert await store.finalize_turns([]) == []
    bad = FinalizeItem(1, "t", user_id, [], "streaming", USAGE)
    assert await store.finalize_turns([bad, bad]) == ["failed", "failed"]


@pytest.mark.anyio
async def test_batch_is_one_round_trip_on_postgresql(
    counting_store: tuple[Store, RoundTripProxy],
) -> None:
    store, proxy = counting_store
    owner = await store.create_user("alice")
    threads = [(await store.create_thread(owner, None, None))[0].id for _ in range(51)]
    ids = await _streaming(store, owner, threads)
    # Warm up: prepared statement and type introspection are cached per connection.
    assert await store.finalize_turns(
        [FinalizeItem(ids[0], threads[0], owner, [], "complete", USAGE)]
    ) == ["ok"]
    proxy.reset()
    outcomes = await store.finalize_turns([
        FinalizeItem(m, t, owner, _text(t), "cancelled", USAGE)
        for m, t in zip(ids[1:], threads[1:], strict=True)
    ])
    assert outcomes == ["ok"] * 50
    assert proxy.round_trips == 1
    assert await _count(store, "SELECT count(*) FROM token_usage") == 51


@pytest.mark.anyio
async def test_unreachable_database_fails_every_item_without_raising(
    pg_url: str, _pg_session_database: str, round_trip_proxy: RoundTripProxy
) -> None:
    async with Store(round_trip_proxy.url(_pg_session_database), statement_timeout=0.5) as s:
        await round_trip_proxy.close()
        item = FinalizeItem(1, "t", 1, [], "complete", USAGE)
        assert await s.finalize_turns([item, item]) == ["failed", "failed"]


@pytest.mark.anyio
async def test_the_event_map_is_stored_with_the_content(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    """Checkpoint, single and batched final writes keep how the reply was streamed."""
    threads = [await make_thread() for _ in range(3)]
    ids = await _streaming(store, user_id, threads)
    assert await store.checkpoint(ids[0], _text("ab"), lease_owner="p", lease_seconds=60,
                                  event_map=[[1, 1]])
    turn = await store.get_turn(threads[0], "t1")
    assert turn.assistant is not None and turn.assistant.event_map == [[1, 1]]
    assert turn.user is not None and turn.user.event_map is None
    tool_map = [[2], {"args": [1, 2], "ended": True}]
    assert await store.finalize_turn(ids[0], threads[0], user_id, _text("abc"), "complete",
                                     USAGE, event_map=[[2, 1]]) == "ok"
    assert await store.finalize_turns([
        FinalizeItem(ids[1], threads[1], user_id, _text("xyz"), "complete", USAGE, tool_map),
        FinalizeItem(ids[2], threads[2], user_id, _text("q"), "complete", USAGE),
    ]) == ["ok", "ok"]
    maps = [(await store.get_turn(t, "t1")).assistant.event_map for t in threads]  # type: ignore[union-attr]
    assert maps == [[[2, 1]], tool_map, None]
