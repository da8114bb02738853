"""Checkpoints write only what changed: an idle turn costs its lease renewal, nothing
more; a turn with new content is on disk within the checkpoint interval; many
changed turns go to the database in one statement per ``CHECKPOINT_BATCH``."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import httpx
import pytest

from gateway.turn.upkeep import CHECKPOINT_BATCH, checkpoint_running
from tests.fixtures_server import GatewayServer, run_gateway

pytestmark = pytest.mark.anyio

CHECKPOINT = 0.2
# A reader that leaves cancels its turn: the test's end does not wait out a grace period.
FAST = {"TURNGATE_CHECKPOINT_SECONDS": str(CHECKPOINT), "TURNGATE_LEASE_SECONDS": "3",
        "TURNGATE_ON_DISCONNECT": "cancel"}


class Ops:
    """The store's operations as the gateway runs them (its ``on_operation`` observer)."""

    def __init__(self, gw: GatewayServer) -> None:
        self.seen: list[str] = []
        self._waiters: list[tuple[Callable[[], bool], anyio.Event]] = []
        previous = gw.ctx.store.on_operation

        def observe(name: str, outcome: str, seconds: float) -> None:
            if previous is not None:
                previous(name, outcome, seconds)
            self.seen.append(name)
            for cond, event in self._waiters:
                if cond():
                    event.set()

        gw.ctx.store.on_operation = observe

    def count(self, name: str) -> int:
        return self.seen.count(name)

    async def until(self, cond: Callable[[], bool], timeout: float = 10) -> None:
        event = anyio.Event()
        self._waiters.append((cond, event))
        if not cond():
            with anyio.fail_after(timeout):
                await event.wait()


async def _read(client: httpx.AsyncClient, thread: str, turn: str, model: str,
                deltas: list[float]) -> None:
    body = {"turn_id": turn, "text": "x", "model": model}
    async with client.stream("POST", f"/v1/threads/{thread}/turns", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith('data: {"type":"text-delta"'):
                deltas.append(time.monotonic())


async def _live(gw: GatewayServer, thread: str, turn: str) -> int:
    with anyio.fail_after(10):
        while (live := gw.ctx.relay.get(thread, turn)) is None:
            await anyio.sleep(0.01)
    return live.message_id


async def test_an_idle_turn_is_never_written_and_new_content_is_within_the_interval(
    database_url: str,
) -> None:
    async with run_gateway(database_url, **FAST) as gw, gw.client() as client, \
            anyio.create_task_group() as tg:
        ops = Ops(gw)
        idle_thread = await gw.new_thread(client)
        # Its one token comes after a minute: until then it has produced nothing.
        tg.start_soon(_read, client, idle_thread, "idle", "scripted:tokens=1,delay_ms=60000",
                      [])
        await _live(gw, idle_thread, "idle")
        shell = (await gw.store.get_turn(idle_thread, "idle")).assistant
        assert shell is not None
        renewals = ops.count("renew_leases")
        await ops.until(lambda: ops.count("renew_leases") >= renewals + 5)
        # Five passes renewed its lease; not one wrote a checkpoint.
        assert ops.count("checkpoint") == 0, ops.seen
        row = (await gw.store.get_turn(idle_thread, "idle")).assistant
        assert row is not None and row.status == "streaming"
        assert (row.content, row.updated_at) == (shell.content, shell.updated_at)

        # A turn streaming beside it: its content is on disk within the interval (and
        # one statement's time) of each token, while the idle row is still untouched.
        busy_thread = await gw.new_thread(client)
        deltas: list[float] = []
        tg.start_soon(_read, client, busy_thread, "busy",
                      "scripted:tokens=400,delay_ms=20", deltas)
        lags: list[float] = []
        with anyio.fail_after(20):
            while len(lags) < 5:
                await anyio.sleep(0.005)
                if not deltas:
                    continue
                first_unsaved = deltas[-1]
                n = len(deltas)
                while True:
                    busy = (await gw.store.get_turn(busy_thread, "busy")).assistant
                    assert busy is not None
                    saved = busy.content[0]["text"].count(" ") if busy.content else 0
                    if saved >= n:
                        break
                    await anyio.sleep(0.005)
                lags.append(time.monotonic() - first_unsaved)
        assert max(lags) <= CHECKPOINT + 0.5, lags
        row = (await gw.store.get_turn(idle_thread, "idle")).assistant
        assert row is not None
        assert (row.content, row.updated_at) == (shell.content, shell.updated_at)
        tg.cancel_scope.cancel()


async def test_changed_turns_share_a_checkpoint_statement(database_url: str) -> None:
    busy_n, idle_n = CHECKPOINT_BATCH + 5, 3
    # Passes by hand: the maintenance loop's own would come after an hour.
    async with run_gateway(database_url, TURNGATE_CHECKPOINT_SECONDS="3600",
                           TURNGATE_LEASE_SECONDS="7200",
                           TURNGATE_MAX_STREAMS_PER_USER="1000",
                           TURNGATE_ON_DISCONNECT="cancel") as gw, \
            gw.client(limits=httpx.Limits(max_connections=None)) as client, \
            anyio.create_task_group() as tg:
        ops = Ops(gw)
        busy = [await gw.new_thread(client) for _ in range(busy_n)]
        idle = [await gw.new_thread(client) for _ in range(idle_n)]
        for thread in busy:
            tg.start_soon(_read, client, thread, "t", "scripted:tokens=2000,delay_ms=200", [])
        for thread in idle:
            tg.start_soon(_read, client, thread, "t", "scripted:tokens=1,delay_ms=60000", [])
        for thread in busy + idle:
            await _live(gw, thread, "t")
        lives = {t: gw.ctx.relay.get(t, "t") for t in busy + idle}
        with anyio.fail_after(20):
            while not all(lives[t].content is not None  # type: ignore[union-attr]
                          and lives[t].content.version > 0 for t in busy):  # type: ignore[union-attr]
                await anyio.sleep(0.01)

        ops.seen.clear()
        await checkpoint_running(gw.ctx.runner)
        # Every busy turn changed: two statements write them all; the idle ones have
        # their leases renewed in one more.
        assert sorted(ops.seen) == ["checkpoint", "checkpoint", "renew_leases"], ops.seen
        for t in busy:
            assert lives[t].checkpointed_version > 0  # type: ignore[union-attr]
        for t in idle:
            assert lives[t].checkpointed_version == 0  # type: ignore[union-attr]
        # Their locks were released and dropped: a turn between checkpoints keeps none.
        assert all(live._db_lock is None for live in lives.values())  # type: ignore[union-attr]
        rows = [(await gw.store.get_turn(t, "t")).assistant for t in busy]
        assert all(r is not None and r.status == "streaming" and r.content for r in rows)
        tg.cancel_scope.cancel()
