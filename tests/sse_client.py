"""A strict SSE reader and AI SDK UI-message-stream validator for tests.

``read_events`` parses a response body the way the AI SDK's parser does
(comments skipped, events dispatched at a blank line). ``validate_ui_stream``
enforces the chunk schema and ordering rules of the AI SDK's UI message stream
(docs/API.md, "The stream"; docs/DECISIONS.md, "Finish chunk order"), plus our
own: ids on every event, strictly increasing, ``finish`` then ``[DONE]`` last.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

FINISH_REASONS = {"stop", "length", "content-filter", "tool-calls", "error", "interrupted", "other"}

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
    "message-metadata": ("messageMetadata",),
    "finish": (),
    "abort": (),
    "error": ("errorText",),
}


@dataclass
class SSEEvent:
    id: str | None
    data: str
    event: str | None = None

    @property
    def chunk(self) -> dict[str, Any] | None:
        return None if self.data == "[DONE]" else json.loads(self.data)


@dataclass
class Stream:
    status: int
    headers: dict[str, str]
    events: list[SSEEvent] = field(default_factory=list)
    comments: int = 0

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e.chunk for e in self.events if e.data != "[DONE]"]  # type: ignore[misc]

    @property
    def text(self) -> str:
        return "".join(c["delta"] for c in self.chunks if c["type"] == "text-delta")

    @property
    def reasoning(self) -> str:
        return "".join(c["delta"] for c in self.chunks if c["type"] == "reasoning-delta")

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [c for c in self.chunks if c["type"] == kind]

    @property
    def last_id(self) -> int:
        return int(self.events[-1].id) if self.events and self.events[-1].id else -1


async def parse_sse(lines: AsyncIterator[str], stream: Stream, limit: int | None = None) -> None:
    """Parse lines into ``stream.events``; stop after ``limit`` events if given."""
    data: list[str] = []
    event_id: str | None = None
    event_name: str | None = None
    async for line in lines:
        if line == "":
            if data:
                stream.events.append(SSEEvent(event_id, "\n".join(data), event_name))
                if limit is not None and len(stream.events) >= limit:
                    return
            data, event_id, event_name = [], None, None
            continue
        if line.startswith(":"):
            stream.comments += 1
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
        elif name == "event":
            event_name = value


def _no_bad_values(value: Any, path: str) -> None:
    if value is None:
        raise AssertionError(f"{path} is null")
    if isinstance(value, float) and not math.isfinite(value):
        raise AssertionError(f"{path} is not finite")
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("input", "output", "messageMetadata", "result"):
                continue  # JSON values: null allowed
            _no_bad_values(v, f"{path}.{k}")


def validate_ui_stream(stream: Stream, *, complete: bool = True) -> None:
    """Assert the stream is a valid AI SDK UI message stream (raise AssertionError)."""
    assert stream.status == 200, stream.status
    ctype = stream.headers.get("content-type", "")
    assert ctype.startswith("text/event-stream"), ctype
    assert stream.headers.get("x-vercel-ai-ui-message-stream") == "v1"
    ids = [e.id for e in stream.events]
    assert all(i is not None and i.isdigit() for i in ids), f"event without numeric id: {ids}"
    nums = [int(i) for i in ids]  # type: ignore[arg-type]
    assert nums == sorted(nums) and len(set(nums)) == len(nums), f"ids not increasing: {nums}"
    assert all(e.event is None for e in stream.events), "named SSE events are not allowed"
    open_parts: dict[str, str] = {}
    tools: dict[str, str] = {}  # toolCallId -> state
    saw_finish = False
    for index, event in enumerate(stream.events):
        if event.data == "[DONE]":
            assert index == len(stream.events) - 1, "[DONE] is not last"
            assert saw_finish, "[DONE] without finish"
            continue
        assert not saw_finish, "chunk after finish"
        chunk = json.loads(event.data)
        assert isinstance(chunk, dict), chunk
        kind = chunk.get("type")
        assert kind in REQUIRED or str(kind).startswith("data-"), f"unknown chunk {kind}"
        for key in REQUIRED.get(kind, ()):
            assert key in chunk, f"{kind} lacks {key}: {chunk}"
        _no_bad_values(chunk, kind)
        if kind == "start":
            assert index == 0, "start is not first"
            assert isinstance(chunk.get("messageId"), str)
        elif kind in ("text-start", "reasoning-start"):
            assert chunk["id"] not in open_parts, f"{kind} reopens {chunk['id']}"
            open_parts[chunk["id"]] = kind.split("-")[0]
        elif kind in ("text-delta", "reasoning-delta", "text-end", "reasoning-end"):
            assert open_parts.get(chunk["id"]) == kind.split("-")[0], f"{kind} without start"
            assert isinstance(chunk.get("delta", ""), str)
            if kind.endswith("-end"):
                del open_parts[chunk["id"]]
        elif kind == "tool-input-start":
            tools[chunk["toolCallId"]] = "input-streaming"
        elif kind == "tool-input-delta":
            assert tools.get(chunk["toolCallId"]) == "input-streaming", "delta without start"
        elif kind == "tool-input-available":
            tools[chunk["toolCallId"]] = "input-available"
        elif kind in ("tool-output-available", "tool-output-error"):
            assert tools.get(chunk["toolCallId"]) == "input-available", "output before input"
            tools[chunk["toolCallId"]] = "output"
        elif kind == "finish":
            reason = chunk.get("finishReason")
            assert reason is None or reason in FINISH_REASONS, reason
            saw_finish = True
    if complete:
        assert stream.events and stream.events[-1].data == "[DONE]", "no [DONE] at the end"
        assert not open_parts, f"parts left open: {open_parts}"


async def stream_request(
    client: Any, method: str, url: str, *, limit: int | None = None, **kwargs: Any
) -> Stream:
    """Send a request and read its SSE body (up to ``limit`` events, then disconnect)."""
    async with client.stream(method, url, **kwargs) as response:
        stream = Stream(response.status_code, dict(response.headers))
        if response.status_code == 200 and response.headers.get("content-type", "").startswith(
            "text/event-stream"
        ):
            await parse_sse(response.aiter_lines(), stream, limit)
        else:
            await response.aread()
            stream.body = response.content  # type: ignore[attr-defined]
        return stream
