"""Redis lost under followers on another replica, and back.

The test runs its own ``redis-server`` on a free port (never the shared one),
kills it with SIGKILL while readers on replica B follow a turn that replica A
generates, and starts it again on the same port, empty (no persistence).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import httpx
import pytest

from tests.fixtures_server import free_port
from tests.sse_client import SSEEvent, Stream, parse_sse, stream_request, validate_ui_stream
from tests.test_replicas import _client, _full, replicas

pytestmark = pytest.mark.anyio


class RedisServer:
    """A ``redis-server`` of this test's own, that it kills and restarts."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis.asyncio as redis_asyncio

        client = redis_asyncio.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            with anyio.fail_after(10):
                while True:
                    try:
                        await client.ping()
                        return
                    except Exception:
                        assert self.proc.poll() is None, "redis-server exited"
                        await anyio.sleep(0.05)
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)


@asynccontextmanager
async def own_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class Follower:
    """A reader on replica B: the events it got and whether the stream ended."""

    stream: Stream = field(default_factory=lambda: Stream(0, {}))
    got_some: anyio.Event = field(default_factory=anyio.Event)
    ended: anyio.Event = field(default_factory=anyio.Event)

    @property
    def last_id(self) -> int:
        ids = [int(e.id) for e in self.stream.events if e.id is not None]
        return ids[-1] if ids else -1


async def _follow(client: httpx.AsyncClient, method: str, url: str, f: Follower,
                  **kwargs: object) -> None:
    try:
        async with client.stream(method, url, **kwargs) as response:  # type: ignore[arg-type]
            assert response.status_code == 200, response.status_code
            f.stream.status = response.status_code
            f.stream.headers = dict(response.headers)

            async def lines() -> AsyncIterator[str]:
                async for line in response.aiter_lines():
                    if f.stream.events and f.stream.events[-1].id not in (None, "0", "1"):
                        f.got_some.set()
                    yield line

            await parse_sse(lines(), f.stream)
    finally:
        f.ended.set()


async def _resume(client: httpx.AsyncClient, url: str, after: int, f: Follower) -> None:
    """Resume from ``after``, retrying while B answers 503/409 (not copied again yet)."""
    for _ in range(100):
        async with client.stream("GET", url, headers={"last-event-id": str(after)}) as resp:
            if resp.status_code != 200:
                await resp.aread()
                assert resp.status_code in (409, 503), resp.status_code
                retry = float(resp.headers.get("retry-after", "1"))
            else:
                f.stream.status = 200
                f.stream.headers = dict(resp.headers)
                f.got_some.set()
                await parse_sse(resp.aiter_lines(), f.stream)
                f.ended.set()
                return
        await anyio.sleep(retry / 10)  # a tenth of Retry-After: bounded by the loop
    raise AssertionError("never resumed")


def _is_resume_end(events: list[SSEEvent]) -> bool:
    """An ``error`` chunk with no id, last, and no ``[DONE]``: resume."""
    if not events or events[-1].id is not None or events[-1].data == "[DONE]":
        return False
    chunk = json.loads(events[-1].data)
    return chunk["type"] == "error" and "Last-Event-ID" in chunk["errorText"]


async def test_followers_get_a_usable_end_and_resume_after_redis_is_back(pg_url: str) -> None:
    async with own_redis() as redis, replicas(pg_url, redis.url, 2) as (procs, headers), \
            _client(procs[0], headers) as a, _client(procs[1], headers) as b:
        thread = (await a.post("/v1/threads", json={})).json()["id"]
        turns = f"/v1/threads/{thread}/turns"
        tokens = 600
        body = {"turn_id": "t1", "text": "x", "model": f"scripted:tokens={tokens},delay_ms=10"}
        box: dict[str, Stream] = {}
        a_done = anyio.Event()

        async def on_a() -> None:
            box["a"] = await stream_request(a, "POST", turns, json=body)
            a_done.set()

        followers = [Follower() for _ in range(3)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(on_a)
            with anyio.fail_after(10):
                while (await b.get(f"/v1/threads/{thread}/messages")).json()["messages"] == []:
                    await anyio.sleep(0.02)
            # Three ways to follow A's turn from B: attach, resume from the start,
            # resume from an id.
            tg.start_soon(lambda: _follow(b, "POST", turns, followers[0], json=body))
            tg.start_soon(lambda: _follow(b, "GET", f"{turns}/t1/stream", followers[1]))
            tg.start_soon(lambda: _follow(b, "GET", f"{turns}/t1/stream", followers[2],
                                          headers={"last-event-id": "3"}))
            with anyio.fail_after(10):
                for f in followers:
                    await f.got_some.wait()

            redis.kill()
            killed_at = anyio.current_time()
            with anyio.fail_after(5):
                for f in followers:
                    await f.ended.wait()
            ended_within = anyio.current_time() - killed_at
            assert ended_within < 1.0
            for f in followers:
                assert _is_resume_end(f.stream.events), f.stream.events[-3:]
                assert f.last_id >= 3

            # While Redis is away: a resume on B is told to come back later.
            with anyio.fail_after(5):
                while True:
                    r = await b.get(f"{turns}/t1/stream",
                                    headers={"last-event-id": str(followers[0].last_id)})
                    if r.status_code == 503:
                        break
                    await anyio.sleep(0.1)  # B's health check has not noticed yet
            assert r.json()["error"]["code"] == "relay_unavailable"
            assert r.headers["retry-after"] == "2"

            await redis.start()  # the same port, empty
            back_at = anyio.current_time()
            resumed = [Follower() for _ in followers]
            for f, r_f in zip(followers, resumed, strict=True):
                tg.start_soon(_resume, b, f"{turns}/t1/stream", f.last_id, r_f)
            with anyio.fail_after(10):
                for r_f in resumed:
                    await r_f.got_some.wait()
            back_within = anyio.current_time() - back_at
            # Resumed from the copy written anew while the turn still runs on A.
            assert not a_done.is_set()

        full = box["a"]
        validate_ui_stream(full)
        assert full.text == _full(tokens)
        # Followers on B never get the new thread's transient title (A's readers only).
        expected = [(e.id, e.data) for e in full.events if not e.transient]
        for f, r_f in zip(followers, resumed, strict=True):
            # Stitched: what the follower had (without the error), then the resume:
            # the rest of the turn once, with the live ids and bytes, ending in [DONE].
            stitched = f.stream.events[:-1] + r_f.stream.events
            start = int(stitched[0].id or 0)
            assert [(e.id, e.data) for e in stitched] == expected[start:]
            if start == 0:
                validate_ui_stream(Stream(200, full.headers, stitched))
        print(f"\nfollowers ended {ended_within:.2f} s after Redis was killed; "
              f"all resumed {back_within:.2f} s after it was back")


async def _collect(body: AsyncIterator[bytes]) -> tuple[bytes, str | None]:
    """Everything ``read_turn`` yields, and the ``RelayLost`` reason it ended with (if any)."""
    from gateway.replicas.stream import RelayLost

    out = b""
    try:
        async for data in body:
            out += data
    except RelayLost as exc:
        return out, str(exc)
    return out, None


def _events(first: int, n: int) -> list[bytes]:
    return [b"id: %d\ndata: {\"n\":%d}\n\n" % (i, i) for i in range(first, first + n)]


async def test_a_copy_that_stops_short_of_its_end_tells_the_follower_to_resume() -> None:
    import redis.asyncio as redis_asyncio

    from gateway.replicas.stream import COUNT, DATA, END, FIRST, StreamWriter, read_turn
    from gateway.streaming.relay import LiveTurn

    async def streaming() -> bool:
        return True

    async def not_streaming() -> bool:
        return False

    async with own_redis() as redis:
        client = redis_asyncio.Redis.from_url(redis.url)
        try:
            # A hole (the start of the rest was trimmed away): what came before, then resume.
            await client.xadd("hole", {FIRST: 0, COUNT: 2, DATA: b"".join(_events(0, 2))})
            await client.xadd("hole", {FIRST: 5, COUNT: 1, DATA: b"".join(_events(5, 1))})
            assert await _collect(read_turn(client, "hole", -1, streaming)) == (
                b"".join(_events(0, 2)), "trimmed")
            # Silent while the row says the turn is over (its replica died or lost Redis).
            await client.xadd("silent", {FIRST: 0, COUNT: 1, DATA: b"".join(_events(0, 1))})
            assert await _collect(read_turn(client, "silent", -1, not_streaming, block_ms=50)) == (
                b"".join(_events(0, 1)), "silent")
            # With its end marker: the whole copy and a normal end.
            await client.xadd("whole", {FIRST: 0, COUNT: 3, DATA: b"".join(_events(0, 3))})
            await client.xadd("whole", {END: b"complete"})
            assert await _collect(read_turn(client, "whole", 0, streaming)) == (
                b"".join(_events(1, 2)), None)

            # Written anew from memory: the same ids, in entries of at most 1,000 chunks,
            # replacing whatever copy was there; a follower resumes anywhere in it.
            live = LiveTurn("th", "t", 1, 1)
            live.publish(_events(0, 2500))
            await client.xadd("again", {FIRST: 0, COUNT: 1, DATA: b"stale"})
            writer = StreamWriter(client, "again", maxlen=10_000, ttl_running=60, ttl_done=5,
                                  flush_interval=0.01)
            await writer.rewrite(live)
            assert writer.written == 2499
            assert [int(f[COUNT]) for _, f in await client.xrange("again")] == [1000, 1000, 500]
            live.publish(_events(2500, 10))
            live.finish("complete")
            await writer.run(live)  # the rest after what was rewritten, then the end marker
            assert await _collect(read_turn(client, "again", 1234, streaming)) == (
                b"".join(_events(1235, 2510 - 1235)), None)
        finally:
            await client.aclose()

        # Redis gone under a reader.
        client = redis_asyncio.Redis.from_url(redis.url)
        try:
            body = read_turn(client, "whole", -1, streaming)
            redis.kill()
            assert await _collect(body) == (b"", "redis")
        finally:
            await client.aclose()
