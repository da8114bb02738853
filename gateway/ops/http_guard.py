"""uvicorn's httptools protocol with the connection guards it lacks.

Measured with uvicorn 0.54 / httptools 0.9:

- **No deadline on the request head.** uvicorn arms no timer on a new
  connection, and its keep-alive timer stops at the first byte of the next
  request, so 200 connections sending headers at 1 byte/s stayed open without
  limit. Here a head must be complete within ``header_timeout`` of the
  connection (or of the first byte of a later request on it): else ``408`` and
  close, by a sweep at most ``min(1 s, header_timeout / 4)`` after the deadline.
- **No bound on the head's size.** httptools gathers any header (a 16 MiB
  ``Authorization`` was parsed; ``h11_max_incomplete_event_size`` applies to
  h11 only). Past ``max_header_bytes`` (or ``MAX_HEADERS`` header lines):
  ``431`` and close.
- **No bound on connections that have not sent a whole head.**
  ``limit_concurrency`` counts every connection and task (open streams too)
  and answers only once a head is complete. Here at most ``max_pending``
  connections may be reading a head; one more closes the oldest of them
  (``503``): a client that sends its head at once waits milliseconds in that
  set, a slow one is what gets evicted.
- **A reader that stops reading is found by the kernel.** uvicorn's ``send``
  only waits once the kernel send buffer (autotuned up to 4 MiB here) and the
  transport's 64 KiB are full; at 13 KB/s that took minutes. Every connection
  gets ``TCP_USER_TIMEOUT`` = the send timeout: Linux resets a connection whose
  sent bytes stay unacknowledged, or whose receive window stays closed, that
  long (measured on 6.18: dropped 0.5-0.6 s after the timeout for 1-13 s,
  whatever was buffered). uvicorn then reports ``http.disconnect`` and the turn
  follows the disconnect policy. No per-write cost; where the option does not
  exist, ``SSEResponse``'s own pending-send timer still applies.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.api.header_limits import MAX_HEADERS

logger = logging.getLogger("turngate.http")

# Guard warnings are summed over this many seconds, not logged per connection
# (a slowloris run would otherwise write a line per connection).
LOG_EVERY = 10.0

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


@dataclass(frozen=True)
class HeadLimits:
    header_timeout: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_pending: int = 1024
    send_timeout: float = 10.0


class _HeadTooLarge(Exception):
    """Raised in a parser callback; httptools hands it back as a parser error."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a head deadline, head size limits, a bound on
    connections reading a head, and ``TCP_USER_TIMEOUT``. Subclass it through
    ``guarded_http_protocol`` (each server gets its own limits and pending set)."""

    limits: ClassVar[HeadLimits] = HeadLimits()
    # Connections reading a head, oldest first (dicts keep insertion order, and a
    # head that starts again is re-inserted): the deadline sweep stops at the
    # first one still in time.
    pending: ClassVar[dict[GuardedHttpToolsProtocol, None]] = {}
    # One timer per server, not one per connection: a uvloop call_later + cancel
    # costs ~6 us, which per request would be most of this protocol's extra cost.
    _sweeper: ClassVar[list[asyncio.TimerHandle | None]] = [None]
    _dropped: ClassVar[dict[str, int]] = {}
    _logged_at: ClassVar[list[float]] = [0.0]
    # Slots, not instance attributes: uvicorn's protocol already sets 27, and four more
    # push a connection's instance dict past CPython's shared-key limit (30), which makes
    # it a full dict: 1.5 KiB more per open connection (tests/test_http_guard.py).
    __slots__ = ("_head_since", "_head_bytes", "_chunk", "_refusal")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_since = -1.0  # loop time the current head began; -1: not reading one
        self._head_bytes = 0  # bytes received while the head is incomplete
        self._chunk = 0  # size of the read being parsed
        self._refusal = 0  # the status a refused head gets instead of uvicorn's 400

    # -- connection -------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _set_user_timeout(transport, self.limits.send_timeout)
        self._head_started()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        if (
            isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT
            and self.cycle is not None and not self.cycle.response_complete
        ):
            # TCP_USER_TIMEOUT: the client accepted nothing for the send timeout.
            self._count("send_timeout")
        super().connection_lost(exc)

    # -- the request head -------------------------------------------------

    def _head_started(self) -> None:
        if self._head_since >= 0:
            return
        self._head_since = self.loop.time()
        self._head_bytes = 0
        pending = self.pending
        pending[self] = None
        if len(pending) > self.limits.max_pending:
            oldest = next(iter(pending))
            oldest._refuse(503, "too many connections without a complete request",
                           "pending_limit")
        if self._sweeper[0] is None:
            self._arm_sweep(self.loop)

    def _head_done(self) -> None:
        if self._head_since >= 0:
            self._head_since = -1.0
            self.pending.pop(self, None)

    @classmethod
    def _arm_sweep(cls, loop: asyncio.AbstractEventLoop) -> None:
        every = min(1.0, cls.limits.header_timeout / 4)
        cls._sweeper[0] = loop.call_later(every, cls._sweep, loop)

    @classmethod
    def _sweep(cls, loop: asyncio.AbstractEventLoop) -> None:
        """Close every connection whose head is late (at most ``every`` s after its deadline)."""
        cls._sweeper[0] = None
        late = loop.time() - cls.limits.header_timeout
        pending = cls.pending
        while pending:
            oldest = next(iter(pending))
            if oldest._head_since > late:
                break
            oldest._refuse(408, "the request head did not arrive in time", "header_timeout")
        if pending:
            cls._arm_sweep(loop)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The first byte of a later request on a kept-alive connection (uvicorn has
        # just stopped its keep-alive timer): the head deadline starts again.
        self._head_started()

    def on_headers_complete(self) -> None:
        self._head_done()
        # A head that arrived whole in one read is measured here, before any route
        # runs (one that arrives in pieces is counted by data_received as it comes).
        headers = self.headers
        limit = self.limits.max_header_bytes
        if len(headers) > MAX_HEADERS or (
            # Summed only when the bytes read could hold a head that large.
            self._head_bytes + self._chunk > limit
            and len(self.url) + sum(len(k) + len(v) + 4 for k, v in headers) > limit
        ):
            self._refusal = 431
            raise _HeadTooLarge  # httptools hands it back as a parser error: see below
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        self._chunk = len(data)
        super().data_received(data)
        if self._head_since >= 0 and not self.transport.is_closing():
            # Counted after parsing: a chunk in which the head completed is the body's.
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, "request head too large", "header_too_large")

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers 400 to any parser error, ours (too many headers) included.
        if self._refusal:
            self._refuse(self._refusal, "request head too large", "header_too_large")
            return
        super().send_400_response(msg)

    # -- refusing ---------------------------------------------------------

    def _refuse(self, status: int, message: str, why: str) -> None:
        """Answer ``status`` and close: the connection never reaches the app."""
        self._head_done()
        self._count(why)
        if self.transport is None or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a response still being written: an answer
            # now would land inside that response.
            self.transport.close()
            return
        body = message.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n%s\r\n%s"
            % (status, _REASONS[status], len(body),
               b"retry-after: 1\r\n" if status == 503 else b"", body)
        )
        self.transport.close()

    @classmethod
    def _count(cls, why: str) -> None:
        cls._dropped[why] = cls._dropped.get(why, 0) + 1
        now = time.monotonic()
        if now - cls._logged_at[0] >= LOG_EVERY:
            cls._logged_at[0] = now
            counts = dict(cls._dropped)
            cls._dropped.clear()
            summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            logger.warning("connections_dropped %s", summary,
                           extra={"event": "connections_dropped", **counts})


def guarded_http_protocol(limits: HeadLimits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type(
        "TurngateHttpProtocol", (GuardedHttpToolsProtocol,),
        {"limits": limits, "pending": {}, "_sweeper": [None], "_dropped": {},
         "_logged_at": [0.0]},
    )


def _set_user_timeout(transport: asyncio.Transport, seconds: float) -> None:
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    sock = transport.get_extra_info("socket")
    if option is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(seconds * 1000)))
    except OSError:  # not TCP (a Unix socket): the pending-send timer still applies
        pass


__all__ = ["GuardedHttpToolsProtocol", "HeadLimits", "guarded_http_protocol"]
