"""The turn stream's HTTP response: SSE headers, the app's open streams, a live follower."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

import anyio

from gateway.streaming.relay import LiveTurn
from gateway.streaming.sse import SSEResponse, StreamSet, encode_headers

if TYPE_CHECKING:
    from gateway.context import AppContext

logger = logging.getLogger("turngate.stream")

# The AI SDK's UI message stream headers; no proxy may buffer or cache the stream.
STREAM_HEADERS = {
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
}
_RAW_STREAM_HEADERS = encode_headers(STREAM_HEADERS)


def sse_response(ctx: AppContext, body: AsyncIterator[bytes], status: int = 200) -> SSEResponse:
    """An SSE response with the AI SDK headers, ``: ping`` comments and a send timeout."""
    return SSEResponse(
        body,
        status_code=status,
        headers=_RAW_STREAM_HEADERS,
        ping_seconds=ctx.settings.ping_seconds,
        send_timeout=ctx.settings.send_timeout,
        streams=ctx.streams,  # None without a lifespan: nothing to end at shutdown
        cleanup_timeout=ctx.settings.finalize_timeout,
    )


def _uvicorn_exiting() -> bool:
    """Whether the uvicorn server that handles SIGTERM here wants to exit.

    ``turngate serve`` sets the shutdown event itself at the signal; a plain
    uvicorn server (tests, embedding) never tells the app until its connections
    are closed, so, as sse-starlette's exit watcher did, look at it.
    """
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))


async def end_streams_at_shutdown(event: anyio.Event, streams: StreamSet, after: float) -> None:
    """One task per app (started by its lifespan): at shutdown, end the streams the
    drain did not end.

    Setting the event starts the app's drain (``gateway.app``), which finalizes
    running turns within the grace period plus one finalize deadline (``after``
    is that plus a second); their streams then end by themselves with finish and
    ``[DONE]``. Whatever is still open then (a follower of another replica's turn,
    a stuck reader) is ended here, cleanly, before uvicorn's own graceful timeout.
    """
    while not event.is_set():
        with anyio.move_on_after(0.5):
            await event.wait()
        if not event.is_set() and _uvicorn_exiting():
            event.set()
    await anyio.sleep(after)
    cut = streams.cut_all()
    if cut:
        logger.warning("streams_cut_at_shutdown count=%d", cut,
                       extra={"event": "streams_cut_at_shutdown", "count": cut})


async def follow_live(ctx: AppContext, live: LiveTurn, after: int = -1) -> AsyncIterator[bytes]:
    """Stream a live turn from SSE id ``after``.

    It also gets the turn's transient chunks published while it follows
    (``LiveTurn.publish_transient``). The follower only reports: it joins, and on
    leaving says which chunk went out last (``LiveTurn.reader_left``). What happens
    to a turn nobody reads any more is decided by the lifecycle's disconnect policy
    (``TurnRunner.on_unread``).
    """
    live.reader_joined()
    ctx.metrics.active_streams.inc()
    delivered = after
    try:
        # aclosing: a departing reader must release the inner generator (and its
        # waiter count) at once, not whenever the garbage collector gets to it.
        async with aclosing(live.batches(after, transient=True)) as batches:
            async for first, chunks in batches:
                yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if first >= 0:  # a transient chunk (-1) has no SSE id to report
                    delivered = first + len(chunks) - 1  # handed to the transport
    finally:
        ctx.metrics.active_streams.dec()
        live.reader_left(delivered)


__all__ = ["STREAM_HEADERS", "end_streams_at_shutdown", "follow_live", "sse_response"]
