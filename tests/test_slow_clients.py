"""Clients that stop reading, and clients that never finish their request head.

Real ``turngate serve`` processes (the guarded httptools protocol is set up by
the CLI), raw sockets on 127.0.0.1, every load bounded in count and time.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import datetime

import anyio
import httpx
import pytest

from tests.fixtures_server import ServerProcess

pytestmark = pytest.mark.anyio

SEND_TIMEOUT = 2.0
HEADER_TIMEOUT = 2.0


@asynccontextmanager
async def server(pg_url: str, **env: str) -> AsyncIterator[tuple[ServerProcess, str]]:
    proc = ServerProcess(pg_url, None, **env)
    key = (await proc.cli("keys", "create", "alice")).splitlines()[-1]
    try:
        await proc.start()
        yield proc, key
    finally:
        await proc.stop()


def _connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        # Before connect, so the advertised window is this small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    return sock


def _turn_request(port: int, key: str, thread: str, turn: str, model: str) -> bytes:
    body = json.dumps({"turn_id": turn, "text": "x", "model": model}).encode()
    return (
        f"POST /v1/threads/{thread}/turns HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _metric(client: httpx.AsyncClient, name: str) -> float:
    total = 0.0
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _ttfb(port: int, key: str, thread: str, turn: str) -> float:
    """Seconds from a turn request written to the first response byte (a fresh connection)."""
    sock = await anyio.to_thread.run_sync(_connect, port)
    try:
        request = _turn_request(port, key, thread, turn, "scripted:tokens=3")
        sent = time.perf_counter()
        sock.sendall(request)
        await anyio.to_thread.run_sync(sock.recv, 1)
        first = time.perf_counter() - sent
        sock.settimeout(10)
        data = b""
        while b"[DONE]" not in data:  # the whole (short) turn, so its thread is free
            chunk = await anyio.to_thread.run_sync(sock.recv, 65536)
            assert chunk, "the normal client's stream ended early"
            data += chunk
        return first
    finally:
        sock.close()


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _ms(xs: list[float]) -> str:
    return f"{min(xs) * 1000:.1f}/{sorted(xs)[len(xs) // 2] * 1000:.1f}"


async def test_non_reading_clients_are_dropped_within_send_timeout(pg_url: str) -> None:
    n = 200
    # The cancel policy: a dropped reader's generation ends at once (under grace it
    # would go on for the grace period after the drop, as for any reader that left).
    env = {"TURNGATE_SEND_TIMEOUT": str(SEND_TIMEOUT), "TURNGATE_ON_DISCONNECT": "cancel",
           "TURNGATE_MAX_STREAMS_PER_USER": "1000",
           "TURNGATE_RATE_LIMIT_PER_MINUTE": "100000", "TURNGATE_DB_POOL_SIZE": "10"}
    async with server(pg_url, **env) as (proc, key), httpx.AsyncClient(
        base_url=proc.url, headers={"authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        threads = [(await client.post("/v1/threads", json={})).json()["id"] for _ in range(n + 20)]
        normal = threads[n:]

        for i in range(2):  # warm up (first connections to the database, imports)
            await _ttfb(proc.port, key, normal[18 + i], "warm")
        # Minimums of 7: the machine is shared and other work only adds to a sample,
        # while a load that the 200 put on the server would raise every sample.
        idle = [await _ttfb(proc.port, key, normal[i], "idle") for i in range(7)]

        # 200 clients with a 1 KiB receive buffer send a long turn and never read.
        stalled: list[socket.socket] = []
        try:
            model = "scripted:tokens=200000,delay_ms=5"
            for i in range(n):
                sock = _connect(proc.port, rcvbuf=1024)
                sock.sendall(_turn_request(proc.port, key, threads[i], "long", model))
                stalled.append(sock)
            sent_all = anyio.current_time()
            with anyio.fail_after(20):
                while await _metric(client, "turngate_generations_started_total") < n:
                    await anyio.sleep(0.05)
            # While the 200 generate into full buffers (informational: 200 live
            # generations are real load until the send timeout tells them apart).
            during = [await _ttfb(proc.port, key, normal[7 + i], "during") for i in range(3)]
            # Bounds the wait only; each turn's own duration is checked below.
            with anyio.fail_after(SEND_TIMEOUT + 20):
                while await _metric(client, "turngate_active_generations") > 0:
                    await anyio.sleep(0.1)
            stopped_after = anyio.current_time() - sent_all
            # The 200 sockets are still open and unread: they cost a normal client nothing now.
            after = [await _ttfb(proc.port, key, normal[10 + i], "after") for i in range(7)]
        finally:
            for sock in stalled:
                sock.close()
        print(f"\nttfb min/median ms: idle {_ms(idle)}, while the 200 generate {_ms(during)}, "
              f"after they were dropped {_ms(after)}; all {n} generations stopped "
              f"{stopped_after:.2f} s after the last request was sent")
        assert min(after) <= 2 * min(idle), (idle, after)
        # Ended under the disconnect policy (cancel): each row finalized, none streaming.
        finalized = await _metric(client, 'turngate_turns_finalized_total{status="cancelled"}')
        assert finalized == n
        # Each generation stopped within the send timeout + 5 s of its own start (the
        # turn's row is written when it opens, and finalized when it stops).
        longest = 0.0
        for thread in threads[:n]:
            reply = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"][-1]
            assert reply["status"] == "cancelled"
            ran = _seconds(reply["updated_at"]) - _seconds(reply["created_at"])
            longest = max(longest, ran)
        print(f"longest generation {longest:.2f} s (send timeout {SEND_TIMEOUT:g} s)")
        assert longest <= SEND_TIMEOUT + 5


def _read_all(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything until the server closes; seconds until the close."""
    sock.settimeout(within)
    start = time.monotonic()
    data = b""
    with suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - start


async def test_slowloris_head_is_cut_at_the_deadline(pg_url: str) -> None:
    env = {"TURNGATE_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}
    async with server(pg_url, **env) as (proc, _key):
        sock = await anyio.to_thread.run_sync(_connect, proc.port)
        head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 60 + b"\r\n\r\n"
        opened = anyio.current_time()
        sent = 0
        with sock:
            # 1 byte per second: the pace of the attack, not a wait for the server.
            while sent < len(head) and anyio.current_time() - opened < HEADER_TIMEOUT + 3:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered (and closes)
                sock.send(head[sent : sent + 1])
                sent += 1
                await anyio.sleep(1.0)
            data, _ = await anyio.to_thread.run_sync(_read_all, sock, 5.0)
        elapsed = anyio.current_time() - opened
        assert data.startswith(b"HTTP/1.1 408 "), data
        assert sent < len(head)  # never got its head in
        assert elapsed < HEADER_TIMEOUT + 3 + 5
        # Silent connections too, and a kept-alive connection's next request.
        quiet = await anyio.to_thread.run_sync(_connect, proc.port)
        with quiet:
            data, waited = await anyio.to_thread.run_sync(_read_all, quiet, HEADER_TIMEOUT + 3)
        assert data.startswith(b"HTTP/1.1 408 ") and waited < HEADER_TIMEOUT + 1.5, (data, waited)
        kept = await anyio.to_thread.run_sync(_connect, proc.port)
        with kept:
            kept.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nho")
            data, waited = await anyio.to_thread.run_sync(_read_all, kept, HEADER_TIMEOUT + 3)
        assert data.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in data, data
        assert waited < HEADER_TIMEOUT + 1.5


async def test_head_size_and_pending_connections_are_bounded(pg_url: str) -> None:
    pending_limit = 20
    env = {"TURNGATE_MAX_PENDING_CONNECTIONS": str(pending_limit),
           "TURNGATE_MAX_HEADER_BYTES": "8192", "TURNGATE_HEADER_TIMEOUT": "30"}
    async with server(pg_url, **env) as (proc, key):
        async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
            huge = {"authorization": "Bearer " + "k" * 20000}
            big = await client.get("/v1/threads", headers=huge)
            assert big.status_code == 431
            many = {f"x-h{i}": "1" for i in range(150)}
            assert (await client.get("/healthz", headers=many)).status_code == 431
            # A large header within the limit, and a usual request, are served.
            ok = await client.get("/v1/threads", headers={
                "authorization": f"Bearer {key}", "x-pad": "p" * 6000})
            assert ok.status_code == 200

        # One more silent connection than the limit: the oldest is closed with 503.
        silent = [await anyio.to_thread.run_sync(_connect, proc.port)
                  for _ in range(pending_limit + 1)]
        try:
            data, waited = await anyio.to_thread.run_sync(_read_all, silent[0], 5.0)
            assert data.startswith(b"HTTP/1.1 503 ") and waited < 5.0, data
            async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
                # A client that sends its head at once evicts a silent one, not itself.
                assert (await client.get("/healthz")).status_code == 200
        finally:
            for sock in silent:
                sock.close()
