"""The in-process relay: replay from any id, live follow, bounded memory and retention."""

from __future__ import annotations

import anyio
import pytest

from gateway.streaming.relay import LiveTurn, LocalRelay

pytestmark = pytest.mark.anyio


async def test_follow_replays_after_id_then_follows_live() -> None:
    live = LiveTurn("th", "t1", 1, 10)
    live.publish([b"a", b"b", b"c"])
    got: list[bytes] = []

    async def reader() -> None:
        async for data in live.follow(after=0):
            got.append(data)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await anyio.sleep(0.01)
        live.publish([b"d"])
        await anyio.sleep(0.01)
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
        await anyio.sleep(1)
    assert scope.cancelled_caught and live.cancel_reason == "cancelled"
    live.finish("cancelled")
    assert live.cancel("cancelled") is False


def test_memory_per_turn_is_bounded() -> None:
    live = LiveTurn("th", "t1", 1, 10, max_bytes=100)
    live.publish([b"x" * 60])
    assert not live.overflowed
    live.publish([b"x" * 60])
    assert live.overflowed  # late readers are refused instead of the process growing


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
    await anyio.sleep(0.06)
    assert relay.sweep() == 3
    assert len(relay) == 0


async def test_wait_for_a_racing_registration() -> None:
    relay = LocalRelay()
    live = LiveTurn("th", "t1", 1, 10)

    async def register() -> None:
        await anyio.sleep(0.02)
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
