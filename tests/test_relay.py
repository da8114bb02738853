"""The in-process relay: replay from any id, live follow, bounded memory and retention."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing

import anyio
import anyio.lowlevel
import pytest

from gateway.streaming.relay import LiveTurn, LocalRelay

pytestmark = pytest.mark.anyio


async def test_follow_replays_after_id_then_follows_live() -> None:
    live = LiveTurn("th", "t1", 1, 10)
    live.publish([b"a", b"b", b"c"])
    got: list[bytes] = []

    async def reader() -> None:
        async for _, chunks in live.batches(after=0):
            got.append(b"".join(chunks))

    async def until(n: int) -> None:
        with anyio.fail_after(5):
            while len(got) < n:
                await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await until(1)  # it took what was there, and waits for more
        live.publish([b"d"])
        await until(2)
        live.publish([b"e", b"f"])
        live.finish("complete")
    assert b"".join(got) == b"bcdef"
    assert got[0] == b"bc"  # what was there already goes out in one write


async def test_cancel_only_while_running() -> None:
    live = LiveTurn("th", "t1", 1, 10)
    assert live.cancel("cancelled") is False  # no generation scope yet
    with anyio.CancelScope() as scope:
        live.cancel_scope = scope
        assert live.cancel("cancelled") is True
        await anyio.sleep(1)  # the cancel must interrupt this at once
    assert scope.cancelled_caught and live.cancel_reason == "cancelled"
    live.finish("cancelled")
    assert live.cancel("cancelled") is False


def test_memory_per_turn_is_bounded() -> None:
    """Publishing far past ``max_bytes`` keeps at most ``max_bytes`` of chunks: the
    newest, with their SSE ids."""
    live = LiveTurn("th", "t1", 1, 10, max_bytes=1000)
    chunks = [b"%05d" % i + b"x" * 95 for i in range(10_000)]  # 1 MB in all
    for chunk in chunks:
        live.publish([chunk])
        assert sum(len(c) for c in live.events) == live.size <= 1000
    assert live.overflowed  # late readers are refused
    assert live.next_id == 10_000
    assert live.events == chunks[live.first_id :]  # the newest ones, where their ids say
    assert live.since(9_998) == chunks[9_998:]
    assert live.complete_upto(5) is None  # the oldest are gone


def test_a_chunk_larger_than_the_bound_is_kept_alone() -> None:
    live = LiveTurn("th", "t1", 1, 10, max_bytes=100)
    live.publish([b"a" * 10, b"b" * 500])
    assert live.events == [b"b" * 500] and live.first_id == 1


async def test_a_follower_that_keeps_up_gets_everything_past_the_bound() -> None:
    live = LiveTurn("th", "t1", 1, 10, max_bytes=1000)
    chunks = [b"%05d" % i + b"x" * 95 for i in range(2_000)]
    got: list[bytes] = []
    received = 0

    async def reader() -> None:
        nonlocal received
        async for _, batch in live.batches():
            got.extend(batch)
            received += len(batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        for i, chunk in enumerate(chunks):
            live.publish([chunk])
            while received <= i:  # the reader has taken it before the next one comes
                await anyio.lowlevel.checkpoint()
        live.finish("complete")
    assert got == chunks
    assert live.size <= 1000


async def test_a_follower_behind_the_bound_is_ended() -> None:
    live = LiveTurn("th", "t1", 1, 10, max_bytes=1000)
    live.publish([b"x" * 100] * 5)
    got: list[int] = []
    with anyio.fail_after(5):
        async with aclosing(live.batches()) as batches:
            async for first, _ in batches:
                got.append(first)
                # While this reader holds chunk 4, far more than the bound is published.
                live.publish([b"y" * 100] * 50)
        # It ended (no finish: the turn still runs) rather than skip what was dropped.
        assert got == [0] and not live.done and live.first_id > 5
        late = [b async for b in live.batches(-1)]
        assert late == []


async def test_finished_turns_are_retained_then_dropped() -> None:
    relay = LocalRelay(retention_seconds=0.05, max_finished=3)
    turns = [LiveTurn(f"th{i}", "t", 1, i) for i in range(5)]
    for live in turns:
        relay.add(live)
    assert relay.running_on_thread("th0") is turns[0]
    for live in turns:
        live.finish("complete")
        relay.ended(live)
    assert relay.running() == []
    assert relay.sweep() == 2  # over max_finished: the oldest go first
    assert len(relay) == 3
    await anyio.sleep(0.06)  # the retention time itself (0.05 s) runs out
    assert relay.sweep() == 3
    assert len(relay) == 0


async def test_wait_for_a_racing_registration() -> None:
    relay = LocalRelay()
    live = LiveTurn("th", "t1", 1, 10)

    async def register() -> None:
        await anyio.sleep(0.02)  # registers after wait_for started: the race under test
        relay.add(live)

    async with anyio.create_task_group() as tg:
        tg.start_soon(register)
        assert await relay.wait_for("th", "t1", within=1) is live
    assert await relay.wait_for("th", "other", within=0.05) is None


def test_running_count_per_owner_follows_add_and_end() -> None:
    relay = LocalRelay()
    a1, a2, b1 = LiveTurn("th1", "t", 1, 1), LiveTurn("th2", "t", 1, 2), LiveTurn("th3", "t", 2, 3)
    for live in (a1, a2, b1):
        relay.add(live)
    relay.add(a1)  # registering the same turn again does not count it twice
    assert (relay.running_for_owner(1), relay.running_for_owner(2)) == (2, 1)
    relay.ended(a1)
    relay.ended(a1)
    assert relay.running_for_owner(1) == 1
    relay.ended(a2)
    relay.ended(b1)
    assert (relay.running_for_owner(1), relay.running_for_owner(2)) == (0, 0)
    assert relay.running() == []


async def test_wait_for_a_reply_skips_the_one_it_replaces() -> None:
    """A regenerate racing its twin: the relay still keeps the turn's old reply, and the
    wait must return the new one once it starts, not the old one at once."""
    relay = LocalRelay()
    old = LiveTurn("th", "t1", 1, 10)
    relay.add(old)
    old.finish("complete")
    relay.ended(old)
    new = LiveTurn("th", "t1", 1, 11)
    got: dict[str, LiveTurn | None] = {}

    async def wait() -> None:
        got["live"] = await relay.wait_for("th", "t1", within=5.0, message_id=11)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        assert "live" not in got  # the old reply (id 10) is not the one waited for
        relay.add(new)
    assert got["live"] is new
    assert await relay.wait_for("th", "t1", within=0.0, message_id=10) is None



async def test_a_burst_wakes_every_reader_and_a_cancelled_wait_is_uncounted() -> None:
    """Chunks published in one go (an upstream read's events) reach every reader
    waiting then, in one batch each, and only the first of them wakes anyone; a waiter
    cancelled before a wake, or at the same time as one, leaves the list of waiters
    true (the list decides whether a publish wakes anyone: one missing loses a wake)."""
    live = LiveTurn("th", "t1", 1, 10)
    got: dict[str, list[list[bytes]]] = {"a": [], "b": []}

    def waiting() -> int:
        return sum(not w.done() for w in live._waiters or ())

    def listed_right() -> bool:  # a woken or cancelled waiter is no longer listed
        return len(live._waiters or ()) == waiting()

    async def reader(name: str) -> None:
        async for _, chunks in live.batches():
            got[name].append(list(chunks))

    async def until(cond: Callable[[], bool]) -> None:
        with anyio.fail_after(5):
            while not cond():
                await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader, "a")
        tg.start_soon(reader, "b")
        early = anyio.CancelScope()
        at_wake = anyio.CancelScope()

        async def waiter(scope: anyio.CancelScope) -> None:
            with scope:
                await live.wait_done()

        tg.start_soon(waiter, early)
        tg.start_soon(waiter, at_wake)
        await until(lambda: waiting() == 4)
        early.cancel()
        await until(lambda: waiting() == 3 and listed_right())
        burst = [b"%d" % i for i in range(50)]
        live.publish(burst[:1])
        assert live._waiters is None  # all three woken
        for chunk in burst[1:]:
            live.publish([chunk])
        assert live._waiters is None  # the rest of the burst woke nobody again
        at_wake.cancel()  # woken and cancelled before it runs again
        await until(lambda: len(got["a"]) == 1 and len(got["b"]) == 1 and waiting() == 2)
        for _ in range(5):  # let the cancelled one finish too
            await anyio.lowlevel.checkpoint()
        assert waiting() == 2 and listed_right()
        assert got["a"] == got["b"] == [burst]  # one batch each, nothing lost
        live.publish([b"late"])
        await until(lambda: len(got["a"]) == 2 and len(got["b"]) == 2)
        live.finish("complete")
    assert got["a"] == got["b"] == [burst, [b"late"]]
    assert live._waiters is None


@pytest.mark.anyio
async def test_a_turn_keeps_no_join_event_or_lock_it_is_not_using() -> None:
    live = LiveTurn("th", "t1", 1, 1)
    assert live._joined is None and live._db_lock is None
    live.reader_joined()  # nobody waits: nothing to make or wake
    assert live._joined is None

    result: list[bool] = []

    async def waiter() -> None:
        result.append(await live.wait_for_reader(10))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        while live._joined is None:  # the waiter made the event it waits on
            await anyio.lowlevel.checkpoint()
        live.reader_joined()
    assert result == [True] and live._joined is None
    assert not await live.wait_for_reader(0.01)  # no reader joined: times out

    lock = live.db_lock
    assert live.db_lock is lock  # one lock while it exists
    async with lock:
        live.drop_idle_lock()  # held: kept
        assert live._db_lock is lock
    live.drop_idle_lock()
    assert live._db_lock is None
    assert live.db_lock is not lock  # the next use makes another
