"""The events an adapter yields, in the order the model produced them.

Adapters translate a provider's stream into these; the gateway turns them into
UI-message-stream chunks and persisted content parts. They are small frozen
dataclasses with slots, because one is made per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

FinishReason = Literal["stop", "length", "content-filter", "tool-calls", "error", "other"]


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of the reply's visible text."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning ("thinking") text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A tool call begins; its arguments follow as ``ToolCallDelta``s."""

    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a tool call's JSON arguments text."""

    id: str
    args_text: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """All arguments of the tool call ``id`` have arrived."""

    id: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The result of a tool call (for tools executed by the adapter or provider)."""

    id: str
    result: Any


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one upstream call, as cumulative figures (not increments).

    An adapter yields one final ``Usage`` per upstream call. It may yield a
    provisional one first (``final=False``, e.g. the input tokens a provider
    reports when its stream opens), so that a turn cut short still bills the
    figures the provider did report, with only the rest estimated.
    """

    model: str
    prompt_tokens: int
    completion_tokens: int
    final: bool = True


@dataclass(frozen=True, slots=True)
class Finish:
    """The upstream call ended normally, with the protocol's finish reason."""

    reason: FinishReason = "stop"


AdapterEvent = (
    TextDelta
    | ReasoningDelta
    | ToolCallStart
    | ToolCallDelta
    | ToolCallEnd
    | ToolResult
    | Usage
    | Finish
)

__all__ = [
    "AdapterEvent",
    "Finish",
    "FinishReason",
    "ReasoningDelta",
    "TextDelta",
    "ToolCallDelta",
    "ToolCallEnd",
    "ToolCallStart",
    "ToolResult",
    "Usage",
]
