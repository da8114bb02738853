"""SSE responses: following a live turn, and replaying a stored one."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any
from weakref import WeakKeyDictionary

import anyio

from gateway.context import AppContext
from gateway.streaming.relay import LiveTurn
from gateway.streaming.sse import SSEResponse, StreamSet
from gateway.turn.chunks import STREAM_HEADERS, ChunkEncoder
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

logger = logging.getLogger("turngate.stream")

# The open streams of each running app, keyed by its lifespan's shutdown event.
_STREAM_SETS: WeakKeyDictionary[anyio.Event, StreamSet] = WeakKeyDictionary()


def sse_response(ctx: AppContext, body: AsyncIterator[bytes], status: int = 200) -> SSEResponse:
    """An SSE response with the AI SDK headers, ``: ping`` comments and a send timeout."""
    return SSEResponse(
        body,
        status_code=status,
        headers=STREAM_HEADERS,
        ping_seconds=ctx.settings.ping_seconds,
        send_timeout=ctx.settings.send_timeout,
        streams=_stream_set(ctx),
        cleanup_timeout=ctx.settings.finalize_timeout,
    )


def _stream_set(ctx: AppContext) -> StreamSet | None:
    """This app's open streams, and (once) the task that ends them at shutdown."""
    event, task_group = ctx.shutdown_event, ctx.runner.task_group
    if event is None or task_group is None:  # no lifespan: nothing to shut down
        return None
    streams = _STREAM_SETS.get(event)
    if streams is None:
        streams = _STREAM_SETS[event] = StreamSet()
        task_group.start_soon(_end_streams_at_shutdown, ctx, event, streams)
    return streams


def _uvicorn_exiting() -> bool:
    """Whether the uvicorn server that handles SIGTERM here wants to exit.

    ``turngate serve`` sets the shutdown event itself at the signal; a plain
    uvicorn server (tests, embedding) never tells the app until its connections
    are closed, so, as sse-starlette's exit watcher did, look at it.
    """
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))


async def _end_streams_at_shutdown(ctx: AppContext, event: anyio.Event, streams: StreamSet) -> None:
    """One task per app: at shutdown, end the streams the drain did not end.

    Setting the event starts the app's drain (``gateway.app``), which finalizes
    running turns within the grace period plus one finalize deadline; their
    streams then end by themselves with finish and ``[DONE]``. Whatever is still
    open a second after that (a follower of another replica's turn, a stuck
    reader) is ended here, cleanly, before uvicorn's own graceful timeout.
    """
    while not event.is_set():
        with anyio.move_on_after(0.5):
            await event.wait()
        if not event.is_set() and _uvicorn_exiting():
            event.set()
    settings = ctx.settings
    await anyio.sleep(settings.shutdown_grace_seconds + settings.finalize_timeout + 1)
    cut = streams.cut_all()
    if cut:
        logger.warning("streams_cut_at_shutdown count=%d", cut,
                       extra={"event": "streams_cut_at_shutdown", "count": cut})


async def follow_live(ctx: AppContext, live: LiveTurn, after: int = -1) -> AsyncIterator[bytes]:
    """Stream a live turn from SSE id ``after``; the last reader out may end it.

    What happens to a turn nobody reads any more is the runner's disconnect policy
    (``TurnRunner.on_unread``); this only tells it which chunk went out last.
    """
    live.reader_joined()
    ctx.metrics.active_streams.inc()
    delivered = after
    try:
        # aclosing: a departing reader must release the inner generator (and its
        # waiter count) at once, not whenever the garbage collector gets to it.
        async with aclosing(live.batches(after)) as batches:
            async for first, chunks in batches:
                yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
                delivered = first + len(chunks) - 1  # handed to the transport
    finally:
        ctx.metrics.active_streams.dec()
        live.reader_left(delivered)


def _split(text: str, lengths: Any) -> list[str]:
    """``text`` cut at the stored delta lengths; one piece if they do not add up to it
    (no map, a row written before maps were kept, or one that does not match)."""
    if (
        isinstance(lengths, list) and lengths
        and all(type(n) is int and n > 0 for n in lengths)
        and sum(lengths) == len(text)
    ):
        out, at = [], 0
        for n in lengths:
            out.append(text[at : at + n])
            at += n
        return out
    return [text] if text else []


def stored_events(
    parts: list[dict[str, Any]], event_map: list[Any] | None = None
) -> list[AdapterEvent]:
    """The adapter events that would rebuild ``parts`` (for replaying a stored reply).

    With the row's ``event_map`` (``ContentBuilder.event_map``) the deltas are cut
    where the live stream cut them, so the encoder numbers them as it did live: a
    ``Last-Event-ID`` from the live stream resumes exactly after that event.
    """
    events: list[AdapterEvent] = []
    if not isinstance(event_map, list) or len(event_map) != len(parts):
        event_map = [None] * len(parts)
    for part, entry in zip(parts, event_map, strict=True):
        kind = part.get("type")
        if kind == "text" and part.get("text"):
            events.extend(TextDelta(t) for t in _split(part["text"], entry))
        elif kind == "reasoning" and part.get("text"):
            events.extend(ReasoningDelta(t) for t in _split(part["text"], entry))
        elif kind == "tool-call":
            call_id = str(part.get("toolCallId", ""))
            tool = entry if isinstance(entry, dict) else {}
            events.append(ToolCallStart(call_id, str(part.get("toolName", ""))))
            for fragment in _split(str(part.get("argsText") or ""), tool.get("args")):
                events.append(ToolCallDelta(call_id, fragment))
            if tool.get("ended", True):
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
    event_map: list[Any] | None = None,
) -> list[bytes]:
    """The whole stream of a finished turn, rebuilt from its stored row (and its
    ``event_map``: then with the live stream's event ids; see ``stored_events``)."""
    encoder = ChunkEncoder()
    meta: dict[str, Any] = {"threadId": thread_id, "turnId": turn_id}
    if user_message_id is not None:
        meta["userMessageId"] = str(user_message_id)
    out = encoder.start(message_id, meta)
    for event in stored_events(parts, event_map):
        out.extend(encoder.feed(event))
    stored = [p.get("errorText") for p in parts if p.get("type") == "error"]
    error_text = (str(stored[-1]) if stored else "The reply failed.") if status == "error" else None
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
