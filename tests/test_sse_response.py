"""The turn stream's ASGI response (gateway/streaming/sse.py).

Over a real uvicorn server (streaming, stalls and disconnects cannot be seen
through httpx.ASGITransport): pings on an idle stream, a reader that stops
reading is dropped after the send timeout, a departed client cancels an idle
generation within 1 s, and two tasks per open stream. Then the response alone,
called with a hand-made ``receive``/``send``: shutdown cut, HEAD, closing the
body, and the bounds of the app's stream timer (pings, stalled readers). The
response does not touch the database, so the server tests run on SQLite only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator

import anyio
import pytest

from gateway.streaming.relay import LiveTurn
from gateway.streaming.responses import STREAM_HEADERS
from gateway.streaming.sse import SSEResponse, StreamSet, encode_headers
from tests.fixtures_server import GatewayServer, run_gateway
from tests.tracing import trace_turns
from tests.waiting import until

pytestmark = pytest.mark.anyio
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _request(gw: GatewayServer, thread: str, model: str) -> tuple[bytes, str]:
    turn_id = uuid.uuid4().hex
    body = json.dumps({"turn_id": turn_id, "text": "hi", "model": model}).encode()
    head = (
        f"POST /v1/threads/{thread}/turns HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"authorization: Bearer {gw.key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body, turn_id


async def _open_stream(gw: GatewayServer, model: str) -> tuple[asyncio.StreamWriter, str, str]:
    """A raw connection with a turn streaming on it, read up to its first event."""
    async with gw.client() as client:
        thread = await gw.new_thread(client)
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request, turn_id = _request(gw, thread, model)
    writer.write(request)
    with anyio.fail_after(10):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await reader.readuntil(b"\n\n")  # the first event (start)
    return writer, thread, turn_id


async def _wait_live_done(gw: GatewayServer, thread: str, turn_id: str, within: float) -> LiveTurn:
    # Keep the turn once seen: a turn cancelled by its reader's departure leaves the
    # relay as it ends (its stored row, not the relay's copy, is what resumes see).
    seen: LiveTurn | None = None
    with anyio.fail_after(within):
        while seen is None or not seen.done:
            seen = gw.ctx.relay.get(thread, turn_id) or seen
            await anyio.sleep(0.01)
    return seen


@sqlite_only
async def test_idle_stream_gets_ping_comments(database_url: str) -> None:
    async with run_gateway(database_url, TURNGATE_PING_SECONDS="0.2") as gw, gw.client() as client:
        thread = await gw.new_thread(client)
        body = {"turn_id": "t1", "text": "hi", "model": "scripted:tokens=3,delay_ms=1000"}
        lines: list[str] = []
        stamps: list[float] = []
        async with client.stream("POST", f"/v1/threads/{thread}/turns", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-vercel-ai-ui-message-stream"] == "v1"
            assert r.headers["cache-control"] == "no-cache"
            async for line in r.aiter_lines():
                lines.append(line)
                stamps.append(time.monotonic())
    pings = [i for i, line in enumerate(lines) if line.startswith(":")]
    assert {lines[i] for i in pings} == {": ping"}
    # Pauses of 1 s around the deltas, a ping after every 0.2 s of silence in each.
    assert 12 <= len(pings) <= 25, len(pings)
    for i in pings:  # only after silence: never right after another write
        assert stamps[i] - stamps[i - 2] > 0.15, (i, stamps[i] - stamps[i - 2])
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert [json.loads(d[6:])["type"] for d in data[:-1]].count("text-delta") == 3


@sqlite_only
async def test_reader_that_stops_reading_is_dropped(database_url: str) -> None:
    send_timeout = 0.5
    async with run_gateway(database_url, TURNGATE_SEND_TIMEOUT=str(send_timeout),
                           TURNGATE_ON_DISCONNECT="cancel") as gw:
        async with gw.client() as client:
            thread = await gw.new_thread(client)
        request, turn_id = _request(gw, thread, "scripted:tokens=1000000,delay_ms=0")
        port = int(gw.url.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)  # and never read: the server's buffers fill up
            started = time.monotonic()
            live = await _wait_live_done(gw, thread, turn_id, within=20)
            elapsed = time.monotonic() - started
            assert live.status == "cancelled"  # dropped like a departed reader
            assert live.subscribers == 0
            assert len(live.events) < 500_000, "the stream was not stalled"
            # Within the send timeout of the stall (plus the time to fill the
            # buffers), not at the next ping (15 s here).
            assert elapsed < send_timeout + 4, elapsed
            print(f"dropped {elapsed:.2f}s after the request, {len(live.events)} chunks")
            # The server closed the connection: reading what was buffered ends in EOF.
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            with anyio.fail_after(5):
                while await loop.sock_recv(sock, 1 << 20):
                    pass
        finally:
            sock.close()


@sqlite_only
async def test_disconnect_cancels_an_idle_generation_within_1s(database_url: str) -> None:
    async with run_gateway(database_url, TURNGATE_ON_DISCONNECT="cancel") as gw:
        traces = trace_turns(gw)
        trace = uuid.uuid4().hex
        writer, thread, turn_id = await _open_stream(
            gw, f"scripted:tokens=3,delay_ms=5000,trace={trace}"
        )
        # The condition under test, not a wait: the client leaves 0.3 s into the
        # adapter's 5 s pause, while no bytes flow.
        await anyio.sleep(0.3)
        assert gw.ctx.relay.get(thread, turn_id) is not None
        writer.close()
        left = time.monotonic()
        live = await _wait_live_done(gw, thread, turn_id, within=1.0)
        assert time.monotonic() - left < 1.0
        assert live.status == "cancelled"
        assert traces[trace].closed and not traces[trace].finished


def _open_streams(gw: GatewayServer) -> float:
    value = gw.ctx.metrics.registry.get_sample_value("turngate_active_streams")
    return value or 0.0


@sqlite_only
async def test_two_tasks_per_open_stream(database_url: str) -> None:
    """An open turn stream costs two tasks: the request's own and its watcher. Its
    generation is one more, the turn's (owned by the app's task group), counted apart."""
    streams = 20
    writers: list[asyncio.StreamWriter] = []
    async with run_gateway(database_url, TURNGATE_MAX_STREAMS_PER_USER="100",
                           TURNGATE_RATE_LIMIT_PER_MINUTE="10000") as gw:
        try:
            warm, _, _ = await _open_stream(gw, "scripted:tokens=1")
            warm.close()
            await warm.wait_closed()
            with anyio.fail_after(5):  # the warm-up turn and its response are over
                while gw.ctx.relay.running() or _open_streams(gw) > 0:
                    await anyio.sleep(0.01)
            before = set(asyncio.all_tasks())
            for _ in range(streams):
                # Each is open and generating: its first event was read.
                writers.append((await _open_stream(gw, "scripted:tokens=1,delay_ms=60000"))[0])
            assert _open_streams(gw) == streams and len(gw.ctx.relay.running()) == streams
            new = asyncio.all_tasks() - before
        finally:
            for w in writers:
                w.close()
    generations = [t for t in new if t.get_name().endswith("TurnRunner._generate")]
    per_stream = [t.get_name() for t in new if t not in generations]
    print(f"{len(per_stream) / streams:.2f} tasks per open stream, plus its generation")
    assert len(generations) == streams
    assert len(per_stream) == 2 * streams, sorted(per_stream)


# -- the response alone ---------------------------------------------------------------


class _Asgi:
    """A hand-made ASGI peer: records what is sent; ``receive`` waits for ``leave``."""

    def __init__(self) -> None:
        self.sent: list[dict[str, object]] = []
        self.leave = anyio.Event()

    async def receive(self) -> dict[str, object]:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, object]) -> None:
        self.sent.append(message)


class _Body:
    """An endless body that records whether its ``finally`` ran."""

    def __init__(self) -> None:
        self.closed = False
        self.started = False

    async def gen(self) -> AsyncIterator[bytes]:
        self.started = True
        try:
            yield b"id: 0\ndata: {}\n\n"
            await anyio.sleep_forever()
            yield b"never"
        finally:
            self.closed = True


SCOPE = {"type": "http", "method": "POST"}


async def test_cut_ends_the_stream_cleanly() -> None:
    peer, body, streams = _Asgi(), _Body(), StreamSet()
    response = SSEResponse(body.gen(), ping_seconds=60, send_timeout=1, streams=streams)
    async with anyio.create_task_group() as tg:
        tg.start_soon(response, SCOPE, peer.receive, peer.send)
        with anyio.fail_after(2):
            while len(streams) == 0 or len(peer.sent) < 2:
                await anyio.sleep(0.01)
        assert streams.cut_all() == 1
    assert body.closed and response.outcome == "cut"
    assert peer.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert len(streams) == 0
    # A stream opened after the cut ends at once.
    late = _Body()
    with anyio.fail_after(2):
        await SSEResponse(late.gen(), streams=streams)(SCOPE, peer.receive, peer.send)
    assert late.closed


async def test_disconnect_closes_the_body_and_sends_no_end() -> None:
    peer, body = _Asgi(), _Body()
    response = SSEResponse(body.gen(), ping_seconds=60, send_timeout=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(response, SCOPE, peer.receive, peer.send)
        # The client leaves once the head and the first event are out.
        await until(lambda: len(peer.sent) >= 2, within=2, what="the first event sent",
                    shown=lambda: peer.sent)
        peer.leave.set()
    assert body.closed and response.outcome == "disconnect"
    assert all(m.get("more_body", True) for m in peer.sent)


async def test_head_sends_headers_only() -> None:
    peer, body = _Asgi(), _Body()
    response = SSEResponse(body.gen())
    with anyio.fail_after(2):
        await response({"type": "http", "method": "HEAD"}, peer.receive, peer.send)
    assert [m["type"] for m in peer.sent] == ["http.response.start", "http.response.body"]
    assert peer.sent[-1]["more_body"] is False
    assert not body.started


async def test_the_watcher_ends_with_the_stream() -> None:
    """The watcher is the response's own task: when the body ends, its wait is
    interrupted, and the response returns at once with no task left behind."""
    peer = _Asgi()

    async def one_chunk() -> AsyncIterator[bytes]:
        yield b"id: 0\ndata: {}\n\n"

    before = set(asyncio.all_tasks())
    response = SSEResponse(one_chunk(), ping_seconds=60, send_timeout=10)
    with anyio.fail_after(2):
        await response(SCOPE, peer.receive, peer.send)
    assert response.outcome == "complete" and peer.sent[-1]["more_body"] is False
    assert set(asyncio.all_tasks()) - before == set()


async def test_a_failing_watcher_ends_the_stream_with_its_error() -> None:
    """A watcher that fails (here its ``receive``) stops the pump, the body is closed,
    and the failure comes out of the response."""

    class _BrokenPeer(_Asgi):
        async def receive(self) -> dict[str, object]:
            raise RuntimeError("receive failed")

    peer, body = _BrokenPeer(), _Body()
    response = SSEResponse(body.gen(), ping_seconds=60, send_timeout=10)
    with anyio.fail_after(2), pytest.raises(RuntimeError, match="receive failed"):
        await response(SCOPE, peer.receive, peer.send)
    assert body.closed


# -- the app's stream timer (StreamSet.run) -------------------------------------------


class _TimedPeer(_Asgi):
    """Records when each message was sent and how often ``receive`` was called; a
    ``send`` of the ``block_at``-th message never completes (a reader that stopped)."""

    def __init__(self, block_at: int | None = None) -> None:
        super().__init__()
        self.stamps: list[float] = []
        self.receives = 0
        self.block_at = block_at
        self.blocked_at: float | None = None

    async def receive(self) -> dict[str, object]:
        self.receives += 1
        return await super().receive()

    async def send(self, message: dict[str, object]) -> None:
        if self.block_at is not None and len(self.sent) + 1 == self.block_at:
            self.blocked_at = time.monotonic()
            await anyio.sleep_forever()
        self.stamps.append(time.monotonic())
        await super().send(message)


def _pings(peer: _TimedPeer) -> list[int]:
    return [i for i, m in enumerate(peer.sent) if m.get("body") == b": ping\n\n"]


# Scheduling slack on a shared 2-core machine, on top of the documented bound.
SLACK = 0.15


@pytest.mark.parametrize("app_timer", [True, False], ids=["app-timer", "own-timers"])
async def test_pings_follow_silence_within_one_tick(app_timer: bool) -> None:
    """A ping goes out between ping_seconds and ping_seconds + tick after the last write;
    with the app's timer the watcher is woken only to ping (never every send timeout)."""
    ping, send_timeout = 0.3, 0.1  # the old watcher woke every 0.1 s; the tick is 0.01 s
    streams = StreamSet(ping, send_timeout)
    tick = streams.tick
    assert tick == pytest.approx(0.01)
    peer, body = _TimedPeer(), _Body()
    response = SSEResponse(body.gen(), ping_seconds=ping, send_timeout=send_timeout,
                           streams=streams)
    async with anyio.create_task_group() as tg:
        if app_timer:
            tg.start_soon(streams.run)
        tg.start_soon(response, SCOPE, peer.receive, peer.send)
        await until(lambda: len(_pings(peer)) >= 4, within=5, what="four pings",
                    shown=lambda: peer.sent)
        peer.leave.set()
        await until(lambda: response.outcome != "open", within=2, what="the stream ended")
        tg.cancel_scope.cancel()
    pings = _pings(peer)
    for i in pings:
        silence = peer.stamps[i] - peer.stamps[i - 1]
        assert ping <= silence <= ping + tick + SLACK, (i, silence)
    if app_timer:
        # One wait for the stream, then one more after each ping: nothing periodic.
        assert peer.receives <= len(pings) + 2, (peer.receives, len(pings))


async def test_the_app_timer_drops_a_stalled_reader_within_one_tick() -> None:
    ping, send_timeout = 60.0, 0.3
    streams = StreamSet(ping, send_timeout)
    peer = _TimedPeer(block_at=3)  # the head and the first chunk go; the second never does

    async def two_chunks() -> AsyncIterator[bytes]:
        yield b"id: 0\ndata: {}\n\n"
        yield b"id: 1\ndata: {}\n\n"
        await anyio.sleep_forever()

    response = SSEResponse(two_chunks(), ping_seconds=ping, send_timeout=send_timeout,
                           streams=streams)
    async with anyio.create_task_group() as tg:
        tg.start_soon(streams.run)
        with anyio.fail_after(5):
            await response(SCOPE, peer.receive, peer.send)
        ended = time.monotonic()
        tg.cancel_scope.cancel()
    assert response.outcome == "send_timeout"
    assert peer.blocked_at is not None
    waited = ended - peer.blocked_at
    assert send_timeout <= waited <= send_timeout + streams.tick + SLACK, waited
    assert len(streams) == 0


async def test_watchers_take_their_timers_back_when_the_app_timer_stops() -> None:
    ping = 0.2
    streams = StreamSet(ping, 10.0)
    peer, body = _TimedPeer(), _Body()
    response = SSEResponse(body.gen(), ping_seconds=ping, send_timeout=10.0, streams=streams)
    timer = anyio.CancelScope()

    async def run_timer() -> None:
        with timer:
            await streams.run()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_timer)
        await until(lambda: streams.running, within=2, what="the timer running")
        tg.start_soon(response, SCOPE, peer.receive, peer.send)
        # The watcher waits on the app's timer (no deadline of its own) ...
        await until(lambda: len(peer.sent) >= 2 and response._wake is not None, within=2,
                    what="the watcher waiting on the app's timer")
        timer.cancel()
        await until(lambda: not streams.running, within=2, what="the timer stopped")
        pinged = len(_pings(peer))
        # ... and pings on its own once that timer is gone.
        await until(lambda: len(_pings(peer)) >= pinged + 2, within=3,
                    what="pings without the timer", shown=lambda: peer.sent)
        peer.leave.set()
    for i in _pings(peer):
        assert ping <= peer.stamps[i] - peer.stamps[i - 1] <= ping + SLACK


def test_encoded_headers_are_starlettes_and_shared_by_every_stream() -> None:
    raw = encode_headers(STREAM_HEADERS)
    one, two = (SSEResponse(_Body().gen(), headers=raw) for _ in range(2))
    assert one.raw_headers == SSEResponse(_Body().gen(), headers=STREAM_HEADERS).raw_headers
    # Each stream has its own list (middleware may add to it), of the same pairs.
    assert one.raw_headers is not two.raw_headers
    assert all(a is b for a, b in zip(one.raw_headers, two.raw_headers, strict=True))
