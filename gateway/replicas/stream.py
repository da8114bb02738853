"""One turn as a Redis stream: the entry format, the writer and the reader.

A turn's stream (key ``<prefix>:turn:<thread_id>:<turn_id>``) holds one entry
per published batch: ``f`` (SSE id of the first chunk), ``n`` (how many chunks)
and ``d`` (the chunks, already SSE-encoded, concatenated). The last entry is
the end marker ``end`` (the final status). Redis entry ids keep the order; the
SSE ids in ``f``/``n`` are what ``Last-Event-ID`` is matched against.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio

from gateway.streaming.relay import LiveTurn

logger = logging.getLogger("turngate.redis")

# Fields of a stream entry.
FIRST, COUNT, DATA, END = b"f", b"n", b"d", b"end"
# Chunks per entry when a whole turn is written anew (``StreamWriter.rewrite``).
REWRITE_CHUNKS = 1000


class RelayLost(Exception):
    """A follower's copy of the turn stopped before its end marker.

    Redis failed, the copy has a hole (trimmed), or the turn is no longer
    streaming while its copy stays silent (its replica died or lost Redis).
    The follower is told to resume; the resume finds the rest wherever it is.
    """


def cut(data: bytes, seq: int) -> bytes:
    """``data`` (concatenated SSE events) from the event with id ``seq`` on.

    Every event starts with ``id: <seq>\\n`` at the start of ``data`` or right
    after the blank line ending the previous one (JSON never holds a raw
    newline), so the boundary is found without parsing.
    """
    head = b"id: %d\n" % seq
    if data.startswith(head):
        return data
    pos = data.find(b"\n\n" + head)
    return data[pos + 2 :] if pos >= 0 else b""


class StreamWriter:
    """Mirrors one ``LiveTurn`` into its Redis stream, a few XADDs per second at most.

    Chunks published while an XADD is in flight, or during the short pause
    after it (``flush_interval``), go out together in the next one, so the hot
    path (``LiveTurn.publish``) never waits for Redis and a fast stream costs
    one round trip per ``flush_interval``, not one per token.
    """

    def __init__(
        self, client: Any, key: str, *, maxlen: int, ttl_running: int, ttl_done: int,
        flush_interval: float,
    ) -> None:
        self.client = client
        self.key = key
        self.maxlen = maxlen
        self.ttl_running = ttl_running
        self.ttl_done = ttl_done
        self.flush_interval = flush_interval
        self.written = -1  # SSE id of the last chunk written

    async def _xadd(self, fields: dict[bytes, Any], ttl: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
        pipe.expire(self.key, ttl)
        await pipe.execute()

    async def write_batch(self, first: int, chunks: list[bytes]) -> None:
        await self._xadd(
            {FIRST: first, COUNT: len(chunks), DATA: b"".join(chunks)}, self.ttl_running
        )
        self.written = first + len(chunks) - 1

    async def rewrite(self, live: LiveTurn) -> None:
        """Replace the stream by every chunk ``live`` has so far, in one transaction.

        After Redis came back (restarted empty, or holding a copy that stopped
        when the writes failed): the same SSE ids as before, from the same
        memory, so a follower's ``Last-Event-ID`` still means the same event. In
        one MULTI so that a reader never sees a partial copy.
        """
        events, base = live.events[:], live.first_id  # from the oldest chunk kept
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.key)
        for first in range(0, len(events), REWRITE_CHUNKS):
            batch = events[first : first + REWRITE_CHUNKS]
            pipe.xadd(self.key, {FIRST: base + first, COUNT: len(batch), DATA: b"".join(batch)},
                      maxlen=self.maxlen, approximate=True)
        pipe.expire(self.key, self.ttl_running)
        await pipe.execute()
        self.written = base + len(events) - 1

    async def run(self, live: LiveTurn) -> None:
        """Write every batch of ``live`` after ``written``, then the end marker.

        Raises on Redis errors.
        """
        try:
            async for first, chunks in live.batches(self.written):
                await self.write_batch(first, chunks)
                await anyio.sleep(self.flush_interval)
        finally:
            # At shutdown the task group is cancelled right after the drain: the
            # last chunks and the end marker still go out (briefly, shielded).
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                first = max(self.written + 1, live.first_id)
                rest = live.since(first)
                if rest:
                    await self.write_batch(first, rest)
                if live.done:
                    await self._xadd({END: live.status or "interrupted"}, self.ttl_done)


async def first_entry(
    client: Any, key: str, wait: float
) -> tuple[bytes, dict[bytes, bytes]] | None:
    """The oldest entry of ``key``, waiting up to ``wait`` seconds for one to appear."""
    entries = await client.xrange(key, "-", "+", count=1)
    if not entries and wait > 0:
        found = await client.xread({key: b"0-0"}, count=1, block=max(1, int(wait * 1000)))
        entries = found[0][1] if found else []
    if not entries:
        return None
    entry_id, fields = entries[0]
    return entry_id, fields


async def read_turn(
    client: Any,
    key: str,
    after: int,
    still_streaming: Callable[[], Awaitable[bool]],
    *,
    block_ms: int = 1000,
) -> AsyncIterator[bytes]:
    """Every chunk of the turn after SSE id ``after``, then live ones, up to the end marker.

    A stream that stays silent for ``block_ms`` while the database says the turn
    is no longer streaming (its replica died, or lost Redis), a gap (trimmed
    entries) and a Redis failure raise ``RelayLost`` after the chunks delivered
    so far: the follower is told to resume (the rest comes from the relay once
    it is back, or from the stored row).
    """
    last_id = b"0-0"
    delivered = after
    while True:
        try:
            found = await client.xread({key: last_id}, count=512, block=block_ms)
        except Exception as exc:
            logger.warning("redis_read_failed key=%s error=%s", key, type(exc).__name__,
                           extra={"event": "redis_read_failed", "error": type(exc).__name__})
            raise RelayLost("redis") from None
        if not found:
            if not await still_streaming():
                raise RelayLost("silent")
            continue
        out: list[bytes] = []
        ended = hole = False
        for entry_id, fields in found[0][1]:
            last_id = entry_id
            if END in fields:
                ended = True
                break
            first = int(fields[FIRST])
            last = first + int(fields[COUNT]) - 1
            if last <= delivered:
                continue
            if first > delivered + 1:  # trimmed away: cannot continue without a hole
                hole = True
                break
            data = fields[DATA]
            out.append(data if first == delivered + 1 else cut(data, delivered + 1))
            delivered = last
        if out:
            yield out[0] if len(out) == 1 else b"".join(out)
        if hole:
            raise RelayLost("trimmed")
        if ended:
            return


__all__ = ["RelayLost", "StreamWriter", "cut", "first_entry", "read_turn"]
