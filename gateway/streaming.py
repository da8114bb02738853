"""SSE responses: following a live turn, and replaying a stored one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from gateway.chunks import STREAM_HEADERS, ChunkEncoder
from gateway.context import AppContext
from gateway.relay import LiveTurn
from llm_adapters.events import (
    AdapterEvent,
    FinishReason,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolResult,
)


def _ping() -> ServerSentEvent:
    # A comment, never an event: the AI SDK parses every `data:` as a chunk.
    return ServerSentEvent(comment="ping", sep="\n")


def sse_response(
    ctx: AppContext, body: AsyncIterator[bytes], status: int = 200
) -> EventSourceResponse:
    """An SSE response with the AI SDK headers, pings and a send timeout."""
    return EventSourceResponse(
        body,
        status_code=status,
        headers=STREAM_HEADERS,
        ping=ctx.settings.ping_seconds,
        ping_message_factory=_ping,
        sep="\n",
        send_timeout=ctx.settings.send_timeout,
        shutdown_event=ctx.shutdown_event,
        # Our drain finalizes turns within grace + finalize timeout; sse-starlette's own
        # cut-off must come after it, or in-process servers race it.
        shutdown_grace_period=ctx.settings.shutdown_grace_seconds
        + ctx.settings.finalize_timeout + 1,
    )


async def follow_live(ctx: AppContext, live: LiveTurn, after: int = -1) -> AsyncIterator[bytes]:
    """Stream a live turn from SSE id ``after``; a departing last reader may cancel it."""
    live.subscribers += 1
    ctx.metrics.active_streams.inc()
    try:
        async for data in live.follow(after):
            yield data
    finally:
        live.subscribers -= 1
        ctx.metrics.active_streams.dec()
        if (
            not live.done
            and live.subscribers == 0
            and ctx.settings.on_disconnect == "cancel"
            and not ctx.runner.draining
        ):
            live.cancel("cancelled")


def stored_events(parts: list[dict[str, Any]]) -> list[AdapterEvent]:
    """The adapter events that would rebuild ``parts`` (for replaying a stored reply)."""
    events: list[AdapterEvent] = []
    for part in parts:
        kind = part.get("type")
        if kind == "text" and part.get("text"):
            events.append(TextDelta(part["text"]))
        elif kind == "reasoning" and part.get("text"):
            events.append(ReasoningDelta(part["text"]))
        elif kind == "tool-call":
            call_id = str(part.get("toolCallId", ""))
            events.append(ToolCallStart(call_id, str(part.get("toolName", ""))))
            if part.get("argsText"):
                events.append(ToolCallDelta(call_id, part["argsText"]))
            events.append(ToolCallEnd(call_id))
            if "result" in part:
                events.append(ToolResult(call_id, part["result"]))
    return events


_STATUS_REASON: dict[str, FinishReason] = {"complete": "stop", "error": "error"}


def replay_chunks(
    *,
    message_id: int,
    user_message_id: int | None,
    thread_id: str,
    turn_id: str,
    parts: list[dict[str, Any]],
    status: str,
    usage: dict[str, Any],
) -> list[bytes]:
    """The whole stream of a finished turn, rebuilt from its stored row."""
    encoder = ChunkEncoder()
    meta: dict[str, Any] = {"threadId": thread_id, "turnId": turn_id}
    if user_message_id is not None:
        meta["userMessageId"] = str(user_message_id)
    out = encoder.start(message_id, meta)
    for event in stored_events(parts):
        out.extend(encoder.feed(event))
    error_text = "The reply failed." if status == "error" else None
    out.extend(
        encoder.end(
            _STATUS_REASON.get(status, "other"), usage, error_text=error_text,
            aborted=status in ("cancelled", "interrupted"),
        )
    )
    return out


async def from_list(chunks: list[bytes], after: int = -1) -> AsyncIterator[bytes]:
    """Yield pre-built chunks after SSE id ``after`` (one write)."""
    rest = chunks[after + 1 :]
    if rest:
        yield b"".join(rest)


__all__ = ["follow_live", "from_list", "replay_chunks", "sse_response", "stored_events"]
