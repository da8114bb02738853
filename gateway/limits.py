"""Per-user limits: concurrent generating turns and a request rate."""

from __future__ import annotations

import time

from gateway.context import AppContext
from gateway.errors import ApiError


def check_stream_quota(ctx: AppContext, user_id: int) -> None:
    """429 if the user already has the most concurrent generations allowed."""
    if ctx.relay.running_for_owner(user_id) >= ctx.settings.max_streams_per_user:
        raise ApiError(
            429, "too_many_streams",
            f"at most {ctx.settings.max_streams_per_user} concurrent turns per user",
            {"Retry-After": "2"},
        )


def check_rate(ctx: AppContext, user_id: int) -> None:
    """429 if the user made more requests in the last minute than allowed (sliding window)."""
    now = time.monotonic()
    window = ctx.rate_windows.setdefault(user_id, [])
    cutoff = now - 60.0
    if window and window[0] < cutoff:
        window[:] = [t for t in window if t >= cutoff]
    if len(window) >= ctx.settings.rate_limit_per_minute:
        retry = max(1, int(window[0] - cutoff) + 1)
        raise ApiError(
            429, "rate_limited",
            f"more than {ctx.settings.rate_limit_per_minute} requests per minute",
            {"Retry-After": str(retry)},
        )
    window.append(now)


__all__ = ["check_rate", "check_stream_quota"]
