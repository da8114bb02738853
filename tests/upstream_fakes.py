"""A fake LLM upstream: real HTTP/1.1 on 127.0.0.1 that replays recorded bodies.

It is a raw asyncio TCP server (no framework between the bytes and the
socket), started inside the test's own event loop, so tests see what a real
client sees: chunked streaming with pauses between events, and a peer that
notices at once when its client goes away.

Usage (asyncio backend, e.g. under ``@pytest.mark.anyio``)::

    from tests.upstream_fakes import FakeResponse, FakeUpstream, fixture

    async with FakeUpstream() as fake:
        fake.enqueue(FakeResponse.sse(fixture("openai-text-usage.sse"), delay=0.005))
        env = {"OPENAI_BASE_URL": fake.url + "/v1", "OPENAI_API_KEY": "k"}
        ...                                   # run the adapter / the gateway against it
        req = fake.requests[0]                # every request, in arrival order
        req.path, req.headers["x-api-key"], req.json["messages"]
        await fake.wait_for_request()         # wait until the n-th request arrived
        req.completed                         # True if the whole body was sent
        req.connection                        # 0 for the fake's first TCP connection, ...
        req.disconnected_at                   # time.monotonic() when the client went away
                                              # before the body was complete, else None
        await req.wait_disconnected(within=1.0)

Responses are served in FIFO order from :meth:`FakeUpstream.enqueue`; when the
queue is empty, ``fake.default`` is served (a 500 unless set). ``FakeResponse``
can also be an error status with a JSON body (``FakeResponse.json(401, {...})``),
arbitrary bytes, split into tiny chunks (``chunk_size``), or held open after the
last byte (``hold_open=True``, a stream that never ends, for disconnect tests).

Replay is byte for byte: the body is cut after each blank line
(``\\n\\n`` / ``\\r\\n\\r\\n``) and, optionally, into pieces of ``chunk_size``
bytes; each piece is one HTTP chunk; the pieces concatenate to the body exactly.

Bodies come from two places (``tests/stream_corpus.py`` holds what each must
produce): :func:`fixture`, the project's own streams in
``tests/fixtures/streams/``, always there; and :func:`recording`, real captured
streams in ``<repo>/../shared/recordings`` (outside the repository, never copied
into it; ``TURNGATE_TEST_RECORDINGS_DIR`` points elsewhere). The recordings are
an extra corpus: used when the folder is there, required under ``CI=true``
unless ``TURNGATE_TEST_RECORDINGS=optional`` (see :func:`recordings_in_use`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "streams"
RECORDINGS_DIR = Path(
    os.environ.get("TURNGATE_TEST_RECORDINGS_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "recordings"
)


def fixture(name: str) -> bytes:
    """The exact bytes of one of the project's own stream bodies (``tests/fixtures/streams``)."""
    return (FIXTURES_DIR / name).read_bytes()


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def recordings_present() -> bool:
    return RECORDINGS_DIR.is_dir()


def recordings_required() -> bool:
    """Under ``CI=true`` the recordings must be there, unless
    ``TURNGATE_TEST_RECORDINGS=optional`` (CI's run from a bare copy of the repository)."""
    mode = os.environ.get("TURNGATE_TEST_RECORDINGS", "").strip().lower()
    if mode not in ("", "required", "optional"):
        raise ValueError(f"TURNGATE_TEST_RECORDINGS={mode!r}: use 'required' or 'optional'")
    if mode:
        return mode == "required"
    return _truthy("CI")


def recordings_in_use() -> bool:
    """Whether tests are generated for the recordings: when the folder is there, and
    when it is required (then a missing folder fails those tests instead of dropping them)."""
    return recordings_present() or recordings_required()


def recording(name: str) -> bytes:
    """The exact bytes of a recorded upstream body from ``../shared/recordings``."""
    try:
        return (RECORDINGS_DIR / name).read_bytes()
    except FileNotFoundError:
        if recordings_present():
            raise
        raise FileNotFoundError(
            f"{RECORDINGS_DIR} is missing: the recorded streams are required here "
            "(CI=true or TURNGATE_TEST_RECORDINGS=required); set "
            "TURNGATE_TEST_RECORDINGS=optional to run on the project's own fixtures only"
        ) from None


def split_events(body: bytes) -> list[bytes]:
    """``body`` cut after each blank line; the pieces concatenate to ``body``."""
    pieces = re.split(rb"(?<=\r\n\r\n)|(?<=\n\n)|(?<=\r\r)", body)
    return [p for p in pieces if p]


@dataclass
class FakeResponse:
    """One scripted answer."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: pause before each piece after the first, in seconds
    delay: float = 0.0
    #: also cut every event into pieces of this many bytes (tests parser robustness)
    chunk_size: int | None = None
    #: keep the connection open after the last byte instead of ending the body
    hold_open: bool = False

    @classmethod
    def sse(cls, body: bytes, delay: float = 0.002, **kw: Any) -> FakeResponse:
        """A 200 ``text/event-stream`` answer replaying ``body``."""
        headers = {"content-type": "text/event-stream", **kw.pop("headers", {})}
        return cls(200, body, headers, delay=delay, **kw)

    @classmethod
    def json(cls, status: int, payload: Any, **kw: Any) -> FakeResponse:
        """A JSON answer (e.g. an error status with the provider's error body)."""
        headers = {"content-type": "application/json", **kw.pop("headers", {})}
        return cls(status, json.dumps(payload).encode(), headers, **kw)

    def pieces(self) -> list[bytes]:
        events = split_events(self.body) if self.status < 300 else [self.body]
        if self.chunk_size:
            size = self.chunk_size
            events = [e[i : i + size] for e in events for i in range(0, len(e), size)]
        return [e for e in events if e]  # an empty chunk would end the chunked body


@dataclass
class RecordedRequest:
    """What the fake received, and how the exchange ended."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    response: FakeResponse | None = None
    #: which TCP connection it came on (0 for the fake's first, 1 for its second, ...)
    connection: int = 0
    #: the whole response body was sent (and the terminating chunk written)
    completed: bool = False
    #: time.monotonic() at which the client closed the connection mid-response
    disconnected_at: float | None = None
    _gone: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    async def wait_disconnected(self, within: float = 1.0) -> float:
        """Wait (at most ``within`` s) until the client went away mid-response;
        return the ``time.monotonic()`` at which it did."""
        await asyncio.wait_for(self._gone.wait(), within)
        assert self.disconnected_at is not None
        return self.disconnected_at


class _Closed(Exception):
    pass


class _Conn:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()
        self.eof = False

    async def fill(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            self.eof = True
            raise _Closed
        self.buf += data

    async def read_until(self, marker: bytes) -> bytes:
        while (i := self.buf.find(marker)) < 0:
            await self.fill()
        out = bytes(self.buf[: i + len(marker)])
        del self.buf[: i + len(marker)]
        return out

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class FakeUpstream:
    """A fake provider on 127.0.0.1; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self.default = FakeResponse.json(500, {"error": {"type": "no_response_queued"}})
        self._queue: deque[FakeResponse] = deque()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._arrived = asyncio.Condition()
        self._connections = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def enqueue(self, *responses: FakeResponse) -> None:
        self._queue.extend(responses)

    async def start(self) -> FakeUpstream:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        # Close the sockets rather than cancel the handlers: the handlers then see
        # EOF and return (asyncio 3.11 logs an error for a cancelled handler task).
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def wait_for_request(self, count: int = 1, within: float = 5.0) -> RecordedRequest:
        """Wait (at most ``within`` s) until ``count`` requests arrived; return the
        ``count``-th."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.requests) >= count), within
            )
        return self.requests[count - 1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = _Conn(reader)
        number, self._connections = self._connections, self._connections + 1
        try:
            while True:
                try:
                    request = await self._read_request(conn)
                except _Closed:
                    return
                request.connection = number
                async with self._arrived:
                    self.requests.append(request)
                    self._arrived.notify_all()
                response = self._queue.popleft() if self._queue else self.default
                request.response = response
                keep_alive = await self._respond(conn, writer, request, response)
                if not keep_alive:
                    return
        except (ConnectionError, _Closed):
            return
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _read_request(self, conn: _Conn) -> RecordedRequest:
        head = await conn.read_until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await conn.read_until(b"\r\n")).split(b";")[0], 16)
                data = await conn.read_exact(size + 2)
                if size == 0:
                    break
                parts.append(data[:-2])
            body = b"".join(parts)
        elif "content-length" in headers:
            body = await conn.read_exact(int(headers["content-length"]))
        return RecordedRequest(method, path, headers, body, time.monotonic())

    async def _respond(
        self,
        conn: _Conn,
        writer: asyncio.StreamWriter,
        request: RecordedRequest,
        response: FakeResponse,
    ) -> bool:
        head = [f"HTTP/1.1 {response.status} X", "transfer-encoding: chunked"]
        head += [f"{k}: {v}" for k, v in response.headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()

        # Watch the socket while streaming: EOF means the client went away.
        watcher = asyncio.ensure_future(conn.fill())

        def client_gone() -> bool:
            return watcher.done() and not watcher.cancelled() and watcher.exception() is not None

        def mark_gone() -> None:
            if request.disconnected_at is None:
                request.disconnected_at = time.monotonic()
                request._gone.set()

        watcher.add_done_callback(
            lambda w: mark_gone()
            if not request.completed and not w.cancelled() and w.exception() is not None
            else None
        )
        try:
            for n, piece in enumerate(response.pieces()):
                if n and response.delay:
                    await asyncio.wait({watcher}, timeout=response.delay)
                if client_gone():
                    return False
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            if response.hold_open:
                await asyncio.wait({watcher})
                return False
            if client_gone():
                return False
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            request.completed = True
        except (ConnectionError, OSError):
            mark_gone()
            return False
        finally:
            if not watcher.done():
                watcher.cancel()
                try:
                    await watcher
                except (asyncio.CancelledError, _Closed, ConnectionError, OSError):
                    pass
        # Watcher consumed nothing but a possible early next request, kept in conn.buf.
        return not (watcher.done() and not watcher.cancelled() and watcher.exception())




# --- helpers for driving an adapter -------------------------------------------------


@dataclass
class AdapterRun:
    """The events of one adapter stream, and the error that ended it (if any)."""

    events: list[Any]
    error: BaseException | None = None

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if type(e).__name__ == "TextDelta")

    @property
    def reasoning(self) -> str:
        return "".join(e.text for e in self.events if type(e).__name__ == "ReasoningDelta")

    @property
    def tool_calls(self) -> list[tuple[str, str, str]]:
        """``(id, name, assembled args)`` per call, in start order."""
        calls: dict[str, list[str]] = {}
        names: dict[str, str] = {}
        for e in self.events:
            kind = type(e).__name__
            if kind == "ToolCallStart":
                calls[e.id], names[e.id] = [], e.name
            elif kind == "ToolCallDelta":
                calls[e.id].append(e.args_text)
        return [(i, names[i], "".join(parts)) for i, parts in calls.items()]


async def run_adapter(adapter: Any, request: Any) -> AdapterRun:
    """Drain ``adapter.stream(request)``; an ``Exception`` it raises is captured."""
    run = AdapterRun([])
    agen = adapter.stream(request)
    try:
        async for event in agen:
            run.events.append(event)
    except Exception as exc:  # the tests assert on it
        run.error = exc
    finally:
        await agen.aclose()
    return run


__all__ = [
    "FIXTURES_DIR",
    "RECORDINGS_DIR",
    "AdapterRun",
    "run_adapter",
    "FakeResponse",
    "FakeUpstream",
    "RecordedRequest",
    "fixture",
    "recording",
    "recordings_in_use",
    "recordings_present",
    "recordings_required",
    "split_events",
]
