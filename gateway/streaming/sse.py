"""A lean ASGI response for turn streams (pre-encoded SSE bytes).

Why not sse-starlette's ``EventSourceResponse``: it runs four tasks per stream
(stream, ping, disconnect listener, shutdown watcher), which costs more memory per
idle stream and fewer events/s (bench/ measures both; the figures are in
docs/DECISIONS.md). Turn streams are
already encoded (gateway/turn/chunks.py), so this response only has to write bytes,
and does it with two tasks per stream, neither of which wakes while the stream
is idle:

- the request's own task pumps the body: one ``send`` per chunk;
- one watcher task waits on ``receive()`` for ``http.disconnect`` (the only
  prompt sign that the client left, even while no bytes flow), and writes the
  ``: ping`` comment when the app's timer wakes it for one. It is the response's
  own task, started, stopped and awaited by the response (``_stream``).

The timers are the app's, not the stream's: :class:`StreamSet` runs one task per
app that looks at every open stream each ``tick`` (a tenth of the shorter of
``ping_seconds`` and ``send_timeout``, at most 1 s). A stream with nothing written
for ``ping_seconds`` gets its watcher woken to ping (so the ping goes out between
``ping_seconds`` and ``ping_seconds + tick`` after the last write); a stream whose
pending ``send`` has not completed within ``send_timeout`` is dropped (between
``send_timeout`` and ``send_timeout + tick`` after it began: uvicorn's ``send``
never fails for a stalled or departed client). With 1,000 idle streams that is
one wake a second instead of one per stream every few seconds, each paying a
cancel scope and a timer (bench/providers.py). The timer holds that deadline
rather than a cancel scope around every chunk's ``send``: almost every send
completes without suspending, and a scope per chunk costs about a quarter of a
long turn's events/s (bench/). That send only stays pending once the kernel's
send buffer is full (up to 4 MiB), so under ``turngate serve`` the kernel finds
a stalled reader first (``TCP_USER_TIMEOUT``, see ``gateway.ops.http_guard``)
and this response sees ``http.disconnect``; the timer here is what remains
under other servers. A response without a running ``StreamSet`` (no lifespan,
or after the app's timer stopped) keeps these timers itself, as a timeout on
its watcher's wait.

Cancelling a pending ``receive()`` is safe (servers implement it as an event or
queue wait); cancelling the body's ``__anext__`` would not be (it kills an async
generator), so the ping never touches the body and works for every body: a live
turn, a replay, a Redis follower blocked in XREAD.

Whichever side ends first ends the other (as Starlette's StreamingResponse
does): a disconnect cancels the pump, the body's end interrupts the watcher's wait.
The body is closed in ``finally`` under a shield with a deadline, so
``gateway.streaming.responses.follow_live``'s ``finally`` (the reader leaves, and
the lifecycle's disconnect policy is applied) runs at once. Server shutdown ends
streams through ``StreamSet`` too (``cut_all``).
"""

from __future__ import annotations

import asyncio
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
_WATCHER_TASK = "gateway.streaming.sse.SSEResponse._watch"


def encode_headers(headers: Mapping[str, str]) -> tuple[tuple[bytes, bytes], ...]:
    """``headers`` as ASGI sends them, with the SSE content type: encode them once and
    pass the result to every ``SSEResponse``, which then shares them (a stream's own
    copy of five header pairs is 15 objects, 0.7 KiB, held as long as it is open)."""
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if not any(key == b"content-type" for key, _ in raw):
        raw.append((b"content-type", b"text/event-stream; charset=utf-8"))
    return tuple(raw)


#: The app timer's period is this fraction of the shorter of the ping interval and
#: the send timeout, and at most ``MAX_TICK`` seconds.
TICK_FRACTION = 0.1
MAX_TICK = 1.0


def tick_seconds(ping_seconds: float, send_timeout: float) -> float:
    """How often the app's timer looks at its open streams."""
    return min(ping_seconds * TICK_FRACTION, send_timeout * TICK_FRACTION, MAX_TICK)


class StreamSet:
    """The open streams of one app: their one timer, and their end at shutdown.

    ``run`` (one task in the app's task group) ticks every ``tick`` seconds while
    streams are open, and sleeps on an event while none are: it wakes the watcher
    of each stream due a ping and drops each stream whose pending send is older
    than its send timeout (see the module's docstring for the bounds).

    At shutdown the drain finalizes running turns, which ends their streams with
    finish and ``[DONE]``; a stream that is not a local live turn (a Redis follower)
    would otherwise stay open until uvicorn's graceful timeout. ``cut_all`` ends
    every open stream cleanly (``more_body: False``), and any opened after it.
    """

    __slots__ = ("_open", "_some_open", "closed", "running", "tick")

    def __init__(self, ping_seconds: float = 15.0, send_timeout: float = 10.0) -> None:
        self._open: set[SSEResponse] = set()
        self.closed = False
        self.tick = tick_seconds(ping_seconds, send_timeout)
        #: whether ``run`` is ticking; until it is, each response keeps its own timers
        self.running = False
        self._some_open: anyio.Event | None = None

    def add(self, response: SSEResponse) -> None:
        self._open.add(response)
        if self._some_open is not None:
            self._some_open.set()
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

    async def run(self) -> None:
        """The app's stream timer: pings and send timeouts of every open stream."""
        self.running = True
        try:
            while True:
                if not self._open:
                    self._some_open = anyio.Event()
                    await self._some_open.wait()
                    self._some_open = None
                await anyio.sleep(self.tick)
                now = time.monotonic()
                for response in tuple(self._open):
                    response.check(now)
        finally:
            self.running = False
            # The watchers waiting on this timer take their own timers back.
            for response in tuple(self._open):
                response.wake()


class SSEResponse(Response):
    """Streams pre-encoded SSE bytes with pings, a send timeout and disconnect detection."""

    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | tuple[tuple[bytes, bytes], ...] | None = None,
        ping_seconds: float = 15.0,
        send_timeout: float = 10.0,
        streams: StreamSet | None = None,
        cleanup_timeout: float = 5.0,
    ) -> None:
        self.body_iterator = body
        self.status_code = status_code
        self.background = None
        if isinstance(headers, tuple):  # encoded by encode_headers: shared, not copied
            self.raw_headers = list(headers)
        else:
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
        self._wake: anyio.CancelScope | None = None  # the watcher's wait
        self._stopping = False  # the stream has ended: the watcher returns

    def cut(self) -> None:
        """End the stream now (server shutdown); it still ends with ``more_body: False``."""
        if self.outcome == "open":
            self.outcome = "cut"
        self._cancel_pump()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
        try:
            if not await self._send(send, start):
                return
            if scope.get("method") == "HEAD":  # headers only: never start an endless body
                self.outcome = "complete"
            else:
                await self._stream(receive, send)
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

    async def _stream(self, receive: Receive, send: Send) -> None:
        """Pump the body in this task while the watcher waits for the client to leave.

        The watcher is a task of this response's own, a task group of one: started
        here, stopped and awaited before this returns, whatever ends the stream; its
        failure cancels the pump and is raised here. It is a plain task, not one of an
        anyio task group, because anyio (4.14 on) gives every task it starts a handle
        with its own cancel scope and event, held as long as the stream is open; the
        watcher has nothing to cancel but its wait, which ``wake`` interrupts.
        """
        watcher = asyncio.get_running_loop().create_task(
            self._watch(receive, send), name=_WATCHER_TASK
        )
        try:
            with anyio.CancelScope() as self._scope:
                if self._streams is not None:
                    self._streams.add(self)
                await self._pump(send)
        finally:
            self._scope = None
            self._stopping = True
            self.wake()
            # Its wait ends at once; a ping it is sending, within the send timeout.
            with anyio.move_on_after(self.send_timeout + 1, shield=True):
                await asyncio.wait((watcher,))
            if not watcher.done():  # pragma: no cover - a send that ignores its deadline
                watcher.cancel()  # it waits in receive() or send(): both may be cancelled
                with anyio.CancelScope(shield=True):
                    await asyncio.wait((watcher,))
        if not watcher.cancelled() and (error := watcher.exception()) is not None:
            raise error

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

    def check(self, now: float) -> None:
        """The app's timer: drop a stalled reader; wake the watcher when a ping is due."""
        pending_since = self._pump_send_at
        if pending_since:
            if now - pending_since >= self.send_timeout:
                self._drop_stalled()
        elif (
            self._wake is not None
            and not self._sending
            and now - self._last_write >= self.ping_seconds
        ):
            self._wake.cancel()

    def wake(self) -> None:
        """Interrupt the watcher's wait (it then looks at the time itself)."""
        if self._wake is not None:
            self._wake.cancel()

    async def _watch(self, receive: Receive, send: Send) -> None:
        """Wait for the client to leave; ping when idle; drop a reader that stopped
        reading. Runs until the client leaves or the stream ends (``_stopping``)."""
        streams = self._streams
        try:
            while not self._stopping:
                message: Message | None = None
                if streams is not None and streams.running:
                    # The app's timer looks after pings and stalls: wait without a deadline.
                    with anyio.CancelScope() as self._wake:
                        message = await receive()
                    self._wake = None
                else:
                    wait = self._own_timers(time.monotonic())
                    if wait is None:
                        return
                    if wait > 0.0:
                        with anyio.move_on_after(wait) as self._wake:
                            message = await receive()
                        self._wake = None
                if message is None:
                    if not self._stopping and self._ping_due(time.monotonic()):
                        if not await self._send(send, PING_MESSAGE):
                            return
                    continue
                if message["type"] == "http.disconnect":
                    if self.outcome == "open":
                        self.outcome = "disconnect"
                    self._cancel_pump()
                    return
        except BaseException:
            self._cancel_pump()  # the pump stops; the failure is raised by ``_stream``
            raise

    def _cancel_pump(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def _ping_due(self, now: float) -> bool:
        return (
            not self._pump_send_at
            and not self._sending
            and now - self._last_write >= self.ping_seconds
        )

    def _own_timers(self, now: float) -> float | None:
        """Without the app's timer: how long the watcher may wait; None once the
        pending send is older than the send timeout (the stream is dropped)."""
        pending_since = self._pump_send_at
        if pending_since:
            if now - pending_since >= self.send_timeout:
                self._drop_stalled()
                return None
            return pending_since + self.send_timeout - now
        if self._ping_due(now):
            return 0.0
        # A send may start at any moment: look again within send_timeout.
        return max(min(self.ping_seconds - (now - self._last_write), self.send_timeout), 0.0)

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


__all__ = [
    "END_MESSAGE", "PING_MESSAGE", "SSEResponse", "StreamSet", "encode_headers", "tick_seconds",
]
