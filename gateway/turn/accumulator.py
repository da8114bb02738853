"""What a turn produced: the assistant's content parts, and its token usage.

``ContentBuilder`` builds the parts docs/API.md describes (``reasoning``, ``text``,
``tool-call``) in stream order, merging consecutive deltas of one kind. It takes
the adapters' events and the gateway's own (``gateway.turn.events``: tool outputs,
approvals, step boundaries); a part made after the first model call of the turn
carries ``"step": n``. Text is
kept as a list of fragments until a snapshot is taken, so a long reply costs
O(n), not O(n^2). ``TurnUsage`` keeps one record per adapter call and derives
the totals, the per-model breakdown and the serialized calls stored in
``token_usage``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolResult,
    Usage,
)
from persistence import UsageRecord


def parse_tool_args(text: str) -> Any:
    """A tool call's arguments text as JSON; ``{}`` when empty, the raw text if not JSON."""
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except ValueError:
        return text


class ContentBuilder:
    """Assistant content parts in stream order, deltas of one kind merged."""

    __slots__ = ("_parts", "_fragments", "_open_kind", "_tools", "_version", "_map", "_tool_map",
                 "_step", "_outcomes")

    def __init__(self) -> None:
        self._parts: list[dict[str, Any]] = []
        self._fragments: list[str] = []  # of the open text/reasoning part
        self._open_kind: str | None = None
        self._tools: dict[str, dict[str, Any]] = {}
        self._version = 0
        # How each part was streamed (``event_map``): filled when a part is sealed, from
        # the fragments kept anyway, so the per-token path does no extra work.
        self._map: list[Any] = []
        self._tool_map: dict[str, dict[str, Any]] = {}
        self._step = 0  # the model call the next parts come from
        self._outcomes = 0  # gateway outcomes so far: their order, kept in the event map

    def _seal(self) -> None:
        if self._open_kind is not None:
            self._parts[-1]["text"] = "".join(self._fragments)
            self._map[-1] = [len(f) for f in self._fragments]
            self._open_kind = None
            self._fragments = []

    def _append_text(self, kind: str, text: str) -> None:
        if self._open_kind != kind:
            self._seal()
            self._parts.append({"type": kind, "text": ""} if not self._step
                               else {"type": kind, "text": "", "step": self._step})
            self._map.append([])
            self._open_kind = kind
        self._fragments.append(text)

    def feed(self, event: TurnEvent) -> None:
        """Add one event (events that carry no content are ignored)."""
        self._version += 1
        if type(event) is TextDelta and self._open_kind == "text":
            if event.text:  # the per-token path: one more fragment of the open text
                self._fragments.append(event.text)
        elif type(event) is ReasoningDelta and self._open_kind == "reasoning":
            if event.text:
                self._fragments.append(event.text)
        elif isinstance(event, TextDelta):
            if event.text:
                self._append_text("text", event.text)
        elif isinstance(event, ReasoningDelta):
            if event.text:
                self._append_text("reasoning", event.text)
        elif isinstance(event, ToolCallStart):
            self._seal()
            part: dict[str, Any] = {
                "type": "tool-call",
                "toolCallId": event.id,
                "toolName": event.name,
                "args": {},
                "argsText": "",
            }
            if self._step:
                part["step"] = self._step
            self._tools[event.id] = part
            self._parts.append(part)
            self._tool_map[event.id] = entry = {"args": [], "ended": False}
            self._map.append(entry)
        elif isinstance(event, ToolCallDelta):
            tool = self._tools.get(event.id)
            if tool is not None:
                tool["argsText"] += event.args_text
                if event.args_text:  # as the encoder: an empty fragment is no event
                    self._tool_map[event.id]["args"].append(len(event.args_text))
        elif isinstance(event, ToolCallEnd):
            tool = self._tools.get(event.id)
            if tool is not None:
                tool["args"] = parse_tool_args(tool["argsText"])
                self._tool_map[event.id]["ended"] = True
        elif isinstance(event, ToolResult):
            tool = self._tools.get(event.id)
            if tool is not None:
                # A result from the adapter was produced by the provider itself
                # (e.g. Anthropic's server tools): the provider keeps it, so the
                # history sent back leaves the call out (assistant_steps).
                tool["result"] = event.result
                tool["providerExecuted"] = True
        elif isinstance(event, StepBoundary):
            self._seal()
            self._step = event.step
        else:
            self._gateway_event(event)

    def _gateway_event(self, event: TurnEvent) -> None:
        tool = self._tools.get(getattr(event, "id", ""))
        if tool is None:
            return
        if isinstance(event, ToolRunning):
            tool["state"] = "running"
            return
        entry = self._tool_map[tool["toolCallId"]]
        if isinstance(event, ApprovalRequested):
            tool["approval"] = {"id": event.approval_id}
            entry["approval"] = self._outcomes
        else:
            tool.pop("state", None)
            entry["out"] = self._outcomes
            if isinstance(event, ToolOutput):
                tool["result"] = event.output
            elif isinstance(event, ToolFailed):
                tool["errorText"] = event.error_text
            elif isinstance(event, ToolDenied):
                tool["errorText"] = event.error_text
                tool["denied"] = True
        self._outcomes += 1

    @property
    def step(self) -> int:
        """The model call (from 0) the parts being built come from."""
        return self._step

    def unanswered(self) -> list[dict[str, Any]]:
        """The tool calls of the current step without an output or error (copies)."""
        return [
            dict(p) for p in self._parts
            if p["type"] == "tool-call" and p.get("step", 0) == self._step
            and "result" not in p and "errorText" not in p
        ]

    def provider_run(self) -> frozenset[str]:
        """The ids of the tool calls the provider ran itself (``providerExecuted``)."""
        return frozenset(p["toolCallId"] for p in self._parts
                         if p["type"] == "tool-call" and p.get("providerExecuted"))

    def running(self) -> list[str]:
        """The ids of the tool calls being run now."""
        return [p["toolCallId"] for p in self._parts
                if p["type"] == "tool-call" and p.get("state") == "running"]

    @property
    def version(self) -> int:
        """Changes whenever content may have changed (for checkpoint skipping)."""
        return self._version

    def is_empty(self) -> bool:
        """True if there is no text, reasoning or tool call worth storing."""
        for part in self._parts:
            if part["type"] == "tool-call":
                return False
        if self._open_kind is not None and any(self._fragments):
            return False
        return not any(p.get("text") for p in self._parts)

    def snapshot(self) -> list[dict[str, Any]]:
        """The parts as they stand (a copy; building may go on)."""
        parts = [dict(p) for p in self._parts]
        if self._open_kind is not None:
            parts[-1]["text"] = "".join(self._fragments)
        for part in parts:
            if part["type"] == "tool-call" and part.get("args") == {} and part["argsText"]:
                part["args"] = parse_tool_args(part["argsText"])
        return parts

    def event_map(self) -> list[Any]:
        """How the parts of ``snapshot()`` were streamed, one entry per part: the
        lengths of a text/reasoning part's deltas, ``{"args": [lengths], "ended"}``
        for a tool call. A replay from the stored row re-splits the parts with it, so
        its events carry the live stream's ids (``gateway.turn.replay.replay_chunks``)."""
        if self.is_empty():
            return []
        out: list[Any] = []
        for entry in self._map:
            out.append(dict(entry, args=list(entry["args"])) if isinstance(entry, dict)
                       else entry)
        if self._open_kind is not None:
            out[-1] = [len(f) for f in self._fragments]
        return out

    def text_length(self) -> int:
        """Characters of text, reasoning and tool arguments (for usage estimates)."""
        total = sum(len(f) for f in self._fragments)
        for part in self._parts:
            total += len(part.get("text", "")) + len(part.get("argsText", ""))
        return total


def estimate_tokens(chars: int) -> int:
    """A provider-neutral estimate: about four characters per token."""
    return math.ceil(chars / 4) if chars > 0 else 0


@dataclass(slots=True)
class CallRecord:
    """Token usage of one adapter call."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost_micros": self.cost_micros,
            "estimated": self.estimated,
        }


CostFn = Callable[[str, int, int], int]


@dataclass
class TurnUsage:
    """The token usage of one turn: one record per adapter call, and their totals."""

    cost: CostFn
    calls: list[CallRecord] = field(default_factory=list)
    provisional: Usage | None = None
    #: The call failed before its request reached the provider (connection refused,
    #: DNS, no API key): nothing was consumed, so nothing is estimated.
    unsent: bool = False
    #: A model call started (``start_call``) and has not reported its final figures.
    open_call: bool = False

    @classmethod
    def resumed(cls, cost: CostFn, call_details: list[Any]) -> TurnUsage:
        """The usage of a paused turn continuing: the calls it already made (as
        ``call_details`` stored them), counted once, and the ones to come."""
        calls = [
            CallRecord(str(c["model"]), int(c["prompt_tokens"]), int(c["completion_tokens"]),
                       int(c["cost_micros"]), bool(c.get("estimated", False)))
            for c in call_details if isinstance(c, dict)
        ]
        return cls(cost, calls)

    def start_call(self) -> None:
        """A model call begins (one per step of the turn)."""
        self.open_call, self.provisional, self.unsent = True, None, False

    def end_call(self, model: str, prompt_estimate: int, completion_estimate: int) -> None:
        """A model call ended without error: estimated if it never reported its usage."""
        if self.open_call:
            self.settle(model, prompt_estimate, completion_estimate)

    def failed(self, error: BaseException) -> None:
        """Note how the adapter call failed (``reached_provider`` of upstream errors)."""
        self.unsent = getattr(error, "reached_provider", True) is False

    def add(self, usage: Usage) -> None:
        """Record an adapter's figures for one call (provisional ones wait for the final)."""
        if not usage.final:
            self.provisional = usage
            return
        self.provisional = None
        self.open_call = False
        prompt, completion = max(0, usage.prompt_tokens), max(0, usage.completion_tokens)
        self.calls.append(
            CallRecord(usage.model, prompt, completion, self.cost(usage.model, prompt, completion))
        )

    def settle(self, model: str, prompt_estimate: int, completion_estimate: int) -> None:
        """Close the books of a turn cut short: what the provider reported is kept,
        what it never reported is estimated (and the record says so). A call that
        never reached the provider costs zero and is not an estimate. The estimates
        are of the model call in progress (the last step), the only one not settled."""
        open_call, self.open_call = self.open_call, False
        if self.unsent and self.provisional is None:
            if not self.calls:  # booked as a real zero, so the row says which model failed
                self.calls.append(CallRecord(model, 0, 0, 0))
            return
        if self.provisional is not None:
            p = self.provisional
            self.provisional = None
            self.add_estimate(
                p.model, max(0, p.prompt_tokens), max(p.completion_tokens, completion_estimate)
            )
        elif open_call or not self.calls:
            self.add_estimate(model, prompt_estimate, completion_estimate)

    def add_estimate(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Record an estimate for a call whose provider never reported usage."""
        self.calls.append(
            CallRecord(
                model,
                prompt_tokens,
                completion_tokens,
                self.cost(model, prompt_tokens, completion_tokens),
                estimated=True,
            )
        )

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.calls)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.calls)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_micros(self) -> int:
        return sum(c.cost_micros for c in self.calls)

    @property
    def estimated(self) -> bool:
        return any(c.estimated for c in self.calls)

    def model_breakdown(self) -> dict[str, dict[str, int]]:
        """Totals per model, as stored in ``token_usage.model_breakdown``."""
        out: dict[str, dict[str, int]] = {}
        for c in self.calls:
            row = out.setdefault(
                c.model,
                {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                 "cost_micros": 0, "calls": 0},
            )
            row["prompt_tokens"] += c.prompt_tokens
            row["completion_tokens"] += c.completion_tokens
            row["total_tokens"] += c.total_tokens
            row["cost_micros"] += c.cost_micros
            row["calls"] += 1
        return out

    def call_details(self) -> list[dict[str, Any]]:
        """Every call, as stored in ``token_usage.call_details``."""
        return [c.as_dict() for c in self.calls]

    def record(self, usage_type: str) -> UsageRecord:
        """The ``token_usage`` row of these calls (settle them first)."""
        return UsageRecord(
            usage_type=usage_type,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
            cost_micros=self.cost_micros,
            model_breakdown=self.model_breakdown(),
            call_details=self.call_details(),
            estimated=self.estimated,
        )

    def metadata(self) -> dict[str, Any]:
        """The ``usage`` object of the stream's message metadata."""
        return {
            "inputTokens": self.prompt_tokens,
            "outputTokens": self.completion_tokens,
            "totalTokens": self.total_tokens,
            "costMicros": self.cost_micros,
            "estimated": self.estimated,
        }


__all__ = [
    "CallRecord",
    "ContentBuilder",
    "TurnUsage",
    "estimate_tokens",
    "parse_tool_args",
]
