"""One turn as a Redis stream: the entry format, the writer and the reader.

A turn's stream (key ``<prefix>:turn:<thread_id>:<turn_id>``) holds one entry
per published batch: ``f`` (SSE id of the first chunk), ``n`` (how many chunks)
and ``d`` (the chunks, already SSE-encoded, concatenated). The last entry is
the end marker ``end`` (the final status). Redis entry ids keep the order; the
SSE ids in ``f``/``n`` are what ``Last-Event-ID`` is matched against.

One writer at a time owns a turn's stream: its token is in ``<key>:writer``, and every
write checks it in the same script (``_APPEND``, ``_REWRITE``). A paused turn and its
continuation are two writers of one key, the continuation's replacing the paused
copy; the paused one's last batch and end marker go out in its writer's ``finally``,
which can run after the replacement (a loaded event loop, or another replica), and
without the check they would land in the continuation's stream and end its followers
there. A writer that finds another owner stops writing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio

from gateway.streaming.relay import LiveTurn

logger = logging.getLogger("turngate.redis")

# Fields of a stream entry.
FIRST, COUNT, DATA, END = b"f", b"n", b"d", b"end"
# Chunks per entry when a whole turn is written anew (``StreamWriter.rewrite``).
REWRITE_CHUNKS = 1000

# KEYS: the stream, its owner key. ARGV: the writer's token, "1" to take the stream
# over whoever owns it, MAXLEN, TTL, then the entry's fields and values. 0 if another
# writer owns the stream (nothing written), else 1.
_APPEND = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] and ARGV[2] ~= '1' then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[4])
return 1
"""
# The same, replacing the stream by entries given as (f, n, d) triples after the TTL.
_REWRITE = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] and ARGV[2] ~= '1' then return 0 end
redis.call('DEL', KEYS[1])
for i = 5, #ARGV, 3 do
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*',
        'f', ARGV[i], 'n', ARGV[i + 1], 'd', ARGV[i + 2])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[4])
return 1
"""


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

    Its first write takes the stream over (a new turn, or a regenerated reply
    after the one it replaces); after that it writes only while it owns it.
    ``superseded``: another writer took the stream (a continuation of the turn).
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
        self.token = uuid.uuid4().hex
        self.owner_key = f"{key}:writer"
        self.superseded = False
        self._take_over = True  # the first write takes the stream over
        self._append = client.register_script(_APPEND)
        self._rewrite = client.register_script(_REWRITE)

    async def _xadd(self, fields: dict[bytes, Any], ttl: int) -> bool:
        """One entry, if this writer owns the stream (or takes it over); False if not."""
        args: list[Any] = [self.token, int(self._take_over), self.maxlen, ttl]
        for name, value in fields.items():
            args += [name, value]
        if not await self._append(keys=[self.key, self.owner_key], args=args):
            self.superseded = True
            return False
        self._take_over = False
        return True

    async def write_batch(self, first: int, chunks: list[bytes]) -> bool:
        """The chunks from SSE id ``first``; False if another writer owns the stream."""
        if self.superseded or not await self._xadd(
            {FIRST: first, COUNT: len(chunks), DATA: b"".join(chunks)}, self.ttl_running
        ):
            return False
        self.written = first + len(chunks) - 1
        return True

    async def rewrite(self, live: LiveTurn, *, take_over: bool = False) -> bool:
        """Replace the stream by every chunk ``live`` has so far, in one script.

        After Redis came back (restarted empty, or holding a copy that stopped
        when the writes failed): the same SSE ids as before, from the same
        memory, so a follower's ``Last-Event-ID`` still means the same event.
        Atomic, so that a reader never sees a partial copy. ``take_over``: a
        continuation replacing the paused turn's copy, whoever wrote it; else
        only a stream this writer owns (or nobody does: Redis restarted empty)
        is replaced. False, writing nothing, if another writer owns it.
        """
        if self.superseded:
            return False
        events, base = live.events[:], live.first_id  # from the oldest chunk kept
        args: list[Any] = [self.token, int(take_over or self._take_over), self.maxlen,
                           self.ttl_running]
        for first in range(0, len(events), REWRITE_CHUNKS):
            batch = events[first : first + REWRITE_CHUNKS]
            args += [base + first, len(batch), b"".join(batch)]
        if not await self._rewrite(keys=[self.key, self.owner_key], args=args):
            self.superseded = True
            return False
        self._take_over = False
        self.written = base + len(events) - 1
        return True

    async def run(self, live: LiveTurn) -> None:
        """Write every batch of ``live`` after ``written``, then the end marker; stop
        early, quietly, once another writer owns the stream.

        Raises on Redis errors.
        """
        try:
            async for first, chunks in live.batches(self.written):
                if not await self.write_batch(first, chunks):
                    return
                await anyio.sleep(self.flush_interval)
        finally:
            # At shutdown the task group is cancelled right after the drain: the
            # last chunks and the end marker still go out (briefly, shielded).
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                first = max(self.written + 1, live.first_id)
                rest = live.since(first)
                if (not rest or await self.write_batch(first, rest)) and live.done \
                        and not self.superseded:
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
