"""The turn routes' side of the shared relay: attach to, resume and cancel a
turn that another replica generates. Used only when ``REDIS_URL`` is set."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.responses import JSONResponse, Response

from gateway.api.errors import ApiError
from gateway.context import AppContext
from gateway.replicas.stream import RelayLost
from gateway.streaming.responses import sse_response
from turngate.exceptions import RelayError

logger = logging.getLogger("turngate.redis")

# How long a cancel from another replica waits to see the turn finalized.
CANCEL_WAIT_SECONDS = 1.5

# The end of a follower whose copy of the turn was lost: an ``error`` chunk with
# no ``id:`` (the client's Last-Event-ID stays that of the last real event), and
# no finish or [DONE] (the turn has not ended). AI SDK clients see an error and
# may resume; the chunk schema allows only ``errorText``.
RESUME_CHUNK = (
    b'data: {"type":"error","errorText":"The stream of this reply was interrupted '
    b'(relay_lost). Resume it with Last-Event-ID to get the rest."}\n\n'
)


def relay_unavailable() -> ApiError:
    return ApiError(
        503, "relay_unavailable", "the relay between replicas (Redis) is unavailable; "
        "retry later", {"Retry-After": "2"},
    )


def check_relay(ctx: AppContext) -> None:
    """Refuse a new turn (503) while the shared relay does not answer."""
    if ctx.shared is not None and not ctx.shared.available:
        raise relay_unavailable()


def _streaming_check(
    ctx: AppContext, thread_id: str, turn_id: str
) -> Callable[[], Awaitable[bool]]:
    async def still_streaming() -> bool:
        try:
            rows = await ctx.store.get_turn(thread_id, turn_id)
        except Exception as exc:  # the database is away for a moment: keep following
            logger.warning("follow_status_check_failed turn_id=%s error=%s", turn_id,
                           type(exc).__name__,
                           extra={"event": "follow_status_check_failed", "turn_id": turn_id,
                                  "error": type(exc).__name__})
            return True
        return rows.assistant is not None and rows.assistant.status == "streaming"

    return still_streaming


async def _counted(
    ctx: AppContext, body: AsyncIterator[bytes], thread_id: str, turn_id: str, owner_id: int,
    live: bool,
) -> AsyncIterator[bytes]:
    """Follow ``body``; while the turn is live this reader keeps it alive, as a local one does."""
    ctx.metrics.active_streams.inc()
    counted = live and ctx.shared is not None and ctx.settings.on_disconnect != "continue"
    if counted:
        assert ctx.shared is not None
        await ctx.shared.reader_joined(thread_id, turn_id)
    try:
        async for data in body:
            yield data
    except RelayLost:
        yield RESUME_CHUNK
    finally:
        ctx.metrics.active_streams.dec()
        if counted and ctx.shared is not None and ctx.runner.task_group is not None:
            # No await here (this finally often runs under cancellation).
            ctx.runner.task_group.start_soon(ctx.shared.reader_left, thread_id, turn_id, owner_id)


async def attach_shared(
    ctx: AppContext, thread_id: str, turn_id: str, after: int, streaming: bool, owner_id: int
) -> Response | None:
    """Follow the turn through the shared relay; None when it has no copy there.

    The caller has checked that the thread is the caller's (``owner_id``). While
    the turn streams, a reader here counts as one of its readers: with
    ``TURNGATE_ON_DISCONNECT=cancel`` the generation stops only when the last
    reader on any replica has left.
    """
    if ctx.shared is None:
        return None
    if streaming and not ctx.shared.available:
        # Generated elsewhere, and no way to follow it now: say so, with when to retry.
        raise relay_unavailable()
    body = await ctx.shared.open(
        thread_id, turn_id, after, 2.0 if streaming else 0.0,
        _streaming_check(ctx, thread_id, turn_id),
    )
    if body is None:
        if streaming and not ctx.shared.available:
            raise relay_unavailable()  # Redis failed just now, while opening the copy
        return None
    return sse_response(ctx, _counted(ctx, body, thread_id, turn_id, owner_id, streaming))


async def _final_status(ctx: AppContext, thread_id: str, turn_id: str) -> str:
    """The turn's row status once it is no longer streaming (or after ~1.5 s)."""
    status = "streaming"
    with anyio.move_on_after(CANCEL_WAIT_SECONDS):
        while status == "streaming":
            await anyio.sleep(0.05)
            rows = await ctx.store.get_turn(thread_id, turn_id)
            status = rows.assistant.status if rows.assistant is not None else "streaming"
    return status


async def cancel_shared(ctx: AppContext, thread_id: str, turn_id: str, owner_id: int) -> Response:
    """Ask the generating replica to cancel; answer once the row is finalized (or ~1.5 s)."""
    assert ctx.shared is not None
    try:
        await ctx.shared.request_cancel(thread_id, turn_id, owner_id)
    except RelayError:
        raise relay_unavailable() from None
    status = await _final_status(ctx, thread_id, turn_id)
    return JSONResponse({"cancelled": status == "cancelled", "status": status})


async def supersede_shared(ctx: AppContext, thread_id: str, turn_id: str, owner_id: int) -> bool:
    """A new turn met ``turn_id`` streaming on another replica: end it if nobody reads it.

    Under ``grace`` only. Readers on replicas other than the generating one are
    counted here; the generating replica cancels only if its own readers all left
    (as ``TurnRunner.supersede`` does locally). True once its row is final.
    """
    if ctx.shared is None or ctx.settings.on_disconnect != "grace":
        return False
    try:
        if await ctx.shared.remote_readers(thread_id, turn_id) > 0:
            return False
        await ctx.shared.request_cancel(thread_id, turn_id, owner_id, supersede=True)
    except RelayError:
        return False
    return await _final_status(ctx, thread_id, turn_id) != "streaming"


__all__ = [
    "attach_shared", "cancel_shared", "check_relay", "relay_unavailable", "supersede_shared",
]
