"""A turn's steps: call the model, run the tools it called, call it again.

``TurnSteps.run`` is the generation of one turn (``lifecycle._generate`` runs it
inside the turn's cancel scope). Each model call is one step, streamed between
``start-step`` and ``finish-step``. After a call that ended with tool calls, the
gateway answers each one:

- a tool of an MCP server (``ToolHub``) runs now, the calls of one step
  concurrently in a task group, each cut at its server's timeout (``ToolHub.call``);
  its output (``tool-output-available``, at most ``MAX_OUTPUT_CHARS`` characters
  of it) or its error (``tool-output-error``) goes to the user and the model;
- a tool whose server requires approval streams ``tool-approval-request`` and
  waits for a person; a client-side tool (declared by the turn) waits for the
  client's output. Either pauses the turn: it ends as ``requires_action``, and a
  continuation (``Answers``) picks it up with the same assistant message.

Then the model is called again with the calls and their answers, until it answers
without calling a tool, or after ``max_steps`` calls (an error to the user).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio

from gateway.streaming.relay import LiveTurn
from gateway.turn.accumulator import ContentBuilder, TurnUsage, estimate_tokens
from gateway.turn.chunks import ChunkEncoder
from gateway.turn.events import (
    DENIED_TEXT,
    ApprovalRequested,
    StepBoundary,
    ToolDenied,
    ToolFailed,
    ToolOutput,
    ToolRunning,
    TurnEvent,
)
from llm_adapters.base import Adapter, AdapterRequest, ChatMessage, ToolSpec
from llm_adapters.events import Usage

if TYPE_CHECKING:
    from gateway.tools.servers import ToolHub
    from persistence.store import Store

logger = logging.getLogger("turngate.tools")

#: The most characters of one tool output given to the model and stored; a longer
#: output is cut and says so (a tool's output is untrusted and unbounded).
MAX_OUTPUT_CHARS = 32_000
#: The most user names a tool hub remembers (by user id) before it starts afresh.
USER_NAMES_CACHED = 10_000
#: What a tool call still running when its turn ended is stored with.
STOPPED_TEXT = "The reply was stopped while this tool was running; its outcome is unknown."


def max_steps_text(steps: int) -> str:
    """The error the user sees when the model still called tools after ``steps`` calls."""
    return (f"The reply stopped after {steps} model calls without a final answer "
            f"(the limit, TURNGATE_MAX_STEPS, is {steps}).")


def withheld_text(name: str) -> str:
    """The error of a call of the tool ``name``, which this turn's user may not use."""
    return (f"tool {name!r} is not available to this user (its MCP server's \"users\" "
            "do not list them); it was not called")


def cap_output(output: Any) -> Any:
    """``output`` if its text fits ``MAX_OUTPUT_CHARS``, else the first that many
    characters of its text followed by a line saying how long it was."""
    text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False,
                                                             default=str)
    if len(text) <= MAX_OUTPUT_CHARS:
        return output
    return (f"{text[:MAX_OUTPUT_CHARS]}\n[output truncated: {len(text)} characters, "
            f"the first {MAX_OUTPUT_CHARS} shown]")


@dataclass(frozen=True, slots=True)
class Toolbox:
    """The tools of one turn: the MCP servers' (run here) and the client's (declared
    by the turn, run by the client)."""

    hub: ToolHub | None = None
    client: Mapping[str, ToolSpec] = field(default_factory=dict)
    #: The turn's user by name, for the servers whose ``users`` say who may use them
    #: (None: only the servers open to every user).
    user: str | None = None

    @property
    def specs(self) -> tuple[ToolSpec, ...]:
        """Every tool offered to the model."""
        hub = self.hub.specs_for(self.user) if self.hub is not None else ()
        return (*hub, *self.client.values())

    def withheld(self, name: str) -> bool:
        """Whether ``name`` is an MCP server's tool that this turn's user may not use:
        never offered, and a call of it fails without running."""
        return (name not in self.client and self.hub is not None
                and self.hub.get(name) is not None and not self.hub.allows(name, self.user))


async def toolbox_for(
    hub: ToolHub | None, store: Store, user_id: int,
    client: Mapping[str, ToolSpec] | None = None,
) -> Toolbox:
    """The tools of a turn of ``user_id``: the user's name is read (once per user and
    process: names do not change) only when some server lists its ``users``."""
    if hub is None or not hub.restricted:
        return Toolbox(hub, client or {})
    name = hub.user_names.get(user_id)
    if name is None:
        name = await store.user_name(user_id)
        if name is not None:
            if len(hub.user_names) >= USER_NAMES_CACHED:
                hub.user_names.clear()
            hub.user_names[user_id] = name
    return Toolbox(hub, client or {}, name)


@dataclass(frozen=True, slots=True)
class Decision:
    """A person's answer to an approval request."""

    approved: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Answers:
    """What a continuation brings: approval decisions by ``approvalId``, and client
    tool outputs by ``toolCallId`` (``ToolOutput`` or ``ToolFailed``)."""

    approvals: Mapping[str, Decision] = field(default_factory=dict)
    outputs: Mapping[str, ToolOutput | ToolFailed] = field(default_factory=dict)


def check_answers(parts: list[dict[str, Any]], answers: Answers) -> str | None:
    """Why ``answers`` cannot continue the paused reply ``parts`` (an unknown or
    answered ``approvalId`` or ``toolCallId``, nothing answered), or None."""
    waiting = [p for p in parts if p.get("type") == "tool-call"
               and "result" not in p and "errorText" not in p]
    approvals = {str(p["approval"]["id"]) for p in waiting
                 if isinstance(p.get("approval"), dict)}
    calls = {str(p.get("toolCallId")) for p in waiting if not isinstance(p.get("approval"), dict)}
    if not answers.approvals and not answers.outputs:
        return "nothing to continue with: give approvals or toolOutputs"
    for approval_id in answers.approvals:
        if approval_id not in approvals:
            return (f"approvalId {approval_id[:80]!r} is not waiting for an answer; "
                    f"waiting: {sorted(approvals) or 'none'}")
    for call_id in answers.outputs:
        if call_id not in calls:
            return (f"toolCallId {call_id[:80]!r} does not wait for a client output; "
                    f"waiting: {sorted(calls) or 'none'}")
    return None


def keep_pending(parts: list[dict[str, Any]], answers: Answers) -> Answers:
    """Only the answers the paused reply ``parts`` waits for (a client's copy of the
    message also carries the answers of earlier steps)."""
    waiting = [p for p in parts if p.get("type") == "tool-call"
               and "result" not in p and "errorText" not in p]
    approvals = {str(p["approval"]["id"]) for p in waiting
                 if isinstance(p.get("approval"), dict)}
    calls = {str(p.get("toolCallId")) for p in waiting if not isinstance(p.get("approval"), dict)}
    return Answers(
        {k: v for k, v in answers.approvals.items() if k in approvals},
        {k: v for k, v in answers.outputs.items() if k in calls},
    )


def client_tools_json(tools: Mapping[str, ToolSpec]) -> list[dict[str, Any]]:
    """Client-side tools as the turn body declares them (and ``resume_with`` keeps them)."""
    return [{"name": t.name, "description": t.description, "inputSchema": dict(t.input_schema)}
            for t in tools.values()]


def client_tools_of(raw: Any) -> dict[str, ToolSpec]:
    """``client_tools_json``'s inverse (entries that do not fit are skipped)."""
    out: dict[str, ToolSpec] = {}
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            schema = item.get("inputSchema")
            out[item["name"]] = ToolSpec(
                item["name"], str(item.get("description") or ""),
                schema if isinstance(schema, dict) else {"type": "object", "properties": {}})
    return out


class TurnSteps:
    """One turn's model calls and tool calls, feeding ``content``, ``usage`` and the stream.

    ``request`` is the first model call's (the history, ending with the user's
    message); later calls add the assistant message so far (its answered calls).
    """

    def __init__(
        self,
        live: LiveTurn,
        adapter: Adapter,
        request: AdapterRequest,
        encoder: ChunkEncoder,
        *,
        model_string: str,
        toolbox: Toolbox,
        max_steps: int,
        cost: Callable[[str, int, int], int],
        content: ContentBuilder | None = None,
        usage: TurnUsage | None = None,
        on_first_event: Callable[[], None] | None = None,
    ) -> None:
        self.live = live
        self.adapter = adapter
        self.base = replace(request, tools=toolbox.specs) if toolbox.specs else request
        self.current = self.base  # the request of the model call in progress (or last)
        self.encoder = encoder
        self.model_string = model_string
        self.toolbox = toolbox
        self.max_steps = max_steps
        self.content = content if content is not None else ContentBuilder()
        self.usage = usage if usage is not None else TurnUsage(cost)
        self._on_first_event = on_first_event
        self._call_chars = 0  # content characters when the model call in progress began

    def emit(self, event: TurnEvent) -> None:
        """Add ``event`` to the content and stream it."""
        self.content.feed(event)
        self.live.publish(self.encoder.feed(event))

    def estimates(self) -> tuple[int, int]:
        """Estimated prompt and completion tokens of the model call in progress, for
        a call that never reported its usage."""
        prompt_chars = sum(len(m.text) for m in self.current.messages)
        return (estimate_tokens(prompt_chars),
                estimate_tokens(max(0, self.content.text_length() - self._call_chars)))

    async def run(self, answers: Answers | None = None) -> tuple[str, str | None]:
        """Run the turn (or continue a paused one with ``answers``) until it ends:
        ``("complete", None)``, ``("requires_action", None)`` (paused), or
        ``("error", text)`` (too many steps). Upstream errors and cancellation propagate."""
        if answers is not None:
            if await self._answer(self.content.unanswered(), answers):
                return "requires_action", None
            if (ended := self._next_step()) is not None:
                return ended
        while True:
            await self._model_call()
            calls = self.content.unanswered()
            if not calls or not (self.toolbox.specs or any(
                    self.toolbox.withheld(str(c["toolName"])) for c in calls)):
                # With no tools of the gateway's own offered, a call is to a tool the
                # caller passed in the provider's options: the turn ends with it, for
                # the caller to run (a call of a tool withheld from this user is
                # answered with an error below).
                return "complete", None
            if await self._answer(calls, None):
                return "requires_action", None
            if (ended := self._next_step()) is not None:
                return ended

    def _next_step(self) -> tuple[str, str | None] | None:
        if self.content.step + 1 >= self.max_steps:
            return "error", max_steps_text(self.max_steps)
        self.emit(StepBoundary(self.content.step + 1))
        return None

    async def _model_call(self) -> None:
        messages = list(self.base.messages)
        if not self.content.is_empty():
            messages.append(ChatMessage("assistant", self.content.snapshot()))
        self.current = replace(self.base, messages=messages)
        self.usage.start_call()
        self._call_chars = self.content.text_length()
        # ``emit``, with its three steps looked up once per call, not once per event.
        feed, encode, publish = self.content.feed, self.encoder.feed, self.live.publish
        async with aclosing(self.adapter.stream(self.current)) as events:
            async for event in events:
                if type(event) is Usage:
                    self.usage.add(event)
                    continue
                if self._on_first_event is not None:
                    self._on_first_event()
                    self._on_first_event = None
                feed(event)
                publish(encode(event))
        self.usage.end_call(self.model_string, *self.estimates())

    async def _answer(self, calls: list[dict[str, Any]], answers: Answers | None) -> bool:
        """Answer what can be answered now (running tools concurrently); True if a
        call still waits for a person or the client."""
        runnable: list[dict[str, Any]] = []
        waiting = False
        hub = self.toolbox.hub
        for call in calls:
            call_id, name = str(call["toolCallId"]), str(call["toolName"])
            approval = call.get("approval")
            if answers is not None and call_id in answers.outputs:
                self.emit(answers.outputs[call_id])
            elif self.toolbox.withheld(name):
                # Never offered to this user (or no longer, after an approval): it
                # does not run, not even once approved.
                self.emit(ToolFailed(call_id, withheld_text(name)))
            elif isinstance(approval, dict):
                decision = answers.approvals.get(approval["id"]) if answers else None
                if decision is None:
                    waiting = True
                elif decision.approved:
                    runnable.append(call)
                else:
                    reason = f" Reason: {decision.reason}" if decision.reason else ""
                    self.emit(ToolDenied(call_id, DENIED_TEXT + reason))
            elif name in self.toolbox.client:
                waiting = True
            elif hub is not None and hub.needs_approval(name):
                self.emit(ApprovalRequested(call_id, f"approval_{uuid.uuid4().hex}"))
                waiting = True
            else:
                runnable.append(call)
        if runnable:
            for call in runnable:
                self.emit(ToolRunning(str(call["toolCallId"])))
            async with anyio.create_task_group() as tg:
                for call in runnable:
                    tg.start_soon(self._run_tool, call)
        return waiting

    async def _run_tool(self, call: dict[str, Any]) -> None:
        from gateway.tools.servers import ToolError

        call_id, name = str(call["toolCallId"]), str(call["toolName"])
        hub = self.toolbox.hub
        try:
            if hub is None:
                raise ToolError(f"unknown tool {name!r}: this gateway has no tools")
            if self.toolbox.withheld(name):
                raise ToolError(withheld_text(name))
            if hub.get(name) is None:
                # The hub's own sentence would list every tool, those withheld too.
                known = ", ".join(sorted(s.name for s in self.toolbox.specs
                                         if hub.get(s.name) is not None)) or "none"
                raise ToolError(f"unknown tool {name!r}; the tools are: {known}")
            output = await hub.call(name, call.get("args"))
        except ToolError as exc:
            logger.info("tool_failed turn_id=%s tool=%s: %s", self.live.turn_id, name, exc,
                        extra={"event": "tool_failed", "turn_id": self.live.turn_id,
                               "tool": name})
            self.emit(ToolFailed(call_id, str(exc)))
        except Exception:
            logger.exception("tool_failed turn_id=%s tool=%s", self.live.turn_id, name)
            self.emit(ToolFailed(call_id, f"tool {name!r} failed because of an internal "
                                          "error of the gateway"))
        else:
            self.emit(ToolOutput(call_id, cap_output(output)))

    def stop_running(self) -> list[ToolFailed]:
        """The turn ends while tools run: each running call is answered ``STOPPED_TEXT``
        (streamed and stored); the events, for a copy of the content."""
        stopped = [ToolFailed(call_id, STOPPED_TEXT) for call_id in self.content.running()]
        for event in stopped:
            self.emit(event)
        return stopped


__all__ = [
    "MAX_OUTPUT_CHARS", "STOPPED_TEXT", "Answers", "Decision", "Toolbox", "TurnSteps",
    "USER_NAMES_CACHED", "cap_output", "check_answers", "client_tools_json", "client_tools_of",
    "keep_pending", "max_steps_text", "toolbox_for", "withheld_text",
]
