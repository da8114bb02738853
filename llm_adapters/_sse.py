"""An incremental server-sent-events parser (WHATWG rules) for upstream streams.

:class:`SSEDecoder` is fed raw bytes as they arrive and returns the complete
events; :func:`aiter_sse` wraps it around an async byte iterator such as
``httpx.Response.aiter_bytes()``.

Rules (https://html.spec.whatwg.org/multipage/server-sent-events.html):

- lines end with ``\\r\\n``, ``\\n`` or ``\\r`` (a ``\\r\\n`` split across two
  network chunks is one line ending); a leading UTF-8 BOM is dropped;
- a line starting with ``:`` is a comment and is skipped;
- ``field: value`` (one optional space after the colon is removed); ``data``
  lines accumulate, joined with ``\\n``; ``event`` sets the type (default
  ``"message"``); ``id`` and ``retry`` are kept but unused by the adapters;
- a blank line dispatches the event, unless no ``data`` line was seen.

One deliberate deviation: at end of stream an event that was not terminated by
a blank line is dispatched anyway (``flush()``). Real providers end streams
that way (the Anthropic SDK's own fixture does), and the adapters must see
their last event rather than silently lose it.

Lines are split on bytes before decoding, which is safe for UTF-8 (``\\r`` and
``\\n`` never occur inside a multi-byte sequence), so a character split across
network chunks is decoded whole.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable
from typing import NamedTuple

from turngate.exceptions import UpstreamProtocolError

#: An event larger than this (bytes of pending data) is treated as a broken stream.
DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024


class SSEEvent(NamedTuple):
    """One dispatched event: its type (``"message"`` by default) and its data."""

    event: str
    data: str


class SSEDecoder:
    """Turns a byte stream, fed in arbitrary pieces, into :class:`SSEEvent` s."""

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()
        self._started = False
        self._event = ""
        self._data: list[str] = []
        self._data_size = 0
        self.last_event_id = ""
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume ``chunk``; return the events it completed."""
        if not chunk:
            return []
        self._buf += chunk
        if not self._started:
            if len(self._buf) < 3 and b"\xef\xbb\xbf".startswith(bytes(self._buf)):
                return []
            if self._buf.startswith(b"\xef\xbb\xbf"):
                del self._buf[:3]
            self._started = True
        events: list[SSEEvent] = []
        buf = self._buf
        if b"\r" not in buf:
            self._feed_lf(buf, events)
        else:
            self._feed_any(buf, events)
        if len(buf) + self._data_size > self._max:
            raise UpstreamProtocolError("upstream stream event exceeds the size limit")
        return events

    def _feed_lf(self, buf: bytearray, events: list[SSEEvent]) -> None:
        """The complete lines of ``buf``, which ends its lines with ``\\n`` only (as
        every provider does): whole events first, each ``data: <one line>``, alone or
        after ``event: <type>`` (the shapes of nearly every chunk), taken as it is, then
        the lines after the last."""
        end = buf.rfind(b"\n")
        if end == -1:
            return
        block = buf[: end + 1]
        del buf[: end + 1]
        rest = 0
        if not self._data and not self._event:  # no event under way: events start here
            stop = block.rfind(b"\n\n")
            if stop != -1:
                for piece in block[:stop].split(b"\n\n"):
                    if piece.startswith(b"data: ") and b"\n" not in piece:
                        events.append(SSEEvent("message",
                                               piece[6:].decode("utf-8", errors="replace")))
                        continue
                    if piece.startswith(b"event: "):  # Anthropic's: its type, then its data
                        head, _, body = piece.partition(b"\n")
                        if body.startswith(b"data: ") and b"\n" not in body:
                            events.append(SSEEvent(
                                head[7:].decode("utf-8", errors="replace") or "message",
                                body[6:].decode("utf-8", errors="replace")))
                            continue
                    # Anything else: its lines, then the blank line that ends it.
                    self._lines([*piece.split(b"\n"), bytearray()], events)
                rest = stop + 2
        if rest < len(block):
            self._lines(block[rest:-1].split(b"\n"), events)

    def _lines(self, lines: list[bytearray], events: list[SSEEvent]) -> None:
        """Complete lines, ``data:`` lines and blank lines handled inline."""
        data = self._data
        for raw in lines:
            if raw.startswith(b"data:"):
                value = raw[6:] if raw.startswith(b" ", 5) else raw[5:]
                data.append(value.decode("utf-8", errors="replace"))
                self._data_size += len(raw)
            elif not raw:
                if data:
                    events.append(SSEEvent(self._event or "message",
                                           data[0] if len(data) == 1 else "\n".join(data)))
                    data.clear()
                    self._data_size = 0
                self._event = ""
            else:
                self._line(bytes(raw))

    def _feed_any(self, buf: bytearray, events: list[SSEEvent]) -> None:
        """The complete lines of ``buf``, whatever their endings."""
        start = 0
        n = len(buf)
        while start < n:
            cr = buf.find(b"\r", start)
            lf = buf.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                end, nxt = lf, lf + 1
            else:
                # A lone "\r" at the end of what we have may be half of "\r\n".
                if cr == n - 1:
                    break
                end = cr
                nxt = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            event = self._line(bytes(buf[start:end]))
            if event is not None:
                events.append(event)
            start = nxt
        del buf[:start]

    def flush(self) -> list[SSEEvent]:
        """End of stream: dispatch a last event left without its blank line."""
        events: list[SSEEvent] = []
        if self._buf:
            line, self._buf = bytes(self._buf), bytearray()
            if line.endswith(b"\r"):
                line = line[:-1]
            event = self._line(line)
            if event is not None:
                events.append(event)
        event = self._dispatch()
        if event is not None:
            events.append(event)
        return events

    def _line(self, raw: bytes) -> SSEEvent | None:
        if not raw:
            return self._dispatch()
        line = raw.decode("utf-8", errors="replace")
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_size += len(raw)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(self._event or "message", "\n".join(self._data))
        self._event = ""
        self._data = []
        self._data_size = 0
        return event


async def aiter_sse(
    chunks: AsyncIterable[bytes], *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> AsyncGenerator[SSEEvent, None]:
    """Yield the events of a byte stream, finalizing a trailing event at EOF."""
    decoder = SSEDecoder(max_event_bytes)
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.flush():
        yield event


__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SSEDecoder", "SSEEvent", "aiter_sse"]
