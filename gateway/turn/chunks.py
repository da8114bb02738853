"""Adapter events → AI SDK "UI message stream" chunks, pre-encoded as SSE bytes.

Every chunk is one ``id: <seq>`` + ``data: <json>`` event; the sequence number
is per turn, so a reconnecting client resumes with ``Last-Event-ID``. Text and
reasoning deltas, the per-token hot path, are formatted without building a
dict. ``None`` is never sent for an optional field and NaN never appears
(``allow_nan=False``), as the SDK's schema requires.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring
from typing import Any

from gateway.turn.accumulator import parse_tool_args
from gateway.turn.events import (
    DENIED_TEXT,
    ApprovalRequested,
    StepBoundary,
    ToolDenied,
    ToolFailed,
    ToolOutput,
    TurnEvent,
)
from llm_adapters.events import (
    Finish,
    FinishReason,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolResult,
)

_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode
# What ``_dumps`` does with a str (JSONEncoder.encode's own branch for one), without
# the method call and type test per token.
_dumps_str = encode_basestring

DONE_DATA = b"data: [DONE]\n\n"


def encode(seq: int, chunk: dict[str, Any]) -> bytes:
    """One SSE event carrying ``chunk`` with id ``seq``."""
    return b"id: %d\ndata: %s\n\n" % (seq, _dumps(chunk).encode())


def encode_done(seq: int) -> bytes:
    """The closing ``data: [DONE]`` event (it has an id too, for resume)."""
    return b"id: %d\n" % seq + DONE_DATA


class ChunkEncoder:
    """Turns one turn's adapter events into encoded chunks, numbering them."""

    __slots__ = ("seq", "_open", "_open_id", "_parts", "_tools", "finish_reason")

    def __init__(self) -> None:
        self.seq = 0
        self._open: str | None = None  # "text" | "reasoning"
        self._open_id = ""
        self._parts = 0
        self._tools: dict[str, tuple[str, list[str]]] = {}
        self.finish_reason: FinishReason | None = None

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        """Encode ``chunk`` with the next sequence number."""
        data = encode(self.seq, chunk)
        self.seq += 1
        return data

    def done(self) -> bytes:
        data = encode_done(self.seq)
        self.seq += 1
        return data

    def start(self, message_id: int, metadata: dict[str, Any]) -> list[bytes]:
        """The opening chunks: ``start`` (server-made message id) and ``start-step``."""
        return [
            self.chunk(
                {"type": "start", "messageId": str(message_id), "messageMetadata": metadata}
            ),
            self.chunk({"type": "start-step"}),
        ]

    def _close_open(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(self.chunk({"type": f"{self._open}-end", "id": self._open_id}))
            self._open = None

    def _delta(self, kind: str, text: str) -> list[bytes]:
        out: list[bytes] = []
        if self._open != kind:
            self._close_open(out)
            self._parts += 1
            self._open, self._open_id = kind, f"{kind[0]}{self._parts}"
            out.append(self.chunk({"type": f"{kind}-start", "id": self._open_id}))
        out.append(
            b'id: %d\ndata: {"type":"%s-delta","id":"%s","delta":%s}\n\n'
            % (self.seq, kind.encode(), self._open_id.encode(), _dumps_str(text).encode())
        )
        self.seq += 1
        return out

    def feed(self, event: TurnEvent) -> list[bytes]:
        """The chunks for one event (possibly none)."""
        if type(event) is TextDelta and self._open == "text" and event.text:
            # The per-token path: one more delta of the open text (or reasoning) part.
            seq = self.seq
            self.seq = seq + 1
            return [b'id: %d\ndata: {"type":"text-delta","id":"%s","delta":%s}\n\n'
                    % (seq, self._open_id.encode(), _dumps_str(event.text).encode())]
        if type(event) is ReasoningDelta and self._open == "reasoning" and event.text:
            seq = self.seq
            self.seq = seq + 1
            return [b'id: %d\ndata: {"type":"reasoning-delta","id":"%s","delta":%s}\n\n'
                    % (seq, self._open_id.encode(), _dumps_str(event.text).encode())]
        if isinstance(event, TextDelta):
            return self._delta("text", event.text) if event.text else []
        if isinstance(event, ReasoningDelta):
            return self._delta("reasoning", event.text) if event.text else []
        out: list[bytes] = []
        if isinstance(event, ToolCallStart):
            self._close_open(out)
            self._tools[event.id] = (event.name, [])
            out.append(
                self.chunk(
                    {"type": "tool-input-start", "toolCallId": event.id, "toolName": event.name}
                )
            )
        elif isinstance(event, ToolCallDelta):
            tool = self._tools.get(event.id)
            if tool is not None and event.args_text:
                tool[1].append(event.args_text)
                out.append(
                    self.chunk(
                        {"type": "tool-input-delta", "toolCallId": event.id,
                         "inputTextDelta": event.args_text}
                    )
                )
        elif isinstance(event, ToolCallEnd):
            tool = self._tools.get(event.id)
            if tool is not None:
                out.append(
                    self.chunk(
                        {"type": "tool-input-available", "toolCallId": event.id,
                         "toolName": tool[0], "input": parse_tool_args("".join(tool[1]))}
                    )
                )
        elif isinstance(event, ToolResult):
            if event.id in self._tools:
                out.append(
                    self.chunk(
                        {"type": "tool-output-available", "toolCallId": event.id,
                         "output": event.result}
                    )
                )
        elif isinstance(event, Finish):
            self.finish_reason = event.reason
        elif isinstance(event, StepBoundary):
            self._close_open(out)
            out.append(self.chunk({"type": "finish-step"}))
            out.append(self.chunk({"type": "start-step"}))
        elif isinstance(event, ToolOutput | ToolFailed | ToolDenied | ApprovalRequested):
            out.append(self.chunk(_outcome_chunk(event)))
        return out

    def end(
        self,
        finish_reason: FinishReason,
        usage: dict[str, Any],
        *,
        error_text: str | None = None,
        aborted: bool = False,
    ) -> list[bytes]:
        """The closing chunks: open parts ended, then error/abort, usage, finish, [DONE]."""
        out: list[bytes] = []
        self._close_open(out)
        out.append(self.chunk({"type": "finish-step"}))
        if error_text is not None:
            out.append(self.chunk({"type": "error", "errorText": error_text}))
        if aborted:
            out.append(self.chunk({"type": "abort", "reason": "cancelled"}))
        out.append(self.chunk({"type": "message-metadata", "messageMetadata": {"usage": usage}}))
        out.append(
            self.chunk(
                {"type": "finish", "finishReason": finish_reason,
                 "messageMetadata": {"usage": usage}}
            )
        )
        out.append(self.done())
        return out


def _outcome_chunk(event: ToolOutput | ToolFailed | ToolDenied | ApprovalRequested
                   ) -> dict[str, Any]:
    if isinstance(event, ToolOutput):
        return {"type": "tool-output-available", "toolCallId": event.id, "output": event.output}
    if isinstance(event, ToolFailed):
        return {"type": "tool-output-error", "toolCallId": event.id,
                "errorText": event.error_text}
    if isinstance(event, ToolDenied):
        return {"type": "tool-output-denied", "toolCallId": event.id}
    return {"type": "tool-approval-request", "approvalId": event.approval_id,
            "toolCallId": event.id}


def events_of_chunks(
    chunks: list[bytes], provider_run: frozenset[str] = frozenset()
) -> list[TurnEvent]:
    """The events that ``ChunkEncoder`` turned into ``chunks`` (their content).

    The inverse of ``feed`` for what a reader was sent: used when a turn is stored as
    it was delivered rather than as it was generated. Chunks without content (start,
    ends, metadata, [DONE]) give nothing. ``provider_run``: the calls whose output
    came from the adapter (the provider ran the tool); other outputs are the gateway's.
    """
    events: list[TurnEvent] = []
    steps = 0
    for data in chunks:
        _, _, body = data.partition(b"\ndata: ")
        if not body.startswith(b"{"):
            continue
        chunk = json.loads(body)
        kind = chunk.get("type")
        if kind == "text-delta":
            events.append(TextDelta(chunk["delta"]))
        elif kind == "reasoning-delta":
            events.append(ReasoningDelta(chunk["delta"]))
        elif kind == "tool-input-start":
            events.append(ToolCallStart(chunk["toolCallId"], chunk["toolName"]))
        elif kind == "tool-input-delta":
            events.append(ToolCallDelta(chunk["toolCallId"], chunk["inputTextDelta"]))
        elif kind == "tool-input-available":
            events.append(ToolCallEnd(chunk["toolCallId"]))
        elif kind == "tool-output-available":
            if chunk["toolCallId"] in provider_run:
                events.append(ToolResult(chunk["toolCallId"], chunk["output"]))
            else:
                events.append(ToolOutput(chunk["toolCallId"], chunk["output"]))
        elif kind == "tool-output-error":
            events.append(ToolFailed(chunk["toolCallId"], chunk["errorText"]))
        elif kind == "tool-output-denied":
            events.append(ToolDenied(chunk["toolCallId"], DENIED_TEXT))
        elif kind == "tool-approval-request":
            events.append(ApprovalRequested(chunk["toolCallId"], chunk["approvalId"]))
        elif kind == "finish-step":
            steps += 1
        elif kind == "start-step" and steps:
            events.append(StepBoundary(steps))
    return events


__all__ = [
    "DONE_DATA", "ChunkEncoder", "encode", "encode_done",
    "events_of_chunks",
]
