"""Several replicas over one PostgreSQL and one Redis behave as one gateway.

Real ``turngate serve`` processes on different ports. Redis db 15 is flushed
before each test. Redis missing is a failure (scripts/test.sh starts it).
"""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from tests.fixtures_db import RoundTripProxy
from tests.fixtures_server import ServerProcess
from tests.sse_client import Stream, stream_request, validate_ui_stream
from tests.test_bad_input import assert_json_error
from tests.waiting import Reading, streaming_with_text

pytestmark = pytest.mark.anyio

REDIS_HOST = os.environ.get("TURNGATE_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TURNGATE_TEST_REDIS_PORT", "6379"))
# One Redis database per pytest-xdist worker (gw0 → 15, gw1 → 14, ...): each test flushes its own.
REDIS_DB = 15 - int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
CHECKPOINT = 0.3
LEASE = 1.5


@pytest.fixture
async def redis_url() -> str:
    """A flushed Redis database for this test."""
    import redis.asyncio as redis_asyncio

    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    client = redis_asyncio.Redis.from_url(url, socket_connect_timeout=2)
    try:
        await client.flushdb()
    except Exception as exc:
        # Like PostgreSQL: a missing service is a failure, never a silent skip.
        pytest.fail(f"Redis at {REDIS_HOST}:{REDIS_PORT} is required: {exc}")
    finally:
        await client.aclose()
    return url


@asynccontextmanager
async def replicas(
    pg_url: str, redis: str, n: int, **env: str
) -> AsyncIterator[tuple[list[ServerProcess], dict[str, str]]]:
    """``n`` replicas on one database and one Redis, and the auth header of one user."""
    environ = {"REDIS_URL": redis, **env}
    procs = [ServerProcess(pg_url, None, **environ) for _ in range(n)]
    key = (await procs[0].cli("keys", "create", "alice")).splitlines()[-1]
    try:
        async with anyio.create_task_group() as tg:
            for p in procs:
                tg.start_soon(p.start)
        yield procs, {"authorization": f"Bearer {key}"}
    finally:
        for p in procs:
            await p.stop()


def _client(p: ServerProcess, headers: dict[str, str]) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=p.url, headers=headers, timeout=20)


def _full(n: int) -> str:
    return "".join(f"w{i} " for i in range(1, n + 1))


async def _generations(procs: list[ServerProcess]) -> float:
    total = 0.0
    async with httpx.AsyncClient() as client:
        for p in procs:
            for line in (await client.get(f"{p.url}/metrics")).text.splitlines():
                if line.startswith("turngate_generations_started_total "):
                    total += float(line.split()[1])
    return total


async def _last_message(client: httpx.AsyncClient, thread: str) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = (await client.get(f"/v1/threads/{thread}/messages")).json()[
        "messages"
    ]
    return msgs[-1]


async def test_attach_resume_cancel_from_another_replica(pg_url: str, redis_url: str) -> None:
    async with replicas(pg_url, redis_url, 2) as (procs, headers), \
            _client(procs[0], headers) as a, _client(procs[1], headers) as b:
        thread = (await a.post("/v1/threads", json={})).json()["id"]
        turns = f"/v1/threads/{thread}/turns"
        body = {"turn_id": "t1", "text": "x", "model": "scripted:tokens=80,delay_ms=10"}
        box: dict[str, Stream] = {}

        reading_a = Reading()

        async def on_a() -> None:
            box["a"] = await reading_a.run(a, "POST", turns, json=body)

        async def attach_on_b() -> None:
            await reading_a.events_at_least(3)  # A generates: start, text-start, a delta
            box["b"] = await stream_request(b, "POST", turns, json=body)

        async def resume_on_b() -> None:
            await reading_a.events_at_least(8)  # events after id 5 exist; the turn runs on
            box["r"] = await stream_request(
                b, "GET", f"{turns}/t1/stream", headers={"last-event-id": "5"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_a)
            tg.start_soon(attach_on_b)
            tg.start_soon(resume_on_b)
        full_a, attached, resumed = box["a"], box["b"], box["r"]
        for s in (full_a, attached):
            validate_ui_stream(s)
            assert s.text == _full(80)
        # Attached on B: the very same events (ids and bytes) as the first client on A,
        # but for the new thread's title, which only readers on A get (it is transient).
        kept_a = [e for e in full_a.events if not e.transient]
        assert [e.chunk["type"] for e in full_a.events if e.transient and e.chunk] == [
            "data-title"]
        assert [(e.id, e.data) for e in attached.events] == [(e.id, e.data) for e in kept_a]
        # Resumed on B live from Last-Event-ID 5: the rest, none missing, none repeated.
        assert [(e.id, e.data) for e in resumed.events] == [
            (e.id, e.data) for e in kept_a[6:]]
        assert await _generations(procs) == 1

        # Resume on B after the end, from the relayed copy (same ids as live).
        after = await stream_request(b, "GET", f"{turns}/t1/stream",
                                     headers={"last-event-id": "10"})
        assert [e.id for e in after.events] == [e.id for e in kept_a[11:]]
        assert (await _last_message(b, thread))["status"] == "complete"

        # Cancel on B a turn that A generates.
        body2 = {"turn_id": "t2", "text": "x", "model": "scripted:tokens=500,delay_ms=10"}

        reading_c = Reading()

        async def long_on_a() -> None:
            box["c"] = await reading_c.run(a, "POST", turns, json=body2)
            box["ended_at"] = anyio.current_time()  # type: ignore[assignment]

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_on_a)
            await reading_c.events_at_least(3)
            sent = anyio.current_time()
            r = await b.post(f"{turns}/t2/cancel")
            assert r.status_code == 200, r.text
            assert r.json() == {"cancelled": True, "status": "cancelled"}
        assert box["ended_at"] - sent < 1.0  # type: ignore[operator]
        cancelled = box["c"]
        validate_ui_stream(cancelled)
        assert cancelled.of_type("abort") and len(cancelled.text) < len(_full(500))
        last = await _last_message(b, thread)
        assert last["status"] == "cancelled" and last["content"][0]["text"] == cancelled.text
        assert await _generations(procs) == 2


async def test_same_turn_ten_times_over_two_replicas_for_a_hundred_rounds(
    pg_url: str, redis_url: str
) -> None:
    """Ten identical submits per round, five at each replica: all get the reply, one
    generation each round (a racing open must attach, never answer ``409``)."""
    rounds, submits, tokens = 100, 10, 6
    # 11 requests a round: lift the per-user rate limit that would refuse them.
    async with replicas(pg_url, redis_url, 2, TURNGATE_RATE_LIMIT_PER_MINUTE="100000") as (
        procs, headers
    ), _client(procs[0], headers) as a, _client(procs[1], headers) as b:
        threads = []
        for i in range(rounds):
            thread = (await a.post("/v1/threads", json={})).json()["id"]
            threads.append(thread)
            body = {"turn_id": f"same-{i}", "text": "x",
                    "model": f"scripted:tokens={tokens},delay_ms=2"}
            streams: list[Stream] = []

            async def send(
                client: httpx.AsyncClient, body: dict[str, str] = body,
                streams: list[Stream] = streams, thread: str = thread,
            ) -> None:
                streams.append(await stream_request(
                    client, "POST", f"/v1/threads/{thread}/turns", json=body))

            async with anyio.create_task_group() as tg:
                for j in range(submits):
                    tg.start_soon(send, (a, b)[j % 2])
            assert len(streams) == submits
            for s in streams:
                assert s.status == 200, (i, s.status, getattr(s, "body", b""))
                validate_ui_stream(s)
                assert s.text == _full(tokens)
            assert len({s.chunks[0]["messageId"] for s in streams}) == 1
        assert await _generations(procs) == rounds
        for thread in threads:
            msgs = (await a.get(f"/v1/threads/{thread}/messages")).json()["messages"]
            assert [(m["role"], m["status"]) for m in msgs] == [
                ("user", "complete"), ("assistant", "complete")]
            usage = (await a.get("/v1/usage", params={"thread_id": thread})).json()["usage"]
            assert len(usage) == 1


async def test_sigkill_one_replica_mid_turn_another_recovers(pg_url: str, redis_url: str) -> None:
    env = {"TURNGATE_CHECKPOINT_SECONDS": str(CHECKPOINT), "TURNGATE_LEASE_SECONDS": str(LEASE)}
    async with replicas(pg_url, redis_url, 2, **env) as (procs, headers), \
            _client(procs[0], headers) as a, _client(procs[1], headers) as b:
        thread = (await a.post("/v1/threads", json={})).json()["id"]
        body = {"turn_id": "doomed", "text": "x", "model": "scripted:tokens=1000,delay_ms=10"}
        box: dict[str, Stream] = {}

        reading_a, reading_b = Reading(), Reading()

        async def on_a() -> None:
            try:
                await reading_a.run(a, "POST", f"/v1/threads/{thread}/turns", json=body)
            except httpx.TransportError:
                pass  # the replica died under it

        async def attached_on_b() -> None:
            await reading_a.events_at_least(3)
            box["b"] = await reading_b.run(b, "POST", f"/v1/threads/{thread}/turns", json=body)

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_a)
            tg.start_soon(attached_on_b)
            # Killed once B's reader follows the turn and a checkpoint holds some text.
            await reading_b.events_at_least(5)
            await streaming_with_text(b, thread, prefix="w1 w2 ", within=LEASE + 3 * CHECKPOINT)
            procs[0].kill(signal.SIGKILL)
            assert await procs[0].wait(5) is not None
            killed_at = anyio.current_time()
            with anyio.fail_after(LEASE + CHECKPOINT + 3):
                while (last := await _last_message(b, thread))["status"] != "interrupted":
                    assert last["status"] == "streaming"
                    await anyio.sleep(0.1)
        assert anyio.current_time() - killed_at <= LEASE + CHECKPOINT + 3
        assert last["content"][0]["text"].startswith("w1 w2 "), "checkpointed content lost"
        # The reader attached on B was not left hanging: its stream ended, with an
        # error event that has no id (told to resume) rather than finish/[DONE].
        assert box["b"].text.startswith("w1 w2 ")
        end = box["b"].events[-1]
        assert end.id is None and "relay_lost" in end.data, box["b"].events[-2:]
        usage = (await b.get("/v1/usage", params={"thread_id": thread})).json()["usage"]
        assert len(usage) == 1 and usage[0]["estimated"] is True
        nxt = await stream_request(b, "POST", f"/v1/threads/{thread}/turns",
                                   json={"turn_id": "after", "text": "y",
                                         "model": "scripted:tokens=3"})
        validate_ui_stream(nxt)
        assert nxt.text == "w1 w2 w3 "


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_redis_down_at_start_up_stops_serve(pg_url: str, redis_url: str) -> None:
    p = ServerProcess(pg_url, REDIS_URL=f"redis://127.0.0.1:{_closed_port()}/0")
    with anyio.fail_after(20):
        result = await anyio.run_process(
            [p.bin, "serve", "--port", str(p.port)], env=p.env, check=False)
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "RelayError" in err and "REDIS_URL" in err and "Redis does not answer" in err, err


async def test_redis_lost_while_running(pg_url: str, redis_url: str) -> None:
    proxy = RoundTripProxy(REDIS_HOST, REDIS_PORT)
    await proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}/{REDIS_DB}"
    try:
        async with replicas(pg_url, url, 1) as (procs, headers), \
                _client(procs[0], headers) as a:
            thread = (await a.post("/v1/threads", json={})).json()["id"]
            other = (await a.post("/v1/threads", json={})).json()["id"]
            body = {"turn_id": "running", "text": "x", "model": "scripted:tokens=150,delay_ms=10"}
            box: dict[str, Stream] = {}

            reading = Reading()

            async def running() -> None:
                box["s"] = await reading.run(a, "POST", f"/v1/threads/{thread}/turns",
                                             json=body)

            async with anyio.create_task_group() as tg:
                tg.start_soon(running)
                await reading.events_at_least(3)
                await proxy.close()
                # The bound under test: the health check (a ping a second) notices
                # within 1.5 s; no request may probe it earlier (it would start a turn).
                await anyio.sleep(1.5)
                r = await a.post(f"/v1/threads/{other}/turns",
                                 json={"turn_id": uuid.uuid4().hex, "text": "y"})
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "relay_unavailable"
                # The rate limit falls back to this process's window: other writes go on.
                assert (await a.post("/v1/threads", json={})).status_code == 201
            validate_ui_stream(box["s"])
            assert box["s"].text == _full(150)
            assert (await _last_message(a, thread))["status"] == "complete"
            msgs = (await a.get(f"/v1/threads/{other}/messages")).json()["messages"]
            assert msgs == []  # nothing written for the refused turn
    finally:
        await proxy.close()


@pytest.mark.parametrize("policy", ["grace", "cancel"])
async def test_a_reader_on_another_replica_keeps_the_turn_alive(
    pg_url: str, redis_url: str, policy: str
) -> None:
    """As on one process: the disconnect policy applies only when the last reader
    anywhere left (under grace, once the grace period has passed too)."""
    env = ({"TURNGATE_DISCONNECT_GRACE_SECONDS": "0.5"} if policy == "grace"
           else {"TURNGATE_ON_DISCONNECT": "cancel"})
    async with replicas(pg_url, redis_url, 2, **env) as (procs, headers), \
            _client(procs[0], headers) as a, _client(procs[1], headers) as b:
        thread = (await a.post("/v1/threads", json={})).json()["id"]
        turns = f"/v1/threads/{thread}/turns"

        # 1. A's reader leaves early, B's follows to the end: the turn completes.
        body = {"turn_id": "kept", "text": "x", "model": "scripted:tokens=60,delay_ms=20"}
        box: dict[str, Stream] = {}
        kept_on_a = Reading()

        async def follow_on_b() -> None:
            await kept_on_a.events_at_least(3)  # the turn generates at A
            box["b"] = await stream_request(b, "POST", turns, json=body)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow_on_b)
            await kept_on_a.run(a, "POST", turns, json=body, limit=20)
        validate_ui_stream(box["b"])
        assert box["b"].text == _full(60)
        assert (await _last_message(a, thread))["status"] == "complete"

        # 2. Both leave, B last: the turn is cancelled once B has gone.
        body = {"turn_id": "dropped", "text": "x", "model": "scripted:tokens=400,delay_ms=20"}

        dropped_on_a = Reading()

        async def leave_on_b() -> None:
            await dropped_on_a.events_at_least(3)  # the turn generates at A
            await stream_request(b, "POST", turns, json=body, limit=25)
            box["b_left"] = Stream(0, {})

        async with anyio.create_task_group() as tg:
            tg.start_soon(leave_on_b)
            await dropped_on_a.run(a, "POST", turns, json=body, limit=10)
        with anyio.fail_after(2.5):
            while (last := await _last_message(a, thread))["status"] == "streaming":
                await anyio.sleep(0.05)
        assert last["status"] == "cancelled"
        text = last["content"][0]["text"]
        assert len(text.split()) < 400 and _full(400).startswith(text)


async def test_a_new_turn_at_another_replica_supersedes_a_turn_nobody_reads(
    pg_url: str, redis_url: str
) -> None:
    """useChat's Stop, then the next message through the load balancer to the other
    replica: no 409; the stopped turn keeps what its reader was sent."""
    async with replicas(pg_url, redis_url, 2, TURNGATE_DISCONNECT_GRACE_SECONDS="30") as (
        procs, headers
    ), _client(procs[0], headers) as a, _client(procs[1], headers) as b:
        thread = (await a.post("/v1/threads", json={})).json()["id"]
        turns = f"/v1/threads/{thread}/turns"
        stopped = await stream_request(a, "POST", turns, json={
            "turn_id": "t1", "text": "x", "model": "scripted:tokens=400,delay_ms=20"}, limit=12)
        sent = anyio.current_time()
        nxt = await stream_request(b, "POST", turns, json={
            "turn_id": "t2", "text": "y", "model": "scripted:tokens=3"})
        assert nxt.status == 200, getattr(nxt, "body", b"")
        validate_ui_stream(nxt)
        assert anyio.current_time() - sent < 5
        msgs = (await a.get(f"/v1/threads/{thread}/messages")).json()["messages"]
        by_turn = {m["turn_id"]: m for m in msgs if m["role"] == "assistant"}
        assert by_turn["t1"]["status"] == "cancelled"
        assert by_turn["t1"]["content"][0]["text"] == stopped.text
        assert by_turn["t2"]["status"] == "complete"


@asynccontextmanager
async def _two_clients(
    pg_url: str, redis: str, **env: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two replicas, and one user's client on each."""
    async with replicas(pg_url, redis, 2, **env) as (procs, headers), \
            _client(procs[0], headers) as a, _client(procs[1], headers) as b:
        yield a, b


async def _wait_streaming(client: httpx.AsyncClient, thread: str) -> None:
    with anyio.fail_after(5):
        while True:
            msgs = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
            if msgs and msgs[-1]["status"] == "streaming":
                return
            await anyio.sleep(0.02)


async def test_stream_limit_counts_the_turns_of_every_replica(
    pg_url: str, redis_url: str
) -> None:
    async with _two_clients(pg_url, redis_url, TURNGATE_MAX_STREAMS_PER_USER="1") as (a, b):
        t1 = (await a.post("/v1/threads", json={})).json()["id"]
        t2 = (await b.post("/v1/threads", json={})).json()["id"]
        slow = {"turn_id": "slow", "text": "x", "model": "scripted:tokens=40,delay_ms=25"}
        second = {"turn_id": "second", "text": "y", "model": "scripted:tokens=3"}
        box: dict[str, Stream] = {}

        async def on_a() -> None:
            box["a"] = await stream_request(a, "POST", f"/v1/threads/{t1}/turns", json=slow)

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_a)
            await _wait_streaming(b, t1)
            # B has no turn of its own running, but the user's one slot is taken on A.
            r = await b.post(f"/v1/threads/{t2}/turns", json=second)
            error = assert_json_error(r, 429, "too_many_streams", "second stream on B")
            assert "at most 1" in error["message"] and r.headers["retry-after"].isdigit()
            assert (await b.get(f"/v1/threads/{t2}/messages")).json()["messages"] == []
            # Attaching to A's turn from B is no new stream, and leaves A's slot held.
            async with b.stream("POST", f"/v1/threads/{t1}/turns", json=slow) as attached:
                assert attached.status_code == 200
                r = await b.post(f"/v1/threads/{t2}/turns", json=second)
                assert_json_error(r, 429, "too_many_streams", "while attached on B")
                async for _ in attached.aiter_bytes():
                    pass
        validate_ui_stream(box["a"])
        # A's turn ended: the slot is free on the other replica at once.
        s = await stream_request(b, "POST", f"/v1/threads/{t2}/turns", json=second)
        validate_ui_stream(s)
        assert s.text == "w1 w2 w3 "


async def test_rate_limit_counts_the_requests_of_every_replica(
    pg_url: str, redis_url: str
) -> None:
    async with _two_clients(pg_url, redis_url, TURNGATE_RATE_LIMIT_PER_MINUTE="4") as (a, b):
        for client in (a, b, a, b):  # two on each: under the limit in either process
            assert (await client.post("/v1/threads", json={})).status_code == 201
        for client in (a, b):
            r = await client.post("/v1/threads", json={})
            error = assert_json_error(r, 429, "rate_limited", "fifth request")
            assert "4 requests" in error["message"]
            assert 1 <= int(r.headers["retry-after"]) <= 60
        # Nothing was written by the refused requests; reads are not counted.
        assert len((await a.get("/v1/threads")).json()["threads"]) == 4


async def test_stream_holds_expire_unless_renewed_and_release_is_final(redis_url: str) -> None:
    # What a replica that dies leaves behind: holds that lapse after the lease.
    from gateway.replicas.limits import SharedLimits
    from gateway.replicas.relay import RedisRelay

    relay = RedisRelay(redis_url)
    await relay.connect()
    try:
        limits = SharedLimits(relay, hold_seconds=0.5)
        assert await limits.reserve_stream(7, "th1", "t1", 1) == (True, 0)
        assert await limits.reserve_stream(7, "th1", "t1", 1) == (False, 0)  # same turn
        assert await limits.reserve_stream(7, "th2", "t1", 1) == (False, 1)  # full
        assert await limits.reserve_stream(8, "th3", "t1", 1) == (True, 0)  # another user
        for _ in range(3):  # renewed: still held past its first expiry
            await anyio.sleep(0.25)  # the pace of the renewals, within the 0.5 s hold
            await limits.renew_streams([(7, "th1", "t1")])
        assert await limits.reserve_stream(7, "th2", "t1", 1) == (False, 1)
        await anyio.sleep(0.6)  # past the 0.5 s hold, not renewed: the expiry under test
        assert await limits.reserve_stream(7, "th2", "t1", 1) == (True, 0)
        await limits.release_stream(7, "th2", "t1")
        await limits.renew_streams([(7, "th2", "t1")])  # never re-creates a released hold
        assert await limits.reserve_stream(7, "th4", "t1", 1) == (True, 0)
        # The rate window: the limit, then the wait until the oldest request leaves it.
        assert [await limits.hit_rate(9, 2) for _ in range(2)] == [None, None]
        wait = await limits.hit_rate(9, 2)
        assert wait is not None and 59 <= wait <= 60
    finally:
        await relay.aclose()
