"""A finished turn's stream, rebuilt from its stored row (for a resume or a retry)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from gateway.turn.chunks import ChunkEncoder
from gateway.turn.events import (
    ApprovalRequested,
    StepBoundary,
    ToolDenied,
    ToolFailed,
    ToolOutput,
    ToolRunning,
    TurnEvent,
)
from llm_adapters.events import (
    FinishReason,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolResult,
)

if TYPE_CHECKING:
    from persistence import Store


class UsageLike(Protocol):
    """What a stored usage row must have (``persistence.rows.UsageRow``)."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def total_tokens(self) -> int: ...
    @property
    def cost_micros(self) -> int: ...
    @property
    def estimated(self) -> bool: ...


def usage_metadata(row: UsageLike) -> dict[str, Any]:
    """A stored usage row as the stream's ``finish`` reports it (``messageMetadata.usage``)."""
    return {
        "inputTokens": row.prompt_tokens, "outputTokens": row.completion_tokens,
        "totalTokens": row.total_tokens, "costMicros": row.cost_micros,
        "estimated": row.estimated,
    }



async def stored_usage(
    store: Store, user_id: int, thread_id: str, message_id: int
) -> dict[str, Any]:
    """The reply's usage from its own row (one indexed lookup), as ``usage_metadata``."""
    rows, _ = await store.list_usage(user_id, thread_id=thread_id, message_id=message_id, limit=1)
    for row in rows:
        return usage_metadata(row)
    return {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0, "costMicros": 0,
            "estimated": True}


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
) -> list[TurnEvent]:
    """The events that would rebuild ``parts`` (for replaying a stored reply).

    With the row's ``event_map`` (``ContentBuilder.event_map``) the deltas are cut
    where the live stream cut them, so the encoder numbers them as it did live: a
    ``Last-Event-ID`` from the live stream resumes exactly after that event. The
    gateway's outcomes of a step (tool outputs, errors, denials, approval requests)
    follow the step's parts in the order they were streamed, then the next step
    begins, as live.
    """
    events: list[TurnEvent] = []
    if not isinstance(event_map, list) or len(event_map) != len(parts):
        event_map = [None] * len(parts)
    step = 0
    outcomes: list[tuple[int, TurnEvent]] = []

    def flush() -> None:
        events.extend(e for _, e in sorted(outcomes, key=lambda o: o[0]))
        outcomes.clear()

    for part, entry in zip(parts, event_map, strict=True):
        kind = part.get("type")
        part_step = part.get("step", 0)
        if type(part_step) is int and part_step > step:
            flush()
            step = part_step
            events.append(StepBoundary(step))
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
            approval = part.get("approval")
            if isinstance(approval, dict) and isinstance(approval.get("id"), str):
                outcomes.append((_order(tool, "approval", len(outcomes)),
                                 ApprovalRequested(call_id, approval["id"])))
            if part.get("state") == "running":
                events.append(ToolRunning(call_id))
            outcome = _outcome(call_id, part)
            if outcome is None:
                continue
            # An output the adapter streamed with the call (the provider ran the tool;
            # rows from before the gateway ran tools mapped no "out" for it) is inline.
            inline = part.get("providerExecuted") is True or (bool(tool) and "out" not in tool)
            if isinstance(outcome, ToolOutput) and inline:
                events.append(ToolResult(call_id, outcome.output))
            else:
                outcomes.append((_order(tool, "out", len(outcomes)), outcome))
    flush()
    return events


def _order(entry: dict[str, Any], key: str, default: int) -> int:
    value = entry.get(key)
    return value if type(value) is int else 1_000_000 + default


def _outcome(call_id: str, part: dict[str, Any]) -> TurnEvent | None:
    if "result" in part:
        return ToolOutput(call_id, part["result"])
    error = part.get("errorText")
    if isinstance(error, str):
        return ToolDenied(call_id, error) if part.get("denied") else ToolFailed(call_id, error)
    return None


_STATUS_REASON: dict[str, FinishReason] = {
    "complete": "stop", "error": "error", "requires_action": "tool-calls",
}


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


__all__ = [
    "UsageLike", "from_list", "replay_chunks", "stored_events", "stored_usage", "usage_metadata",
]
