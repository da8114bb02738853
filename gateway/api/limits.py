"""Per-user limits: concurrent generating turns and a request rate.

Each process counts its own; with ``REDIS_URL`` set the same limits are also
counted across all replicas (``gateway.replicas.limits``), so N replicas do not
give a user N times the limit.
"""

from __future__ import annotations

import math
import time
from collections import deque

from gateway.api.errors import ApiError
from gateway.context import AppContext
from gateway.replicas.follow import relay_unavailable
from turngate.exceptions import RelayError


def check_stream_quota(ctx: AppContext, user_id: int) -> None:
    """429 if the user already has the most concurrent generations allowed."""
    running = ctx.relay.running_for_owner(user_id)
    if running >= ctx.settings.max_streams_per_user:
        raise _too_many_streams(ctx, running)


def _too_many_streams(ctx: AppContext, running: int) -> ApiError:
    return ApiError(
        429, "too_many_streams",
        f"{running} turns of this user are generating; at most "
        f"{ctx.settings.max_streams_per_user} at once (TURNGATE_MAX_STREAMS_PER_USER)",
        {"Retry-After": "2"},
    )


def _rate_limited(ctx: AppContext, retry: int) -> ApiError:
    return ApiError(
        429, "rate_limited",
        f"more than {ctx.settings.rate_limit_per_minute} requests in the last minute "
        f"(TURNGATE_RATE_LIMIT_PER_MINUTE); retry in {retry} s",
        {"Retry-After": str(retry)},
    )


async def reserve_stream(ctx: AppContext, user_id: int, thread_id: str, turn_id: str) -> bool:
    """Across replicas: hold a stream slot for this turn (429 when the user has none left).

    True when this call took the slot (the caller gives it back if no
    generation starts); False without ``REDIS_URL`` or when the turn held it already.
    """
    if ctx.limits is None:
        return False
    try:
        held, running = await ctx.limits.reserve_stream(
            user_id, thread_id, turn_id, ctx.settings.max_streams_per_user
        )
    except RelayError:
        raise relay_unavailable() from None
    if running:
        raise _too_many_streams(ctx, running)
    return held


async def release_stream(ctx: AppContext, user_id: int, thread_id: str, turn_id: str) -> None:
    """Give back a slot taken by ``reserve_stream`` (shielded, bounded; never raises)."""
    if ctx.limits is not None:
        await ctx.limits.release_stream(user_id, thread_id, turn_id)


async def check_rate(ctx: AppContext, user_id: int) -> None:
    """429 if the user made more requests in the last minute than allowed (sliding window).

    This process's window first (no I/O); with ``REDIS_URL`` also the window of
    all replicas. While Redis is away this process's window alone applies: reads
    and thread writes go on (new turns get 503 from the relay check anyway).
    """
    _check_local_rate(ctx, user_id)
    if ctx.limits is None:
        return
    try:
        wait = await ctx.limits.hit_rate(user_id, ctx.settings.rate_limit_per_minute)
    except RelayError:
        return
    if wait is not None:
        raise _rate_limited(ctx, math.ceil(wait))


def _check_local_rate(ctx: AppContext, user_id: int) -> None:
    now = time.monotonic()
    window = ctx.rate_windows.get(user_id)
    if window is None:
        window = ctx.rate_windows[user_id] = deque()
    cutoff = now - 60.0
    if window and window[0] < cutoff:
        # Oldest first: drop what left the window from the left, O(1) each.
        while window and window[0] < cutoff:
            window.popleft()
        if not window and len(ctx.rate_windows) > 10_000:
            # Forget idle users so the table cannot grow without bound.
            for uid in [u for u, w in ctx.rate_windows.items() if not w or w[-1] < cutoff]:
                del ctx.rate_windows[uid]
            window = ctx.rate_windows[user_id] = deque()
    if len(window) >= ctx.settings.rate_limit_per_minute:
        raise _rate_limited(ctx, max(1, int(window[0] - cutoff) + 1))
    window.append(now)


__all__ = ["check_rate", "check_stream_quota", "release_stream", "reserve_stream"]
