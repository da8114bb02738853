"""The relay between replicas, on Redis (used only when ``REDIS_URL`` is set).

- Each turn generated here is mirrored into a Redis stream by a writer task
  (see ``gateway.replicas.stream``), so any replica can attach to it or resume
  it from ``Last-Event-ID``: XREAD from the start, then blocking XREAD, until
  the end marker. Streams are trimmed (MAXLEN) and expire after the turn.
- Cancel from any replica: a message on the pub/sub channel
  ``<prefix>:cancel``; one listener task per process cancels the turn if it
  generates it here.
- Health: a ping every second. While Redis does not answer, ``available`` is
  False and new turns are refused (503); running turns go on and finalize in
  the database as always. Followers of a turn through Redis are told to resume
  (``RelayLost``); once Redis answers again, each running turn's writer copies
  it anew from memory, so those resumes find it.

Which replica generates a turn is not decided here: the database's partial
unique index lets exactly one ``open_turn`` create the assistant row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio

from gateway.ops.settings import Settings
from gateway.replicas.stream import END, FIRST, StreamWriter, first_entry, read_turn
from gateway.streaming.relay import LiveTurn, LocalRelay
from turngate.exceptions import RelayError

logger = logging.getLogger("turngate.redis")

CONNECT_TIMEOUT = 2.0
HEALTH_INTERVAL = 1.0


class RedisRelay:
    """Live turns shared between replicas through Redis Streams and pub/sub."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "turngate",
        maxlen: int = 10_000,
        retention_seconds: float = 60.0,
        running_ttl_seconds: float = 600.0,
        flush_interval: float = 0.01,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.maxlen = maxlen
        self.ttl_done = max(5, int(retention_seconds))
        self.ttl_running = max(60, int(running_ttl_seconds))
        self.flush_interval = flush_interval
        self.cancel_channel = f"{prefix}:cancel"
        self._client: Any = None
        self._available = False
        self._back: anyio.Event | None = None  # set when Redis answers again

    # -- lifecycle --------------------------------------------------------

    async def connect(self) -> None:
        """Connect and ping; ``RelayError`` with a clear message if Redis does not answer."""
        import redis.asyncio as redis_asyncio

        self._client = redis_asyncio.Redis.from_url(
            self.url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=5.0,
            decode_responses=False,
        )
        try:
            with anyio.fail_after(CONNECT_TIMEOUT + 1):
                await self._client.ping()
        except Exception as exc:
            await self.aclose()
            raise RelayError(
                f"REDIS_URL={_redacted(self.url)}: Redis does not answer "
                f"({type(exc).__name__}). Start Redis, fix REDIS_URL, or unset it to "
                "run a single process."
            ) from None
        self._available = True

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await client.aclose()

    @property
    def client(self) -> Any:
        """The connected ``redis.asyncio.Redis`` client (shared with ``SharedLimits``)."""
        return self._client

    async def ping(self) -> None:
        """One PING on the relay's own client; raises if Redis does not answer."""
        await self._client.ping()

    @property
    def available(self) -> bool:
        return self._available and self._client is not None

    def key(self, thread_id: str, turn_id: str) -> str:
        return f"{self.prefix}:turn:{thread_id}:{turn_id}"

    def _lost(self, what: str, exc: BaseException) -> None:
        """Log a Redis failure and mark Redis unavailable.

        The first failure after Redis answered is an error line; later ones, while
        it is known to be away, go to debug, so an outage is one line, not one per
        ping, reader and request.
        """
        fields = {"during": what, "error": type(exc).__name__}
        if self._available:
            logger.error("redis_unavailable during=%s error=%s", what, type(exc).__name__,
                         extra={"event": "redis_unavailable", **fields})
        else:
            logger.debug("redis_still_unavailable during=%s error=%s", what,
                         type(exc).__name__, extra={"event": "redis_still_unavailable", **fields})
        self._available = False

    # -- this replica's turns ---------------------------------------------

    async def mirror(self, live: LiveTurn, *, replace: bool = False) -> None:
        """Copy ``live`` to its stream until it ends, again after each Redis failure.

        ``replace``: the key holds an earlier stream of the same turn (a paused turn
        continuing, whose ids start again at 0): it is replaced, not appended to,
        and the earlier stream's writer, if it is still finishing, writes no more
        there (``StreamWriter``: one owner per stream).

        A failure never touches the generation. While the turn runs, its copy is
        written anew once Redis answers again (``StreamWriter.rewrite``: same
        SSE ids, from memory), so followers that were told to resume can. A turn
        that ended meanwhile is left to its stored row, which resumes replay.
        """
        writer = StreamWriter(
            self._client, self.key(live.thread_id, live.turn_id), maxlen=self.maxlen,
            ttl_running=self.ttl_running, ttl_done=self.ttl_done,
            flush_interval=self.flush_interval,
        )
        again = False
        while True:
            try:
                if replace and not again:
                    await writer.rewrite(live, take_over=True)
                elif again and await writer.rewrite(live):
                    logger.info("relay_resumed turn_id=%s events=%d", live.turn_id,
                                writer.written + 1,
                                extra={"event": "relay_resumed", "turn_id": live.turn_id,
                                       "events": writer.written + 1})
                if not writer.superseded:
                    await writer.run(live)
                if writer.superseded:
                    logger.info("relay_superseded turn_id=%s", live.turn_id,
                                extra={"event": "relay_superseded", "turn_id": live.turn_id})
                return
            except Exception as exc:
                self._lost("mirror", exc)
            if not await self._wait_back(live):
                return
            again = True

    async def _wait_back(self, live: LiveTurn) -> bool:
        """Wait until Redis answers again (True), or until ``live`` has ended (False)."""
        while not live.done:
            if self.available:
                return True
            if self._back is None:
                self._back = anyio.Event()
            # The health task sets the event; the timeout only looks at live.done,
            # which has no event of its own to wait on.
            with anyio.move_on_after(HEALTH_INTERVAL):
                await self._back.wait()
        return False

    async def run(self, relay: LocalRelay) -> None:
        """Health pings and the cancel listener, for the life of the app."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._health)
            tg.start_soon(self._listen_cancels, relay)

    async def _health(self) -> None:
        while True:
            try:
                with anyio.fail_after(CONNECT_TIMEOUT):
                    await self._client.ping()
                if not self._available:
                    logger.info("redis_available", extra={"event": "redis_available"})
                self._available = True
                if self._back is not None:
                    self._back.set()
                    self._back = None
            except Exception as exc:
                self._lost("ping", exc)
            await anyio.sleep(HEALTH_INTERVAL)

    async def _listen_cancels(self, relay: LocalRelay) -> None:
        while True:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(self.cancel_channel)
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=HEALTH_INTERVAL
                        )
                        if message is not None:
                            self._on_cancel(relay, message.get("data"))
            except Exception as exc:
                self._lost("cancel listener", exc)
                await anyio.sleep(HEALTH_INTERVAL)

    def _on_cancel(self, relay: LocalRelay, data: Any) -> None:
        try:
            request = json.loads(data)
            live = relay.get(str(request["thread_id"]), str(request["turn_id"]))
            owner = int(request["owner_id"])
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("redis_cancel_malformed error=%s", type(exc).__name__,
                           extra={"event": "redis_cancel_malformed",
                                  "error": type(exc).__name__})
            return
        if live is None or live.owner_id != owner:
            return
        if request.get("if_unread"):
            # The last reader on other replicas left: the disconnect policy decides.
            live.unread_elsewhere()
            return
        if request.get("supersede"):
            if live.abandoned:  # what its last reader here was sent is what is kept
                live.cancel("cancelled", keep_upto=live.last_delivered)
            return
        if live.cancel("cancelled"):
            logger.info("turn_cancel_remote turn_id=%s", live.turn_id,
                        extra={"event": "turn_cancel_remote", "turn_id": live.turn_id})

    # -- other replicas' turns --------------------------------------------

    async def open(
        self, thread_id: str, turn_id: str, after: int, wait: float,
        still_streaming: Callable[[], Awaitable[bool]],
    ) -> AsyncIterator[bytes] | None:
        """The turn's chunks after ``after``, then live; None if Redis has no usable copy.

        ``wait`` is how long to wait for the first entry (the generating replica
        may have opened the turn a moment ago and not written yet).
        """
        if not self.available:
            return None
        key = self.key(thread_id, turn_id)
        try:
            head = await first_entry(self._client, key, wait)
            if head is not None and wait == 0 and not await _has_end(self._client, key):
                head = None  # a finished turn whose relayed copy is incomplete: use the row
        except Exception as exc:
            self._lost("open", exc)
            return None
        if head is None:
            return None
        first = head[1].get(FIRST)
        if first is not None and int(first) > after + 1:
            return None  # the beginning was trimmed away
        return read_turn(self._client, key, after, still_streaming)

    async def request_cancel(
        self, thread_id: str, turn_id: str, owner_id: int, *, if_unread: bool = False,
        supersede: bool = False,
    ) -> None:
        """Publish a cancel request; ``RelayError`` if Redis does not take it.

        ``if_unread``: the last reader on another replica left; the generating replica
        applies its disconnect policy. ``supersede``: cancel only if every reader of
        the turn on its replica has left (a new turn wants the thread).
        """
        message = json.dumps({"thread_id": thread_id, "turn_id": turn_id, "owner_id": owner_id,
                              "if_unread": if_unread, "supersede": supersede})
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                await self._client.publish(self.cancel_channel, message)
        except Exception as exc:
            self._lost("cancel", exc)
            raise RelayError("Redis is unavailable") from None

    # -- readers on other replicas keep a turn alive, as readers here do ----

    def _readers_key(self, thread_id: str, turn_id: str) -> str:
        return f"{self.prefix}:readers:{thread_id}:{turn_id}"

    async def reader_joined(self, thread_id: str, turn_id: str) -> None:
        key = self._readers_key(thread_id, turn_id)
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                async with self._client.pipeline(transaction=False) as pipe:
                    await pipe.incr(key).expire(key, self.ttl_running).execute()
        except Exception as exc:
            self._lost("reader count", exc)

    async def reader_left(self, thread_id: str, turn_id: str, owner_id: int) -> None:
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                left = int(await self._client.decr(self._readers_key(thread_id, turn_id)))
            if left <= 0:
                await self.request_cancel(thread_id, turn_id, owner_id, if_unread=True)
        except Exception as exc:
            self._lost("reader count", exc)

    async def remote_readers(self, thread_id: str, turn_id: str) -> int:
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                value = await self._client.get(self._readers_key(thread_id, turn_id))
            return max(0, int(value or 0))
        except Exception as exc:
            self._lost("reader count", exc)
            return 0


async def connect_shared(settings: Settings) -> RedisRelay | None:
    """The connected relay between replicas when ``REDIS_URL`` is set, else None.

    Raises ``RelayError`` (start-up stops) when Redis does not answer.
    """
    if not settings.redis_url:
        return None
    relay = RedisRelay(
        settings.redis_url,
        retention_seconds=settings.relay_retention_seconds,
        running_ttl_seconds=max(600.0, settings.lease_seconds * 4),
    )
    await relay.connect()
    return relay


async def _has_end(client: Any, key: str) -> bool:
    last = await client.xrevrange(key, "+", "-", count=1)
    return bool(last) and END in last[0][1]


def _redacted(url: str) -> str:
    """``url`` without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


__all__ = ["RedisRelay", "connect_shared"]
