"""Per-user limits counted across replicas, in Redis (only when ``REDIS_URL`` is set).

One process counts its own streams and requests (``gateway.api.limits``); with N
replicas behind a load balancer that would let a user have N times the limit.
Here the same two limits are kept in Redis, each check one atomic Lua script
(one round trip):

- **Concurrent streams**: a sorted set per user, one member per generating
  turn (``thread_id:turn_id``), scored by when its hold expires. A turn
  reserves its member before its rows are written, keeps it while it runs (the
  maintenance loop renews the holds of this replica's turns), and gives it back
  when it is finalized. A replica that dies leaves holds that expire after
  ``hold_seconds`` (the turn lease), as its turns' leases do.
- **Request rate**: a sliding window of the user's request times over the last
  60 s, also a sorted set.

Scores are wall-clock seconds of the replica that writes them; replicas of one
deployment agree on the time far better than the seconds these holds last.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio

from turngate.exceptions import RelayError

if TYPE_CHECKING:
    from gateway.replicas.relay import RedisRelay

logger = logging.getLogger("turngate.redis")

TIMEOUT = 2.0
RATE_WINDOW = 60.0

# KEYS[1] the user's set; ARGV: now, limit, hold until, member, key ttl.
# Returns -1 (reserved now), -2 (this turn held it already) or the count when full.
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  return -2
end
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[2]) then return n end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return -1
"""

# KEYS[1] the user's window; ARGV: now, window start, limit, member, key ttl.
# Returns {-1, 0} when counted, else {count, oldest time in the window}.
_HIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {n, oldest[2]}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {-1, '0'}
"""


class SharedLimits:
    """The per-user stream and rate limits of all replicas, kept in Redis."""

    def __init__(self, relay: RedisRelay, *, hold_seconds: float) -> None:
        self._relay = relay  # its client, and whether Redis answers its health pings
        self._client = client = relay.client
        self._prefix = relay.prefix
        self.hold_seconds = hold_seconds
        self._reserve = client.register_script(_RESERVE)
        self._hit = client.register_script(_HIT)

    def _streams_key(self, owner_id: int) -> str:
        return f"{self._prefix}:streams:{owner_id}"

    async def reserve_stream(
        self, owner_id: int, thread_id: str, turn_id: str, limit: int
    ) -> tuple[bool, int]:
        """Hold a stream slot for this turn: ``(newly_held, count_if_full)``.

        ``count_if_full`` is 0 when the slot is held (now or already), else how
        many turns of the user generate. ``RelayError`` if Redis does not answer.
        """
        now = time.time()
        result = int(await self._call(lambda: self._reserve(
            keys=[self._streams_key(owner_id)],
            args=[now, limit, now + self.hold_seconds, f"{thread_id}:{turn_id}",
                  int(self.hold_seconds) + 60],
        )))
        if result == -1:
            return True, 0
        if result == -2:
            return False, 0
        return False, result  # the count, at least limit (>= 1)

    async def release_stream(self, owner_id: int, thread_id: str, turn_id: str) -> None:
        """Give the turn's slot back; shielded and bounded, never raises.

        If Redis does not take it, the hold expires after ``hold_seconds`` anyway.
        """
        with anyio.CancelScope(shield=True):
            try:
                await self._call(lambda: self._client.zrem(
                    self._streams_key(owner_id), f"{thread_id}:{turn_id}"
                ))
            except RelayError:
                pass

    async def renew_streams(self, turns: Iterable[tuple[int, str, str]]) -> None:
        """Extend the holds of ``(owner_id, thread_id, turn_id)`` turns still running here."""
        until = time.time() + self.hold_seconds

        async def renew() -> Any:
            async with self._client.pipeline(transaction=False) as pipe:
                for owner_id, thread_id, turn_id in turns:
                    # XX: never re-create a hold that was released meanwhile.
                    pipe.zadd(self._streams_key(owner_id),
                              {f"{thread_id}:{turn_id}": until}, xx=True)
                return await pipe.execute()

        await self._call(renew)

    async def hit_rate(self, owner_id: int, limit: int) -> float | None:
        """Count one request; None if within ``limit`` per minute, else seconds to wait."""
        now = time.time()
        count, oldest = await self._call(lambda: self._hit(
            keys=[f"{self._prefix}:rate:{owner_id}"],
            args=[now, now - RATE_WINDOW, limit, f"{now:.6f}:{uuid.uuid4().hex[:8]}",
                  int(RATE_WINDOW) + 5],
        ))
        if int(count) < 0:
            return None
        return max(1.0, float(oldest) + RATE_WINDOW - now)

    async def _call(self, op: Callable[[], Awaitable[Any]]) -> Any:
        """``op()`` bounded by ``TIMEOUT``; any failure becomes ``RelayError`` (logged)."""
        if not self._relay.available:  # known to be away: no wait for a timeout
            raise RelayError("Redis is unavailable")
        try:
            with anyio.fail_after(TIMEOUT):
                return await op()
        except Exception as exc:
            _log_failure(exc)
            raise RelayError("Redis is unavailable") from None


def _log_failure(exc: BaseException) -> None:
    logger.warning("redis_limits_failed error=%s", type(exc).__name__,
                   extra={"event": "redis_limits_failed", "error": type(exc).__name__})


__all__ = ["SharedLimits"]
