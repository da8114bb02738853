"""Reading a turn's stream as a browser does, and checking it against the protocol.

``parse_sse`` reads server-sent events the way the AI SDK's parser does
(comments skipped, an event dispatched at a blank line). ``validate_ui_stream``
enforces the chunk schema and ordering of the AI SDK "UI message stream", plus
turngate's own rules: a numeric id on every event, strictly increasing (except a
transient ``data-*`` chunk, which has no id), and ``finish`` then ``[DONE]`` last.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

FINISH_REASONS = {"stop", "length", "content-filter", "tool-calls", "error", "interrupted", "other"}

#: The fields each chunk type must carry.
REQUIRED: dict[str, tuple[str, ...]] = {
    "start": (),
    "start-step": (),
    "finish-step": (),
    "text-start": ("id",),
    "text-delta": ("id", "delta"),
    "text-end": ("id",),
    "reasoning-start": ("id",),
    "reasoning-delta": ("id", "delta"),
    "reasoning-end": ("id",),
    "tool-input-start": ("toolCallId", "toolName"),
    "tool-input-delta": ("toolCallId", "inputTextDelta"),
    "tool-input-available": ("toolCallId", "toolName", "input"),
    "tool-output-available": ("toolCallId", "output"),
    "tool-output-error": ("toolCallId", "errorText"),
    "tool-output-denied": ("toolCallId",),
    "tool-approval-request": ("approvalId", "toolCallId"),
    "message-metadata": ("messageMetadata",),
    "finish": (),
    "abort": (),
    "error": ("errorText",),
}

#: Statuses of an assistant row that is no longer being written.
FINAL_STATUSES = frozenset(
    {"complete", "cancelled", "error", "interrupted", "requires_action", "superseded"}
)


@dataclass
class SSEEvent:
    """One server-sent event: its ``id:``, its ``data:`` lines joined, its ``event:``."""

    id: str | None
    data: str
    event: str | None = None

    @property
    def transient(self) -> bool:
        """Whether this is a transient ``data-*`` chunk: no SSE id, never replayed."""
        if self.id is not None or not self.data.startswith("{"):
            return False
        chunk = json.loads(self.data)
        return (isinstance(chunk, dict) and str(chunk.get("type")).startswith("data-")
                and chunk.get("transient") is True)

    @property
    def chunk(self) -> dict[str, Any] | None:
        """The JSON chunk (``None`` for the final ``[DONE]``)."""
        if self.data == "[DONE]":
            return None
        value: dict[str, Any] = json.loads(self.data)
        return value


@dataclass
class Stream:
    """A response read as server-sent events (or its body, if it was not a stream)."""

    status: int
    headers: dict[str, str]
    events: list[SSEEvent] = field(default_factory=list)
    comments: int = 0
    body: bytes = b""

    @property
    def chunks(self) -> list[dict[str, Any]]:
        """The JSON chunks, without ``[DONE]``."""
        return [json.loads(e.data) for e in self.events if e.data != "[DONE]"]

    @property
    def text(self) -> str:
        """The text deltas joined: the visible reply as far as it was read."""
        return "".join(c["delta"] for c in self.chunks if c["type"] == "text-delta")

    @property
    def reasoning(self) -> str:
        """The reasoning deltas joined."""
        return "".join(c["delta"] for c in self.chunks if c["type"] == "reasoning-delta")

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """The chunks of type ``kind``, in order."""
        return [c for c in self.chunks if c["type"] == kind]

    @property
    def last_id(self) -> int:
        """The id of the last event read that has one (what ``Last-Event-ID`` resumes
        from, as a browser keeps it across events without an id), or -1."""
        ids = [e.id for e in self.events if e.id]
        return int(ids[-1]) if ids else -1

    @property
    def done(self) -> bool:
        """The stream was read to its end (``[DONE]``)."""
        return bool(self.events) and self.events[-1].data == "[DONE]"


class SSEParser:
    """Line by line SSE parsing; :meth:`feed` returns an event at each blank line."""

    def __init__(self) -> None:
        self.comments = 0
        self._data: list[str] = []
        self._id: str | None = None
        self._event: str | None = None

    def feed(self, line: str) -> SSEEvent | None:
        if line == "":
            event = SSEEvent(self._id, "\n".join(self._data), self._event) if self._data else None
            self._data, self._id, self._event = [], None, None
            return event
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        return None


async def parse_sse(lines: AsyncIterator[str], stream: Stream, limit: int | None = None) -> None:
    """Parse ``lines`` into ``stream.events``; stop after ``limit`` events if given.

    ``lines`` is left open when the limit is reached: the caller decides when
    the connection closes (leaving the ``client.stream(...)`` block closes it).
    """
    parser = SSEParser()
    try:
        async for line in lines:
            event = parser.feed(line)
            if event is not None:
                stream.events.append(event)
                if limit is not None and len(stream.events) >= limit:
                    return
    finally:
        stream.comments += parser.comments


def _no_bad_values(value: Any, path: str) -> None:
    if value is None:
        raise AssertionError(f"{path} is null; expected a value (omit the field instead)")
    if isinstance(value, float) and not math.isfinite(value):
        raise AssertionError(f"{path} is {value}; expected a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("input", "output", "messageMetadata", "result"):
                continue  # JSON values: null allowed
            _no_bad_values(v, f"{path}.{k}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def validate_ui_stream(
    stream: Stream, *, complete: bool = True, continues: frozenset[str] = frozenset()
) -> None:
    """Check that ``stream`` is a valid AI SDK UI message stream; raise ``AssertionError``.

    With ``complete=False`` a stream cut short (a client that left) is valid
    if what was read so far is. ``continues``: the ids of tool calls an earlier
    stream of the same message made (a paused turn continuing answers them).
    """
    _check(stream.status == 200, f"status {stream.status}; expected 200")
    ctype = stream.headers.get("content-type", "")
    _check(ctype.startswith("text/event-stream"), f"content-type {ctype!r}; expected "
           "text/event-stream")
    header = stream.headers.get("x-vercel-ai-ui-message-stream")
    _check(header == "v1", f"x-vercel-ai-ui-message-stream is {header!r}; expected 'v1'")
    ids = [e.id for e in stream.events if not e.transient]
    _check(all(i is not None and i.isdigit() for i in ids), f"event without numeric id: {ids}")
    nums = [int(i) for i in ids if i is not None]
    _check(nums == sorted(nums) and len(set(nums)) == len(nums),
           f"ids not strictly increasing: {nums}")
    named = [e.event for e in stream.events if e.event is not None]
    _check(not named, f"named SSE events {named}; expected none (data-only events)")
    open_parts: dict[str, str] = {}
    tools: dict[str, str] = dict.fromkeys(continues, "input-available")  # toolCallId -> state
    saw_finish = False
    for index, event in enumerate(stream.events):
        if event.data == "[DONE]":
            _check(index == len(stream.events) - 1, f"[DONE] at event {index} is not last")
            _check(saw_finish, "[DONE] without a finish chunk before it")
            continue
        _check(not saw_finish, f"chunk after finish: {event.data}")
        chunk = json.loads(event.data)
        _check(isinstance(chunk, dict), f"chunk {chunk!r} is not a JSON object")
        kind = chunk.get("type")
        _check(kind in REQUIRED or str(kind).startswith("data-"),
               f"unknown chunk type {kind!r}; expected one of {sorted(REQUIRED)} or data-*")
        for key in REQUIRED.get(str(kind), ()):
            _check(key in chunk, f"{kind} lacks {key!r}: {chunk}")
        _no_bad_values(chunk, str(kind))
        if kind == "start":
            _check(index == 0, f"start at event {index}; expected it first")
            _check(isinstance(chunk.get("messageId"), str), f"start without messageId: {chunk}")
        elif kind in ("text-start", "reasoning-start"):
            _check(chunk["id"] not in open_parts, f"{kind} reopens {chunk['id']}")
            open_parts[chunk["id"]] = kind.split("-")[0]
        elif kind in ("text-delta", "reasoning-delta", "text-end", "reasoning-end"):
            _check(open_parts.get(chunk["id"]) == kind.split("-")[0],
                   f"{kind} for {chunk['id']!r} without its start")
            _check(isinstance(chunk.get("delta", ""), str), f"{kind} delta is not a string")
            if kind.endswith("-end"):
                del open_parts[chunk["id"]]
        elif kind == "tool-input-start":
            tools[chunk["toolCallId"]] = "input-streaming"
        elif kind == "tool-input-delta":
            _check(tools.get(chunk["toolCallId"]) == "input-streaming",
                   f"tool-input-delta for {chunk['toolCallId']!r} without tool-input-start")
        elif kind == "tool-input-available":
            tools[chunk["toolCallId"]] = "input-available"
        elif kind == "tool-approval-request":
            _check(tools.get(chunk["toolCallId"]) == "input-available",
                   f"{kind} for {chunk['toolCallId']!r} before its input")
            tools[chunk["toolCallId"]] = "approval-requested"
        elif kind in ("tool-output-available", "tool-output-error", "tool-output-denied"):
            _check(tools.get(chunk["toolCallId"]) in ("input-available", "approval-requested"),
                   f"{kind} for {chunk['toolCallId']!r} before its input")
            tools[chunk["toolCallId"]] = "output"
        elif kind == "finish":
            reason = chunk.get("finishReason")
            _check(reason is None or reason in FINISH_REASONS,
                   f"finishReason {reason!r}; expected one of {sorted(FINISH_REASONS)}")
            saw_finish = True
    if complete:
        _check(stream.done, "no [DONE] at the end")
        _check(not open_parts, f"parts left open: {open_parts}")


async def stream_request(
    client: httpx.AsyncClient, method: str, url: str, *, limit: int | None = None, **kwargs: Any
) -> Stream:
    """Send a request and read its SSE body; after ``limit`` events, close the connection.

    Closing after ``limit`` events is what a browser does when the user leaves
    the page: the socket closes and the server sees a disconnect. A response
    that is not an event stream is read whole into ``Stream.body``.
    """
    async with client.stream(method, url, **kwargs) as response:
        stream = Stream(response.status_code, dict(response.headers))
        if response.status_code == 200 and response.headers.get("content-type", "").startswith(
            "text/event-stream"
        ):
            await parse_sse(response.aiter_lines(), stream, limit)
        else:
            stream.body = await response.aread()
        return stream


# --- turns ------------------------------------------------------------------------


def turn_body(
    text: str, *, turn_id: str | None = None, model: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A turn request body (a fresh random ``turn_id`` unless given)."""
    import uuid

    body: dict[str, Any] = {"turn_id": turn_id or uuid.uuid4().hex, "text": text, **extra}
    if model is not None:
        body["model"] = model
    return body


class TurnReader:
    """A turn's response, read one event at a time (see :func:`open_turn`)."""

    def __init__(self, thread_id: str, turn_id: str, response: httpx.Response) -> None:
        self.thread_id = thread_id
        self.turn_id = turn_id
        self.response = response
        self.stream = Stream(response.status_code, dict(response.headers))
        self._lines: AsyncIterator[str] | None = None
        self._parser = SSEParser()

    @property
    def is_stream(self) -> bool:
        """The answer is an event stream (a 200 ``text/event-stream``)."""
        return self.response.status_code == 200 and self.response.headers.get(
            "content-type", ""
        ).startswith("text/event-stream")

    async def next_event(self) -> SSEEvent | None:
        """The next event (kept in ``stream.events`` too), or ``None`` at the end."""
        if not self.is_stream:
            return None
        if self._lines is None:
            self._lines = self.response.aiter_lines()
        async for line in self._lines:
            event = self._parser.feed(line)
            self.stream.comments = self._parser.comments
            if event is not None:
                self.stream.events.append(event)
                return event
        return None

    def __aiter__(self) -> TurnReader:
        return self

    async def __anext__(self) -> SSEEvent:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        """Stop reading lines (the connection closes when ``open_turn``'s block ends)."""
        lines, self._lines = self._lines, None
        closer = getattr(lines, "aclose", None)
        if closer is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await closer()

    async def read(self, limit: int | None = None) -> Stream:
        """Read until the end, or until ``limit`` events in all were read; the stream."""
        if not self.is_stream:
            self.stream.body = await self.response.aread()
            return self.stream
        while limit is None or len(self.stream.events) < limit:
            if await self.next_event() is None:
                break
        return self.stream


@asynccontextmanager
async def open_turn(
    client: httpx.AsyncClient,
    thread_id: str,
    text: str = "hello",
    *,
    model: str | None = None,
    turn_id: str | None = None,
    **extra: Any,
) -> AsyncIterator[TurnReader]:
    """Start a turn and read it event by event; leaving the block closes the connection.

    ``async with open_turn(client, thread, "hi", model="scripted:tokens=9") as turn:``
    then ``async for event in turn: ...`` (or ``await turn.next_event()``).
    Leaving the block before the end is a browser leaving mid-stream.
    """
    body = turn_body(text, turn_id=turn_id, model=model, **extra)
    url = f"/v1/threads/{thread_id}/turns"
    async with client.stream("POST", url, json=body) as response:
        reader = TurnReader(thread_id, body["turn_id"], response)
        try:
            yield reader
        finally:
            await reader.aclose()


async def start_turn(
    client: httpx.AsyncClient,
    thread_id: str,
    text: str = "hello",
    *,
    model: str | None = None,
    turn_id: str | None = None,
    leave_after: int | None = None,
    **extra: Any,
) -> tuple[str, Stream]:
    """Start a turn and read its stream to the end, or leave after ``leave_after`` events.

    Leaving closes the connection exactly as a browser that goes away does.
    Returns the ``turn_id`` and what was read.
    """
    async with open_turn(
        client, thread_id, text, model=model, turn_id=turn_id, **extra
    ) as turn:
        stream = await turn.read(leave_after)
    return turn.turn_id, stream


async def resume_turn(
    client: httpx.AsyncClient,
    thread_id: str,
    turn_id: str,
    last_event_id: int | None = None,
    *,
    leave_after: int | None = None,
) -> Stream:
    """Resume a turn's stream after ``last_event_id`` (``Last-Event-ID``), as
    ``EventSource`` and ``useChat`` do after a reconnect; ``status`` 204 if there is
    nothing to resume."""
    headers = {} if last_event_id is None else {"last-event-id": str(last_event_id)}
    return await stream_request(
        client, "GET", f"/v1/threads/{thread_id}/turns/{turn_id}/stream",
        headers=headers, limit=leave_after,
    )


@dataclass
class FinalTurn:
    """A turn's assistant row once it is final, and its ``token_usage`` rows."""

    message: dict[str, Any]
    usage: list[dict[str, Any]]

    @property
    def status(self) -> str:
        return str(self.message["status"])

    @property
    def text(self) -> str:
        """The stored reply's text parts, joined."""
        return "".join(
            str(p.get("text", "")) for p in self.message["content"] if p.get("type") == "text"
        )


async def _get_json(client: httpx.AsyncClient, url: str, **params: Any) -> Any:
    response = await client.get(url, params=params or None)
    if response.status_code != 200:
        raise AssertionError(f"GET {url} answered {response.status_code} {response.text!r}; "
                             "expected 200")
    return response.json()


async def wait_final(
    client: httpx.AsyncClient,
    thread_id: str,
    turn_id: str | None = None,
    *,
    within: float = 5.0,
    poll: float = 0.01,
) -> FinalTurn:
    """Wait until the turn's assistant row is final (no longer ``streaming``); read it and
    the usage rows of that message.

    ``turn_id`` picks the turn (default: the thread's last assistant row). Raises
    ``TimeoutError`` after ``within`` seconds, naming the status it saw.
    """
    seen = "the messages were not read back in time"
    try:
        with anyio.fail_after(within):
            while True:
                messages = (await _get_json(client, f"/v1/threads/{thread_id}/messages"))[
                    "messages"
                ]
                rows = [
                    m for m in messages
                    if m["role"] == "assistant" and (turn_id is None or m["turn_id"] == turn_id)
                ]
                seen = "no assistant row"
                if rows:
                    seen = f"status {rows[-1]['status']!r}"
                    if rows[-1]["status"] in FINAL_STATUSES:
                        message = rows[-1]
                        break
                await anyio.sleep(poll)
    except TimeoutError:
        raise TimeoutError(
            f"turn {turn_id or '(last)'} of thread {thread_id} not final after {within} s "
            f"({seen}); expected one of {sorted(FINAL_STATUSES)}"
        ) from None
    usage = (await _get_json(client, "/v1/usage", thread_id=thread_id, limit=200))["usage"]
    mine = [row for row in usage if row["message_id"] == message["id"]]
    return FinalTurn(message, mine)


def usage_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line describing usage rows (for messages)."""
    return ", ".join(
        f"prompt={r['prompt_tokens']} completion={r['completion_tokens']} "
        f"estimated={r['estimated']}" for r in rows
    ) or "no usage row"
