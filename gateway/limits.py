"""Per-user limits: concurrent generating turns and a request rate."""

from __future__ import annotations

import time
from collections import deque

from gateway.context import AppContext
from gateway.errors import ApiError


def check_stream_quota(ctx: AppContext, user_id: int) -> None:
    """429 if the user already has the most concurrent generations allowed."""
    running = ctx.relay.running_for_owner(user_id)
    if running >= ctx.settings.max_streams_per_user:
        raise ApiError(
            429, "too_many_streams",
            f"{running} turns of this user are generating; at most "
            f"{ctx.settings.max_streams_per_user} at once (TURNGATE_MAX_STREAMS_PER_USER)",
            {"Retry-After": "2"},
        )


def check_rate(ctx: AppContext, user_id: int) -> None:
    """429 if the user made more requests in the last minute than allowed (sliding window)."""
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
        retry = max(1, int(window[0] - cutoff) + 1)
        raise ApiError(
            429, "rate_limited",
            f"more than {ctx.settings.rate_limit_per_minute} requests in the last minute "
            f"(TURNGATE_RATE_LIMIT_PER_MINUTE); retry in {retry} s",
            {"Retry-After": str(retry)},
        )
    window.append(now)


__all__ = ["check_rate", "check_stream_quota"]
