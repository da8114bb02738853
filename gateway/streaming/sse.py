"""A lean ASGI response for turn streams (pre-encoded SSE bytes).

Why not sse-starlette's ``EventSourceResponse``: it runs four tasks per stream
(stream, ping, disconnect listener, shutdown watcher), which costs more memory per
idle stream and fewer events/s (bench/ measures both; the figures are in
docs/DECISIONS.md). Turn streams are
already encoded (gateway/turn/chunks.py), so this response only has to write bytes,
and does it with two tasks per stream:

- the request's own task pumps the body: one ``send`` per chunk;
- one watcher task waits on ``receive()`` for ``http.disconnect`` (the only
  prompt sign that the client left, even while no bytes flow) and, as a
  timeout on that same wait, writes a ``: ping`` comment when nothing was
  written for ``ping_seconds`` and drops a reader whose pending ``send`` has
  not completed within ``send_timeout`` (uvicorn's ``send`` never fails for a
  stalled or departed client). The watcher holds that deadline rather than a
  cancel scope around every chunk's ``send``: almost every send completes
  without suspending, and a scope per chunk costs about a quarter of a long
  turn's events/s (bench/). That send only stays pending once
  the kernel's send buffer is full (up to 4 MiB), so under ``turngate serve``
  the kernel finds a stalled reader first (``TCP_USER_TIMEOUT``, see
  ``gateway.ops.http_guard``) and this response sees ``http.disconnect``; the
  timer here is what remains under other servers.

  Cancelling a pending ``receive()`` is safe
  (servers implement it as an event or queue wait); cancelling the body's
  ``__anext__`` would not be (it kills an async generator), so the ping never
  touches the body and works for every body: a live turn, a replay, a Redis
  follower blocked in XREAD.

Whichever side ends first cancels the other (as Starlette's StreamingResponse
does). The body is closed in ``finally`` under a shield with a deadline, so
``gateway.streaming.responses.follow_live``'s ``finally`` (the reader leaves, and
the lifecycle's disconnect policy is applied) runs at once. Server shutdown ends
streams through ``StreamSet`` (see there): one task per app, not one per stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger("turngate.stream")

PING_MESSAGE: Message = {"type": "http.response.body", "body": b": ping\n\n", "more_body": True}
END_MESSAGE: Message = {"type": "http.response.body", "body": b"", "more_body": False}


class StreamSet:
    """The open streams of one app, so shutdown can end those its drain does not end.

    The drain finalizes running turns, which ends their streams with finish and
    ``[DONE]``; a stream that is not a local live turn (a Redis follower) would
    otherwise stay open until uvicorn's graceful timeout. ``cut_all`` ends every
    open stream cleanly (``more_body: False``), and any opened after it.
    """

    __slots__ = ("_open", "closed")

    def __init__(self) -> None:
        self._open: set[SSEResponse] = set()
        self.closed = False

    def add(self, response: SSEResponse) -> None:
        self._open.add(response)
        if self.closed:
            response.cut()

    def discard(self, response: SSEResponse) -> None:
        self._open.discard(response)

    def cut_all(self) -> int:
        """End every open stream (and every later one); how many were open."""
        self.closed = True
        open_now = list(self._open)
        for response in open_now:
            response.cut()
        return len(open_now)

    def __len__(self) -> int:
        return len(self._open)


class SSEResponse(Response):
    """Streams pre-encoded SSE bytes with pings, a send timeout and disconnect detection."""

    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        ping_seconds: float = 15.0,
        send_timeout: float = 10.0,
        streams: StreamSet | None = None,
        cleanup_timeout: float = 5.0,
    ) -> None:
        self.body_iterator = body
        self.status_code = status_code
        self.background = None
        self.init_headers(headers)
        self.ping_seconds = ping_seconds
        self.send_timeout = send_timeout
        self.cleanup_timeout = cleanup_timeout
        self.outcome = "open"  # complete | disconnect | send_timeout | cut
        self._streams = streams
        self._scope: anyio.CancelScope | None = None
        self._sending = 0  # the watcher's own sends (start, pings, end) in flight
        self._pump_send_at = 0.0  # when the body's pending send began; 0.0 if none
        self._last_write = 0.0

    def cut(self) -> None:
        """End the stream now (server shutdown); it still ends with ``more_body: False``."""
        if self.outcome == "open":
            self.outcome = "cut"
        if self._scope is not None:
            self._scope.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
        try:
            if not await self._send(send, start):
                return
            if scope.get("method") == "HEAD":  # headers only: never start an endless body
                self.outcome = "complete"
            else:
                async with anyio.create_task_group() as tg:
                    self._scope = tg.cancel_scope
                    if self._streams is not None:
                        self._streams.add(self)
                    tg.start_soon(self._watch, receive, send)
                    await self._pump(send)
                    tg.cancel_scope.cancel()
                self._scope = None
            if self.outcome in ("complete", "cut"):
                await self._send(send, END_MESSAGE)
            elif self.outcome == "send_timeout":
                # Returning without the last message makes uvicorn close the socket,
                # which is what a reader that stopped reading should get.
                logger.warning("stream_dropped reason=send_timeout after=%gs", self.send_timeout,
                               extra={"event": "stream_dropped", "reason": "send_timeout"})
        finally:
            if self._streams is not None:
                self._streams.discard(self)
            await self._close_body()

    async def _send(self, send: Send, message: Message) -> bool:
        """``send`` bounded by the send timeout; False (and the stream cut) on expiry."""
        self._sending += 1
        try:
            with anyio.move_on_after(self.send_timeout) as timer:
                await send(message)
        finally:
            self._sending -= 1
        if timer.cancelled_caught:
            self.outcome = "send_timeout"
            if self._scope is not None:
                self._scope.cancel()
            return False
        self._last_write = time.monotonic()
        return True

    async def _pump(self, send: Send) -> None:
        """Write every chunk of the body; runs in the request's own task."""
        async for chunk in self.body_iterator:
            if chunk:
                # The watcher cuts this send if it is still pending after send_timeout.
                self._pump_send_at = now = time.monotonic()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self._pump_send_at = 0.0
                self._last_write = now
        if self.outcome == "open":
            self.outcome = "complete"

    async def _watch(self, receive: Receive, send: Send) -> None:
        """Wait for the client to leave; ping when idle; drop a reader that stopped reading."""
        while True:
            now = time.monotonic()
            pending_since = self._pump_send_at
            if pending_since:
                if now - pending_since >= self.send_timeout:
                    self._drop_stalled()
                    return
                wait = pending_since + self.send_timeout - now
            else:
                idle = now - self._last_write
                if idle >= self.ping_seconds and not self._sending:
                    if not await self._send(send, PING_MESSAGE):
                        return
                    continue
                # A send may start at any moment: look again within send_timeout.
                wait = min(self.ping_seconds - idle, self.send_timeout)
            with anyio.move_on_after(max(wait, 0.0)):
                message = await receive()
                if message["type"] == "http.disconnect":
                    if self.outcome == "open":
                        self.outcome = "disconnect"
                    assert self._scope is not None
                    self._scope.cancel()
                    return

    def _drop_stalled(self) -> None:
        """A send did not complete within ``send_timeout``: end the stream without its end."""
        if self.outcome == "open":
            self.outcome = "send_timeout"
        if self._scope is not None:
            self._scope.cancel()

    async def _close_body(self) -> None:
        """Close the body now (its ``finally`` must not wait for the garbage collector).

        After a cancellation inside ``__anext__`` the generator has already ended and
        this is a no-op; when the body sits at a ``yield`` (a send failed or timed
        out, or the stream was cut), it throws ``GeneratorExit`` there.
        """
        aclose: Any = getattr(self.body_iterator, "aclose", None)
        if aclose is None:
            return
        with anyio.move_on_after(self.cleanup_timeout, shield=True) as cleanup:
            try:
                await aclose()
            except Exception:
                logger.exception("stream body failed to close")
        if cleanup.cancelled_caught:
            logger.warning("stream body did not close within %gs", self.cleanup_timeout)


__all__ = ["END_MESSAGE", "PING_MESSAGE", "SSEResponse", "StreamSet"]
