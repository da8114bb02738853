"""A faltering database loses no reply.

The faults are the test's own: a cuttable TCP proxy between the gateway and
PostgreSQL (``RoundTripProxy``), or an exclusive lock on the SQLite file held
by a connection of the test. Neither touches the shared server's other
databases.

- a final write that fails is retried until it lands; the stream's ``finish``
  and ``[DONE]`` go out only after the row is written (``: ping`` meanwhile),
  and the metrics count the turn only then;
- a failed final write does not hold its thread once the database is back;
- an owner whose row a reaper marked ``interrupted`` takes it back and
  finishes it, or, if the thread moved on, stops and says so.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from gateway.turn.lifecycle import LEASE_LOST_ERROR
from tests.fixtures_db import RoundTripProxy
from tests.fixtures_server import GatewayServer, run_gateway
from tests.sse_client import Stream, parse_sse, validate_ui_stream

pytestmark = pytest.mark.anyio

CHECKPOINT = 0.5
LEASE = 3.0


def _full(n: int) -> str:
    return "".join(f"w{i} " for i in range(1, n + 1))


class Watched:
    """A turn's stream read as it arrives: events, when ``finish`` came, progress."""

    def __init__(self) -> None:
        self.stream = Stream(0, {})
        self.finish_at: float | None = None
        self.deltas = 0
        self._waiters: list[tuple[Callable[[], bool], anyio.Event]] = []

    def when(self, cond: Callable[[], bool]) -> anyio.Event:
        event = anyio.Event()
        self._waiters.append((cond, event))
        return event

    def _check(self) -> None:
        for cond, event in self._waiters:
            if not event.is_set() and cond():
                event.set()

    async def read(self, client: httpx.AsyncClient, method: str, url: str,
                   **kwargs: Any) -> None:
        async with client.stream(method, url, **kwargs) as response:
            self.stream.status = response.status_code
            self.stream.headers = dict(response.headers)
            assert response.status_code == 200, (await response.aread()).decode()

            async def lines() -> AsyncIterator[str]:
                async for line in response.aiter_lines():
                    if line.startswith("data: {\"type\":\"text-delta\""):
                        self.deltas += 1
                    elif line.startswith("data: {\"type\":\"finish\""):
                        self.finish_at = time.monotonic()
                    yield line
                    self._check()

            await parse_sse(lines(), self.stream)
        self._check()


async def _until(cond: Callable[[], bool], timeout: float) -> None:
    """Wait for a condition of the app's state (polled: it has no event to wait on)."""
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.02)


class Outage:
    """The database unavailable to the gateway, then back: ``begin()`` / ``end()``."""

    def __init__(self, database_url: str, pg_database: str | None) -> None:
        self.kind = "postgresql" if pg_database is not None else "sqlite"
        self.direct_url = database_url
        self.proxy: RoundTripProxy | None = None
        self._pg_database = pg_database
        self._lock: sqlite3.Connection | None = None

    @property
    def gateway_url(self) -> str:
        if self.proxy is not None and self._pg_database is not None:
            return self.proxy.url(self._pg_database)
        return self.direct_url

    async def start(self) -> None:
        if self.kind == "postgresql":
            self.proxy = RoundTripProxy()
            await self.proxy.start()

    async def begin(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()  # refuses new connections, cuts the open ones
            return
        path = self.direct_url.removeprefix("sqlite:///")

        def lock() -> sqlite3.Connection:
            conn = sqlite3.connect(path, timeout=10, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("BEGIN EXCLUSIVE")  # every writer of the gateway now times out
            return conn

        self._lock = await anyio.to_thread.run_sync(lock)

    async def end(self) -> None:
        if self.proxy is not None:
            await self.proxy.start()  # the same port again
            return
        assert self._lock is not None
        lock, self._lock = self._lock, None
        await anyio.to_thread.run_sync(lambda: (lock.execute("ROLLBACK"), lock.close()))

    async def close(self) -> None:
        if self._lock is not None:
            await self.end()
        if self.proxy is not None:
            await self.proxy.close()

    async def fetch(self, sql: str) -> list[Any]:
        """Rows read directly (not through the gateway or the proxy)."""
        if self.kind == "sqlite":
            path = self.direct_url.removeprefix("sqlite:///")

            def read() -> list[Any]:
                with sqlite3.connect(path) as conn:
                    return conn.execute(sql).fetchall()

            return await anyio.to_thread.run_sync(read)
        conn = await asyncpg.connect(self.direct_url, timeout=10)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()


@pytest.fixture
async def outage(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Outage]:
    pg_database = None
    if database_url.startswith("postgresql"):
        pg_database = request.getfixturevalue("_pg_session_database")
    o = Outage(database_url, pg_database)
    await o.start()
    try:
        yield o
    finally:
        await o.close()


def _env(**extra: str) -> dict[str, str]:
    return {
        "TURNGATE_CHECKPOINT_SECONDS": str(CHECKPOINT),
        "TURNGATE_LEASE_SECONDS": str(LEASE),
        "TURNGATE_FINALIZE_TIMEOUT": "1",
        "TURNGATE_PING_SECONDS": "1",
        **extra,
    }


def _metric(gw: GatewayServer, name: str, **labels: str) -> float:
    value = gw.ctx.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_database_down_across_the_end_of_20_turns(outage: Outage) -> None:
    n, tokens = 20, 60
    # All n generate at once: above the default per-user stream quota (16).
    env = _env(TURNGATE_MAX_STREAMS_PER_USER=str(n))
    async with run_gateway(outage.gateway_url, **env) as gw, gw.client() as client:
        threads = [await gw.new_thread(client) for _ in range(n)]
        watched = [Watched() for _ in range(n)]
        halfway = [w.when(lambda w=w: w.deltas >= tokens // 2) for w in watched]  # type: ignore[misc]
        body = {"text": "x", "model": f"scripted:tokens={tokens},delay_ms=25"}
        async with anyio.create_task_group() as tg:
            for i, (thread, w) in enumerate(zip(threads, watched, strict=True)):
                tg.start_soon(
                    lambda t=thread, w=w, i=i: w.read(  # type: ignore[misc]
                        client, "POST", f"/v1/threads/{t}/turns", json=body | {"turn_id": f"t{i}"}
                    )
                )
            for event in halfway:
                await event.wait()
            await outage.begin()
            # Every generation ends while the database is away.
            await _until(lambda: all(t.finalizing for t in gw.ctx.relay.running())
                         and _metric(gw, "turngate_active_generations") == 0, 20)
            # The outage lasts 10 s beyond the end of the last turn.
            await anyio.sleep(10)
            assert all(w.finish_at is None for w in watched), "finish before the row was written"
            assert _metric(gw, "turngate_turns_finalized_total", status="complete") == 0
            assert _metric(gw, "turngate_finalize_retries_total") > 0
            back_at = time.monotonic()
            await outage.end()
        for w in watched:
            validate_ui_stream(w.stream)
            assert w.stream.text == _full(tokens)
            finish = w.stream.of_type("finish")[0]
            assert finish["finishReason"] == "stop"
            assert w.finish_at is not None and w.finish_at >= back_at
            assert not w.stream.of_type("error")
            assert w.stream.comments >= 5, "no keep-alive pings while the write waited"
        assert _metric(gw, "turngate_turns_finalized_total", status="complete") == n
        assert _metric(gw, "turngate_finalizing") == 0

    rows = await outage.fetch(
        "SELECT m.id, m.status, m.content, m.lease_owner, "
        "(SELECT count(*) FROM token_usage u WHERE u.message_id = m.id), "
        "(SELECT max(CAST(u.estimated AS integer)) FROM token_usage u "
        " WHERE u.message_id = m.id) "
        "FROM messages m WHERE m.role = 'assistant' ORDER BY m.id"
    )
    assert len(rows) == n
    for row in rows:
        content = row[2] if isinstance(row[2], list) else json.loads(row[2])
        assert row[1] == "complete" and row[3] is None
        assert content == [{"type": "text", "text": _full(tokens)}]
        assert (row[4], row[5]) == (1, 0), "one real (not estimated) usage row"


async def test_a_failed_final_write_does_not_hold_its_thread(outage: Outage) -> None:
    async with run_gateway(outage.gateway_url, **_env()) as gw, gw.client() as client:
        long_thread = await gw.new_thread(client)
        short_thread = await gw.new_thread(client)
        long_turn, short_turn = Watched(), Watched()
        long_started = long_turn.when(lambda: long_turn.deltas >= 5)
        short_started = short_turn.when(lambda: short_turn.deltas >= 5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: long_turn.read(
                client, "POST", f"/v1/threads/{long_thread}/turns",
                json={"turn_id": "long", "text": "x", "model": "scripted:tokens=600,delay_ms=10"}))
            tg.start_soon(lambda: short_turn.read(
                client, "POST", f"/v1/threads/{short_thread}/turns",
                json={"turn_id": "short", "text": "x", "model": "scripted:tokens=40,delay_ms=10"}))
            await long_started.wait()
            await short_started.wait()
            await outage.begin()
            short_live = gw.ctx.relay.get(short_thread, "short")
            assert short_live is not None
            await _until(lambda: short_live.finalizing, 10)
            if outage.kind == "sqlite":  # readers still read: the cancel route answers
                r = await client.post(f"/v1/threads/{short_thread}/turns/short/cancel")
                # It has ended; its status is decided, only not written yet.
                assert r.json() == {"cancelled": False, "status": "streaming"}
            # Its final write fails for a while (longer than the lease), the other turn runs.
            await anyio.sleep(LEASE + CHECKPOINT)
            assert short_turn.finish_at is None
            back_at = time.monotonic()
            await outage.end()
            # A new turn on the short turn's thread is taken within 2 x checkpoint interval.
            while True:
                r = await client.post(f"/v1/threads/{short_thread}/turns", json={
                    "turn_id": "next", "text": "y", "model": "scripted:tokens=3"})
                if r.status_code == 200:
                    break
                assert r.status_code in (409, 503), r.text
                assert time.monotonic() - back_at < 2 * CHECKPOINT, "the thread stayed busy"
                await anyio.sleep(0.02)
            took = time.monotonic() - back_at
            assert took < 2 * CHECKPOINT
            assert long_turn.finish_at is None, "the other turn was still running"
        assert short_turn.stream.text == _full(40) and long_turn.stream.text == _full(600)
        msgs = (await client.get(f"/v1/threads/{short_thread}/messages")).json()["messages"]
        assert [(m["turn_id"], m["status"]) for m in msgs if m["role"] == "assistant"] == [
            ("short", "complete"), ("next", "complete")]
        assert msgs[1]["content"] == [{"type": "text", "text": _full(40)}]
        usage = (await client.get("/v1/usage", params={"thread_id": short_thread})).json()
        assert sorted(u["estimated"] for u in usage["usage"]) == [False, False]


@asynccontextmanager
async def _one_turn(gw: GatewayServer, client: httpx.AsyncClient, thread: str,
                    model: str) -> AsyncIterator[tuple[Watched, Any]]:
    """A turn streaming in the gateway, its reader, and its LiveTurn (once checkpointed)."""
    w = Watched()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: w.read(client, "POST", f"/v1/threads/{thread}/turns",
                                     json={"turn_id": "t1", "text": "x", "model": model}))
        await _until(lambda: gw.ctx.relay.get(thread, "t1") is not None, 5)
        live = gw.ctx.relay.get(thread, "t1")
        await _until(lambda: live.checkpointed_version > 0, 5)  # type: ignore[union-attr]
        yield w, live


async def _reap(gw: GatewayServer, message_id: int) -> None:
    """What another replica's reaper does to a row whose lease ran out.

    The gateway's own maintenance may renew the lease between our two statements
    (then we expire it again), or reap the row itself first (just as good).
    """
    store = gw.store
    past = "2000-01-01T00:00:00.000000Z"
    with anyio.fail_after(5):
        while True:
            await store._db.execute(
                "UPDATE messages SET lease_expires_at = :past "
                "WHERE id = :id AND status = 'streaming'",
                {"past": store._ts_param(past), "id": message_id},
            )
            if message_id in await store.recover_expired_turns():
                return
            status = await store._db.fetch_val(
                "SELECT status FROM messages WHERE id = :id", {"id": message_id})
            if status == "interrupted":
                return


async def test_an_owner_takes_back_a_reaped_row_and_finishes_it(database_url: str) -> None:
    async with run_gateway(database_url, **_env()) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        async with _one_turn(gw, client, thread, "scripted:tokens=200,delay_ms=10") as (w, live):
            await _reap(gw, live.message_id)
            # The owner notices at its next checkpoint or renewal and takes the row back.
            with anyio.fail_after(5):
                while (await gw.store.get_turn(thread, "t1")).assistant.status != "streaming":  # type: ignore[union-attr]
                    await anyio.sleep(0.02)
        validate_ui_stream(w.stream)
        assert w.stream.text == _full(200)
        assert w.stream.of_type("finish")[0]["finishReason"] == "stop"
        msgs = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
        assert msgs[-1]["status"] == "complete"
        assert msgs[-1]["content"] == [{"type": "text", "text": _full(200)}]
        usage = (await client.get("/v1/usage", params={"thread_id": thread})).json()["usage"]
        assert [(u["estimated"], u["completion_tokens"]) for u in usage] == [(False, 200)]


async def test_an_owner_that_cannot_take_its_row_back_stops_and_says_so(
    database_url: str,
) -> None:
    async with run_gateway(database_url, **_env()) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        async with _one_turn(gw, client, thread, "scripted:tokens=2000,delay_ms=10") as (w, live):
            # The lease runs out and, in the same statement, another process opens a
            # turn on the thread (open_turn interrupts an expired holder itself).
            from persistence import build_user_content

            store, past = gw.store, "2000-01-01T00:00:00.000000Z"
            with anyio.fail_after(5):
                while True:  # until no renewal of the owner slipped in between
                    await store._db.execute(
                        "UPDATE messages SET lease_expires_at = :past WHERE id = :id",
                        {"past": store._ts_param(past), "id": live.message_id},
                    )
                    other = await store.open_turn(
                        thread, gw.user_id, "elsewhere", build_user_content("z"),
                        lease_owner="another-replica", lease_seconds=60,
                    )
                    if other.assistant_inserted:
                        break
        validate_ui_stream(w.stream)
        assert len(w.stream.text) < len(_full(2000)), "the generation was not stopped"
        errors = w.stream.of_type("error")
        assert [e["errorText"] for e in errors] == [LEASE_LOST_ERROR]
        assert w.stream.of_type("abort")
        assert w.stream.of_type("finish")[0]["finishReason"] == "error"
        msgs = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
        old = next(m for m in msgs if m["turn_id"] == "t1" and m["role"] == "assistant")
        # What the client saw is what is stored: more than the reaper's checkpoint.
        assert old["status"] == "interrupted"
        assert old["content"] == [{"type": "text", "text": w.stream.text}]
        usage = (await client.get("/v1/usage", params={"thread_id": thread})).json()["usage"]
        assert len(usage) == 1 and usage[0]["message_id"] == live.message_id


async def test_a_drain_gives_up_a_final_write_the_database_never_takes(outage: Outage) -> None:
    from gateway.turn.lifecycle import NOT_SAVED_ERROR

    env = _env(TURNGATE_SHUTDOWN_GRACE_SECONDS="0.5")
    async with run_gateway(outage.gateway_url, **env) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        w = Watched()
        started = w.when(lambda: w.deltas >= 5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: w.read(client, "POST", f"/v1/threads/{thread}/turns", json={
                "turn_id": "t1", "text": "x", "model": "scripted:tokens=20,delay_ms=10"}))
            await started.wait()
            await outage.begin()
            live = gw.ctx.relay.get(thread, "t1")
            assert live is not None
            await _until(lambda: live.finalizing, 5)
            assert gw.ctx.shutdown_event is not None
            shutdown_at = time.monotonic()
            gw.ctx.shutdown_event.set()  # what SIGTERM does
        # Given up at the end of the grace (0.5 s), after the attempt then in flight, and
        # before the streams still open are cut (grace + finalize timeout + 1 s).
        assert w.finish_at is not None and w.finish_at - shutdown_at < 2.5
        validate_ui_stream(w.stream)
        assert [e["errorText"] for e in w.stream.of_type("error")] == [NOT_SAVED_ERROR]
        assert w.stream.of_type("finish")[0]["finishReason"] == "error"
        assert _metric(gw, "turngate_turns_finalized_total", status="complete") == 0
        await outage.end()
    rows = await outage.fetch("SELECT status FROM messages WHERE role = 'assistant'")
    assert [r[0] for r in rows] == ["streaming"], "left for a reaper, with its checkpoint"


async def test_a_write_whose_answer_was_lost_is_recognised_on_the_retry(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.turn.finalize as finalize_module

    real = finalize_module.finalize
    calls: list[str] = []

    async def lost_answer(*args: Any) -> str:
        outcome = await real(*args)
        calls.append(outcome)
        return "failed" if len(calls) == 1 else outcome  # committed, answer lost

    monkeypatch.setattr(finalize_module, "finalize", lost_answer)
    async with run_gateway(database_url, **_env()) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        w = Watched()
        await w.read(client, "POST", f"/v1/threads/{thread}/turns", json={
            "turn_id": "t1", "text": "x", "model": "scripted:tokens=5"})
        assert calls == ["ok", "row_missing"]  # the retry found the row final already
        validate_ui_stream(w.stream)
        assert w.stream.of_type("finish")[0]["finishReason"] == "stop"
        assert _metric(gw, "turngate_turns_finalized_total", status="complete") == 1
        assert _metric(gw, "turngate_finalize_retries_total") == 1


async def test_a_pending_final_write_keeps_its_lease(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database answers, the final write does not land (yet): the row stays ours,
    renewed, for longer than a lease, and no reaper takes it."""
    import gateway.turn.finalize as finalize_module

    real = finalize_module.finalize
    landed = anyio.Event()
    attempts = 0

    async def failing_until_allowed(*args: Any) -> str:
        nonlocal attempts
        attempts += 1
        return await real(*args) if landed.is_set() else "failed"

    monkeypatch.setattr(finalize_module, "finalize", failing_until_allowed)
    async with run_gateway(database_url, **_env()) as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        w = Watched()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: w.read(client, "POST", f"/v1/threads/{thread}/turns", json={
                "turn_id": "t1", "text": "x", "model": "scripted:tokens=10,delay_ms=5"}))
            await _until(lambda: attempts > 0, 5)
            await anyio.sleep(LEASE + 2 * CHECKPOINT)  # the pending write outlives a lease
            assert await gw.store.recover_expired_turns() == []
            turn = await gw.store.get_turn(thread, "t1")
            assert turn.assistant is not None and turn.assistant.status == "streaming"
            lease = await gw.store._db.fetch_val(
                "SELECT lease_owner FROM messages WHERE id = :id",
                {"id": turn.assistant.id})
            assert lease == gw.ctx.instance_id
            assert w.finish_at is None
            landed.set()
        assert w.stream.of_type("finish")[0]["finishReason"] == "stop"
        msgs = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
        assert (msgs[-1]["status"], msgs[-1]["content"]) == (
            "complete", [{"type": "text", "text": _full(10)}])
