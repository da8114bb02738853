"""``turngate serve`` tunes the garbage collector (``gateway.ops.cli.tune_gc``): a
burst of opened streams runs few young collections and no full one.

Measured on a real ``turngate serve`` process through its ``/metrics``
(``python_gc_collections_total`` by generation), on both databases.
"""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from gateway.ops.cli import GC_THRESHOLDS
from tests.fixtures_server import ServerProcess

pytestmark = pytest.mark.anyio

STREAMS = 200
# Python's defaults (700, 10, 10) ran about 95 young collections for this many opens
# and a full one every few hundred; the tuned young generation, a handful.
MAX_YOUNG = 20


async def _collections(client: httpx.AsyncClient) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("python_gc_collections_total{"):
            generation = line.split('generation="', 1)[1].split('"', 1)[0]
            out[generation] = float(line.rsplit(" ", 1)[1])
    return out


async def _open_and_hold(port: int, key: str, thread: str) -> anyio.abc.SocketStream:
    """A turn whose reply waits (scripted delay), read up to its first chunk and held."""
    body = json.dumps({"turn_id": f"t-{thread}", "text": "hello there",
                       "model": "scripted:tokens=2,delay_ms=60000"}).encode()
    stream = await anyio.connect_tcp("127.0.0.1", port)
    await stream.send(
        f"POST /v1/threads/{thread}/turns HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n".encode() + body
    )
    data = b""
    try:
        while b'"type":"start"' not in data:
            data += await stream.receive()
    except anyio.EndOfStream:
        raise AssertionError(f"the stream ended before its start: {data[:300]!r}") from None
    finally:
        if b'"type":"start"' not in data:
            await stream.aclose()
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return stream


async def test_opening_streams_runs_few_young_and_no_full_collections(
    database_url: str,
) -> None:
    proc = ServerProcess(database_url, TURNGATE_MAX_STREAMS_PER_USER=str(2 * STREAMS),
                         TURNGATE_RATE_LIMIT_PER_MINUTE="100000")
    key = (await proc.cli("keys", "create", "alice")).splitlines()[-1]
    held: list[anyio.abc.SocketStream] = []
    await proc.start()
    try:
        headers = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=proc.url, headers=headers, timeout=30) as client:
            threads = [(await client.post("/v1/threads", json={})).json()["id"]
                       for _ in range(STREAMS)]
            before = await _collections(client)
            assert set(before) == {"0", "1", "2"}, before
            with anyio.fail_after(120):

                async def one(thread: str) -> None:
                    held.append(await _open_and_hold(proc.port, key, thread))

                for start in range(0, STREAMS, 50):
                    async with anyio.create_task_group() as tg:
                        for thread in threads[start:start + 50]:
                            tg.start_soon(one, thread)
            after = await _collections(client)
        assert len(held) == STREAMS
        young = after["0"] - before["0"]
        assert 0 < young <= MAX_YOUNG, (before, after)
        assert after["2"] == before["2"], (before, after)
        assert GC_THRESHOLDS[0] >= 10 * 700  # the young generation is really larger
    finally:
        for s in held:
            await s.aclose()
        await proc.stop()
