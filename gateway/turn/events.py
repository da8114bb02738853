"""The gateway's own events of a turn, beside the adapters' (``llm_adapters.events``).

An adapter's events describe one model call. A turn that runs tools has more to
say: a call the gateway is running, its output or error, a call denied or waiting
for approval, and the boundary between two model calls (steps). ``ContentBuilder``
(the stored parts) and ``ChunkEncoder`` (the stream) consume both kinds, and
``replay`` rebuilds both from a stored row, so the live stream and its replay
stay the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_adapters.events import AdapterEvent

# What the model is told of a denied call (a person's reason follows it).
DENIED_TEXT = "The user denied this tool call."


@dataclass(frozen=True, slots=True)
class ToolRunning:
    """The gateway started running the tool call ``id`` (no chunk; stored as
    ``"state": "running"`` until its outcome arrives)."""

    id: str


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """The output of a tool call the gateway ran, or a client's output."""

    id: str
    output: Any


@dataclass(frozen=True, slots=True)
class ToolFailed:
    """A tool call failed (error, timeout, server down, stopped); the text is for the
    model and the user."""

    id: str
    error_text: str


@dataclass(frozen=True, slots=True)
class ToolDenied:
    """A person denied the tool call ``id``; the model is told ``error_text``."""

    id: str
    error_text: str


@dataclass(frozen=True, slots=True)
class ApprovalRequested:
    """The tool call ``id`` waits for a person's approval (``approval_id``)."""

    id: str
    approval_id: str


@dataclass(frozen=True, slots=True)
class StepBoundary:
    """One model call ended and the next begins; ``step`` numbers the new one (from 0)."""

    step: int


ToolOutcome = ToolOutput | ToolFailed | ToolDenied | ApprovalRequested
TurnEvent = AdapterEvent | ToolRunning | ToolOutcome | StepBoundary

__all__ = [
    "DENIED_TEXT", "ApprovalRequested", "StepBoundary", "ToolDenied", "ToolFailed", "ToolOutcome",
    "ToolOutput", "ToolRunning", "TurnEvent",
]
