"""The end of a turn on the happy path: last ``text-delta`` → ``[DONE]``, and round trips.

The final write is durable (retried until it lands, ``finish`` only after
it). On the happy path that must add no database round trip and no
latency beyond the finalize write itself. This measures both on one
``turngate serve`` whose ``DATABASE_URL`` goes through the counting proxy
(checkpoint interval 60 s, so periodic upkeep stays out of the window):
N sequential 5-token turns, each on a fresh thread.

    TURNGATE_BENCH_DB=turngate_bench_tail .venv/bin/python bench/finalize_tail.py --turns 300

Prints the tail (ms from the last text-delta's bytes to the ``[DONE]`` bytes:
median, p90) and database round trips per turn (median, min, max).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_DB,
    Db,
    RoundTripProxy,
    bench_db_url,
    median,
    migrate_and_key,
    pct,
    reset_database,
    start_server,
)

_DELTA = b'"type":"text-delta"'
_DONE = b"data: [DONE]"


async def _turn(port: int, thread_id: str, key: str) -> tuple[float, float] | None:
    """(t_last_delta, t_done) of one 5-token turn, or None if it did not end in [DONE]."""
    body = json.dumps({"turn_id": uuid.uuid4().hex, "text": "hi",
                       "model": "scripted:tokens=5"}).encode()
    req = (b"POST /v1/threads/%s/turns HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
           % (thread_id.encode(), key.encode(), len(body), body))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    last_delta = None
    buf = b""
    try:
        writer.write(req)
        async with asyncio.timeout(30):
            while data := await reader.read(65536):
                now = time.perf_counter()
                buf += data
                if _DELTA in data:
                    last_delta = now
                if _DONE in buf:
                    return (last_delta or now, now)
    finally:
        writer.transport.abort()
    return None


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=300)
    args = parser.parse_args()
    await reset_database(BENCH_DB)
    key = migrate_and_key(BENCH_DB)
    proxy = RoundTripProxy()
    await proxy.start()
    db = Db(BENCH_DB)
    await db.connect()
    logdir = Path(tempfile.mkdtemp(prefix="finalize-tail-"))
    url = bench_db_url(port=proxy.port, db=BENCH_DB)
    # In a thread: it waits for /healthz with blocking sleeps, and the server's
    # start-up needs this loop's proxy.
    server = await asyncio.to_thread(
        start_server, "turngate", logdir, url, TURNGATE_CHECKPOINT_SECONDS="60",
        TURNGATE_LEASE_SECONDS="120")
    try:
        threads = await db.make_threads(args.turns + 20)
        for t in threads[:20]:  # warm-up: pool connections, prepared statements
            await _turn(server.port, t, key)
        tails, trips = [], []
        for t in threads[20:]:
            before = proxy.round_trips
            got = await _turn(server.port, t, key)
            if got is not None:
                tails.append((got[1] - got[0]) * 1000)
            trips.append(proxy.round_trips - before)
        print(f"turns={len(tails)} tail_ms median={median(tails):.3f} "
              f"p90={pct(tails, 0.9):.3f} round_trips_per_turn median={median(trips)} "
              f"min={min(trips)} max={max(trips)}")
    finally:
        server.stop()
        await db.close()
        await proxy.close()


if __name__ == "__main__":
    asyncio.run(main())
