"""open_turn(with_history=True), renew_leases, checkpoint_many, pool_size, the pool wait."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import anyio
import pytest

from persistence import MessageRow, Store, TurnOpened, UsageRecord, build_user_content
from tests.fixtures_db import MakeThread
from tests.waiting import lease_lapsed

USAGE = UsageRecord(prompt_tokens=3, completion_tokens=5, total_tokens=8)
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


async def _open(
    store: Store,
    thread_id: str,
    owner: int,
    turn: str,
    *,
    lease_owner: str = "proc-1",
    lease_seconds: float = 60.0,
    **kw: object,
) -> TurnOpened:
    return await store.open_turn(
        thread_id,
        owner,
        turn,
        build_user_content(f"hello {turn}"),
        lease_owner=lease_owner,
        lease_seconds=lease_seconds,
        **kw,  # type: ignore[arg-type]
    )


async def _finished_turn(store: Store, thread_id: str, owner: int, turn: str) -> None:
    opened = await _open(store, thread_id, owner, turn)
    assert opened.assistant_message_id is not None
    reply = [{"type": "text", "text": f"reply to {turn} with 100% literal percent"}]
    outcome = await store.finalize_turn(
        opened.assistant_message_id, thread_id, owner, reply, "complete", USAGE
    )
    assert outcome == "ok"


@pytest.mark.anyio
async def test_open_with_history_returns_the_earlier_messages(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    other = await make_thread()
    await store.append_message(thread_id, user_id, "user", build_user_content("legacy"))
    await _finished_turn(store, thread_id, user_id, "t1")
    await _finished_turn(store, thread_id, user_id, "t2")
    await _finished_turn(store, other, user_id, "t1")  # another thread: never in history
    # A legacy client already stored this turn's user row: it is not history either.
    await store.append_message(thread_id, user_id, "user", build_user_content("now"), "t3")

    opened = await _open(store, thread_id, user_id, "t3", with_history=True)
    assert opened.status == "opened" and opened.assistant_inserted and not opened.user_inserted
    everything = await store.list_messages(thread_id, user_id)
    assert everything is not None
    expected = [m for m in everything if m.turn_id != "t3"]
    assert len(expected) == 5
    # Same rows, same fields, same timestamp format as the history API reads them.
    assert opened.history == expected
    assert all(isinstance(m, MessageRow) and ISO.match(m.created_at) for m in opened.history)
    assert [(m.role, m.turn_id, m.status) for m in opened.history] == [
        ("user", None, "complete"),
        ("user", "t1", "complete"),
        ("assistant", "t1", "complete"),
        ("user", "t2", "complete"),
        ("assistant", "t2", "complete"),
    ]
    assert opened.history[2].content == [
        {"type": "text", "text": "reply to t1 with 100% literal percent"}
    ]

    # Repeating the open inserts nothing: no history (the generation is not ours).
    again = await _open(store, thread_id, user_id, "t3", with_history=True)
    assert again.status == "opened" and not again.assistant_inserted and again.history is None
    # Without the flag there is never a history.
    assert opened.assistant_message_id is not None
    await store.finalize_turn(
        opened.assistant_message_id, thread_id, user_id, [], "complete", USAGE
    )
    plain = await _open(store, thread_id, user_id, "t4")
    assert plain.assistant_inserted and plain.history is None
    assert plain.assistant_message_id is not None
    await store.finalize_turn(plain.assistant_message_id, thread_id, user_id, [], "complete", USAGE)

    # The limit keeps the most recent rows, still oldest first.
    limited = await _open(store, thread_id, user_id, "t5", with_history=True, history_limit=3)
    everything = await store.list_messages(thread_id, user_id)
    assert everything is not None
    assert limited.history == [m for m in everything if m.turn_id != "t5"][-3:]
    assert [m.turn_id for m in limited.history] == ["t3", "t4", "t4"]


@pytest.mark.anyio
async def test_open_with_history_on_a_new_thread_and_with_limit_zero(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    first = await _open(store, thread_id, user_id, "t1", with_history=True)
    assert first.history == []
    assert first.assistant_message_id is not None
    await store.finalize_turn(first.assistant_message_id, thread_id, user_id, [], "complete", USAGE)
    second = await _open(store, thread_id, user_id, "t2", with_history=True, history_limit=0)
    assert second.assistant_inserted and second.history == []
    with pytest.raises(ValueError):
        await _open(store, thread_id, user_id, "t3", with_history=True, history_limit=-1)
    # Busy and foreign threads: no history, nothing written.
    busy = await _open(store, thread_id, user_id, "t3", with_history=True)
    assert busy.status == "busy" and busy.history is None
    foreign = await _open(store, thread_id, user_id + 1, "t9", with_history=True)
    assert foreign.status == "thread_not_found" and foreign.history is None


@pytest.mark.anyio
async def test_history_shows_an_expired_holder_as_interrupted(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    thread_id = await make_thread()
    held = await _open(store, thread_id, user_id, "t1", lease_seconds=0.05)
    assert held.assistant_message_id is not None
    await lease_lapsed(store, held.assistant_message_id)
    opened = await _open(store, thread_id, user_id, "t2", with_history=True)
    assert opened.assistant_inserted and opened.history is not None
    assert [(m.turn_id, m.role, m.status) for m in opened.history] == [
        ("t1", "user", "complete"),
        ("t1", "assistant", "interrupted"),
    ]
    everything = await store.list_messages(thread_id, user_id)
    assert everything is not None
    assert opened.history == everything[:2]


def _operations(store: Store) -> list[tuple[str, str]]:
    """The store's operations from now on, as ``(name, outcome)``."""
    seen: list[tuple[str, str]] = []
    store.on_operation = lambda op, outcome, _s: seen.append((op, outcome))
    return seen


async def _four_streaming(
    store: Store, user_id: int, make_thread: MakeThread
) -> list[tuple[str, TurnOpened]]:
    """Four turns opened with 0.4 s leases, "a", "b" and "d" by proc-1, "c" by proc-2."""
    out = []
    for turn, owner in (("a", "proc-1"), ("b", "proc-1"), ("c", "proc-2"), ("d", "proc-1")):
        thread = await make_thread()
        out.append((thread, await _open(store, thread, user_id, turn, lease_owner=owner,
                                        lease_seconds=0.4)))
    return out


@pytest.mark.anyio
async def test_renew_leases_extends_only_this_owners_streaming_rows(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    seen = _operations(store)
    (t1, a), (t2, b), (t3, c), (t4, d) = await _four_streaming(store, user_id, make_thread)
    assert d.assistant_message_id is not None
    await store.finalize_turn(d.assistant_message_id, t4, user_id, [], "complete", USAGE)
    before = await store.get_turn(t1, "a")

    ids = [x.assistant_message_id for x in (a, b, c, d)]
    assert all(i is not None for i in ids)
    # Only the rows named, and of those only this owner's streaming ones: c is another
    # process's, d is finished.
    renewed = await store.renew_leases("proc-1", 60, ids)  # type: ignore[arg-type]
    assert renewed == {a.assistant_message_id, b.assistant_message_id}
    assert await store.renew_leases("nobody", 60, ids) == set()  # type: ignore[arg-type]
    assert await store.renew_leases("proc-1", 60, []) == set()  # no statement at all
    assert ("renew_leases", "row_missing") in seen
    assert await store.renew_leases(
        "proc-1", 60, [a.assistant_message_id]  # type: ignore[list-item]
    ) == {a.assistant_message_id}
    assert ("renew_leases", "ok") in seen

    assert c.assistant_message_id is not None
    await lease_lapsed(store, c.assistant_message_id)  # a and b were renewed for 60 s
    assert await store.recover_expired_turns() == [c.assistant_message_id]
    for thread_id, turn in ((t1, "a"), (t2, "b")):
        row = (await store.get_turn(thread_id, turn)).assistant
        assert row is not None and row.status == "streaming"
    after = await store.get_turn(t1, "a")
    # Only the lease moves: content and updated_at are the checkpoint's business.
    assert after.assistant == before.assistant
    assert a.assistant_message_id is not None and b.assistant_message_id is not None
    with pytest.raises(ValueError):
        await store.renew_leases("proc-1", 0, [1])


@pytest.mark.anyio
async def test_checkpoint_many_writes_only_this_owners_streaming_rows_in_one_statement(
    store: Store, user_id: int, make_thread: MakeThread
) -> None:
    seen = _operations(store)
    (t1, a), (t2, b), (t3, c), (t4, d) = await _four_streaming(store, user_id, make_thread)
    ids = [x.assistant_message_id for x in (a, b, c, d)]
    assert all(isinstance(i, int) for i in ids)
    ia, ib, ic, id_ = (int(i) for i in ids)  # type: ignore[arg-type]
    await store.finalize_turn(id_, t4, user_id, [], "complete", USAGE)
    d_before = await store.get_turn(t4, "d")
    c_before = await store.get_turn(t3, "c")

    def text(t: str) -> list[dict[str, object]]:
        return [{"type": "text", "text": t}]

    seen.clear()
    written = await store.checkpoint_many(
        [(ia, text("A é \"q\""), [[0, 1]]), (ib, text("B"), None), (ic, text("C"), [[9, 9]]),
         (id_, text("D"), None)],
        lease_owner="proc-1", lease_seconds=60,
    )
    # Only this owner's streaming rows: c is another process's, d is finished.
    assert written == {ia, ib}
    assert seen == [("checkpoint", "row_missing")]  # one statement for the four
    ta, tb = await store.get_turn(t1, "a"), await store.get_turn(t2, "b")
    assert ta.assistant is not None and tb.assistant is not None
    assert ta.assistant.content == text("A é \"q\"") and ta.assistant.event_map == [[0, 1]]
    assert tb.assistant.content == text("B") and tb.assistant.event_map is None
    assert ta.assistant.status == tb.assistant.status == "streaming"
    assert await store.get_turn(t3, "c") == c_before
    assert await store.get_turn(t4, "d") == d_before
    # Their leases were extended (60 s), the other owner's was not (0.4 s).
    await lease_lapsed(store, ic)
    assert await store.recover_expired_turns() == [ic]
    assert await store.checkpoint_many([], lease_owner="proc-1", lease_seconds=60) == set()
    assert seen == [("checkpoint", "row_missing"), ("recover_expired_turns", "ok")]
    with pytest.raises(ValueError):
        await store.checkpoint_many([(ia, [], None)], lease_owner="proc-1", lease_seconds=0)


@pytest.mark.anyio
async def test_pool_size_sets_the_asyncpg_pool(pg_url: str) -> None:
    async with Store(pg_url, pool_size=3) as store:
        pool = store._db._backend._pool  # type: ignore[attr-defined]
        assert (pool.get_min_size(), pool.get_max_size()) == (3, 3)
        assert await store.ping()
    async with Store(pg_url) as store:
        pool = store._db._backend._pool  # type: ignore[attr-defined]
        assert (pool.get_min_size(), pool.get_max_size()) == (10, 10)
    with pytest.raises(ValueError):
        Store(pg_url, pool_size=0)


@pytest.mark.anyio
@pytest.mark.parametrize("acquire_timeout", [None, 0.3])
async def test_an_exhausted_pool_answers_unavailable_promptly(
    pg_url: str, acquire_timeout: float | None
) -> None:
    # statement_timeout 1 s: the statement deadline is 3 s; the wait for a
    # connection is bounded on its own (acquire_timeout, default statement_timeout).
    async with Store(
        pg_url, statement_timeout=1.0, pool_size=1, acquire_timeout=acquire_timeout
    ) as store:
        seen: list[tuple[str, str]] = []
        store.on_operation = lambda op, outcome, _s: seen.append((op, outcome))
        owner = await store.create_user("alice")
        thread_id = (await store.create_thread(owner, None, None))[0].id
        bound = 1.0 if acquire_timeout is None else acquire_timeout
        held = anyio.Event()
        release = anyio.Event()

        async def hold() -> None:
            async with store._db.connection():  # the pool's only connection
                held.set()
                await release.wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await held.wait()
            started = time.perf_counter()
            opened = await _open(store, thread_id, owner, "t1")
            waited = time.perf_counter() - started
            release.set()
        assert opened.status == "unavailable"
        assert bound - 0.05 <= waited < bound + 0.5, waited
        assert seen[-1] == ("open_turn", "failed")
        # The pool is whole afterwards.
        again = await _open(store, thread_id, owner, "t1")
        assert again.status == "opened" and again.assistant_inserted


@pytest.mark.anyio
async def test_a_renewal_that_waited_behind_a_lock_still_renews(
    pg_url: str, user_id_pg: tuple[Store, int]
) -> None:
    """Leases run from the statement's clock, not from when it was sent (PostgreSQL)."""
    import asyncpg

    store, owner = user_id_pg
    thread, _ = await store.create_thread(owner, None, None)
    opened = await _open(store, thread.id, owner, "a", lease_seconds=60)
    assert opened.assistant_message_id is not None
    # Prepared once on the store's one connection, as in a running gateway: the queued
    # execution's transaction then starts when it is sent, not when the lock goes.
    await store.renew_leases("proc-1", 60, [opened.assistant_message_id])
    locker = await asyncpg.connect(pg_url, timeout=10)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        async with anyio.create_task_group() as tg:
            box: dict[str, set[int]] = {}

            async def renew() -> None:
                box["renewed"] = await store.renew_leases(
                    "proc-1", 1.0, [opened.assistant_message_id]  # type: ignore[list-item]
                )

            tg.start_soon(renew)
            # The renewal is queued behind the lock for longer than the lease it asks for.
            with anyio.fail_after(5):
                while not await locker.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND position('UPDATE messages SET lease_expires_at' in query) > 0"
                ):
                    await anyio.sleep(0.02)
            await anyio.sleep(1.5)  # the stall itself, longer than the 1 s lease
            await tx.rollback()
        assert box["renewed"] == {opened.assistant_message_id}
        left = await locker.fetchval(
            "SELECT extract(epoch FROM lease_expires_at - clock_timestamp()) FROM messages "
            "WHERE id = $1", opened.assistant_message_id)
        assert left > 0.5, "the renewal committed a lease that had already run out"
    finally:
        await locker.close()


@pytest.fixture
async def user_id_pg(pg_url: str) -> AsyncIterator[tuple[Store, int]]:
    async with Store(pg_url, pool_size=1) as s:
        yield s, await s.create_user("alice")
