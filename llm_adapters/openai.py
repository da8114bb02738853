"""The ``openai`` adapter: any OpenAI-compatible Chat Completions endpoint, streamed.

Works with OpenAI, vLLM, Ollama, llama.cpp's server, OpenRouter, Groq and
DeepSeek as they really stream (the cases: ``tests/fixtures/streams/README.md``):

- text from ``delta.content`` (and ``delta.refusal``); reasoning from
  ``delta.reasoning_content`` (DeepSeek, vLLM) or ``delta.reasoning``
  (OpenRouter, Groq, Ollama); empty and null deltas are skipped;
- tool calls assembled per ``index``: id and name arrive on the first fragment
  only, argument fragments of parallel calls interleave; ``ToolCallStart`` when
  an index first appears, ``ToolCallDelta`` per fragment, ``ToolCallEnd`` for
  every open call when ``finish_reason`` arrives or the stream ends;
- usage is the LAST non-null ``usage`` seen on any chunk (finish chunk or an
  empty-``choices`` chunk; a missing key counts as null), yielded once, just
  before ``Finish``;
- errors inside the stream in both forms seen in the wild: a chunk with a
  top-level ``error`` object (OpenRouter; its usage is yielded before raising)
  and an ``event: error`` frame (Groq) both raise ``UpstreamProtocolError``.

Settings: a :class:`~llm_adapters.base.ProviderConfig` (the gateway passes the
``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` its settings validated); without one
they are read from the environment mapping as the OpenAI SDK reads them:
``OPENAI_BASE_URL`` (includes ``/v1``; default ``https://api.openai.com/v1``) and
``OPENAI_API_KEY`` (optional: local servers need none). ``request.options`` may
carry ``system`` and the usual sampling parameters (see ``PASSTHROUGH_OPTIONS``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio.lowlevel

from llm_adapters._http import HTTPAdapter, as_int, error_summary, loads
from llm_adapters._sse import SSEEvent
from llm_adapters.base import (
    AdapterRequest,
    ChatMessage,
    ToolSpec,
    assistant_steps,
    tool_arguments_text,
    tool_output_text,
)
from llm_adapters.events import (
    AdapterEvent,
    Finish,
    FinishReason,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from turngate.exceptions import UpstreamProtocolError

logger = logging.getLogger("turngate.adapters")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"

#: ``request.options`` keys copied into the request body as they are.
PASSTHROUGH_OPTIONS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "response_format",
    "user",
)

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
    "content_filter": "content-filter",
}


def map_finish_reason(reason: Any) -> FinishReason:
    """The protocol's finish reason for an OpenAI ``finish_reason``."""
    return FINISH_REASONS.get(reason, "other") if isinstance(reason, str) else "other"


def to_openai_tools(tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]]:
    """The tools in Chat Completions form (``{"type": "function", "function": ...}``)."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": dict(tool.input_schema),
            },
        }
        for tool in tools
    ]


def to_openai_messages(
    messages: list[ChatMessage], system: str | None = None
) -> list[dict[str, Any]]:
    """The conversation in Chat Completions format.

    User turns: text, plus one ``image_url`` part per image (data URL). Assistant
    turns, one step at a time (:func:`assistant_steps`): the step's text, its tool
    calls as ``tool_calls``, then one ``tool`` message per call with its result (or
    ``Error: <errorText>``); the next step's text is a new assistant message. Calls
    without an answer are left out, since the API rejects a call without its
    answer. Empty turns (and ``reasoning``/``status`` parts) are not sent.
    """
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": system})
    for message in messages:
        if message.role == "user":
            text = message.prompt_text
            images = [
                p["image"]
                for p in message.parts
                if p.get("type") == "image" and isinstance(p.get("image"), str)
            ]
            if images:
                content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
                content += [{"type": "image_url", "image_url": {"url": url}} for url in images]
                out.append({"role": "user", "content": content})
            elif text:
                out.append({"role": "user", "content": text})
            continue
        for text, calls in assistant_steps(message.parts):
            entry: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                entry["tool_calls"] = [
                    {
                        "id": str(p["toolCallId"]),
                        "type": "function",
                        "function": {
                            "name": str(p.get("toolName") or ""),
                            "arguments": tool_arguments_text(p),
                        },
                    }
                    for p in calls
                ]
            out.append(entry)
            for p in calls:
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": str(p["toolCallId"]),
                        "content": tool_output_text(p),
                    }
                )
    return out


def _is_done(event: SSEEvent) -> bool:
    """The ``data: [DONE]`` that ends a Chat Completions stream."""
    data = event.data
    # A chunk (a JSON object) is no [DONE]: told by its first character, not a strip.
    return data == "[DONE]" or (data[:1] != "{" and data.strip() == "[DONE]")


@dataclass
class _ToolCall:
    id: str
    name: str
    open: bool = True


class _Reply:
    """What one Chat Completions stream said so far. ``feed`` turns the events of one
    read into adapter events in a call of its own, so that none of them (nor their
    parsed chunks) stays referenced by the stream's frame while it waits."""

    __slots__ = ("calls", "done", "error", "finish", "model", "produced", "secrets", "usage")

    def __init__(self, model: str, secrets: tuple[str, ...]) -> None:
        self.model = model
        self.secrets = secrets
        self.usage: tuple[int, int] | None = None
        self.finish: str | None = None
        self.done = False  # [DONE] arrived
        self.produced = False  # an event other than usage or a call's end came out
        # A failure the stream raises once the events before it are out (usage first).
        self.error: UpstreamProtocolError | None = None
        self.calls: dict[int, _ToolCall] = {}

    def usage_event(self) -> Usage:
        assert self.usage is not None
        return Usage(self.model, self.usage[0], self.usage[1])

    def close_calls(self) -> list[AdapterEvent]:
        ends: list[AdapterEvent] = []
        for call in self.calls.values():
            if call.open:
                call.open = False
                ends.append(ToolCallEnd(call.id))
        return ends

    def _fail(self, out: list[AdapterEvent], error: UpstreamProtocolError) -> list[AdapterEvent]:
        if self.usage is not None:
            out.append(self.usage_event())
        self.error = error
        return out

    def feed(self, batch: list[SSEEvent]) -> list[AdapterEvent]:
        """The adapter events of ``batch``; stops at ``[DONE]`` (``done``) or at a
        failure (``error``)."""
        out: list[AdapterEvent] = []
        for event in batch:
            if event.event == "error":
                try:
                    summary = error_summary(json.loads(event.data), self.secrets)
                except ValueError:
                    summary = ""
                return self._fail(out, UpstreamProtocolError(
                    f"openai stream sent an error event ({summary or 'no details'})"
                ))
            data = event.data
            if _is_done(event):
                self.done = True
                return out
            if not data or data.isspace():
                continue
            try:
                chunk = loads(data, "openai")
            except UpstreamProtocolError as exc:
                self.error = exc
                return out
            if not isinstance(chunk, dict):
                self.error = UpstreamProtocolError("openai stream chunk is not a JSON object")
                return out
            chunk_model = chunk.get("model")
            if chunk_model and isinstance(chunk_model, str):
                self.model = chunk_model
            raw_usage = chunk.get("usage")
            if isinstance(raw_usage, dict):
                self.usage = (
                    as_int(raw_usage.get("prompt_tokens")) or 0,
                    as_int(raw_usage.get("completion_tokens")) or 0,
                )
            if chunk.get("error") is not None:
                summary = error_summary(chunk, self.secrets)
                return self._fail(out, UpstreamProtocolError(
                    f"openai stream chunk carried an error ({summary or 'no details'})"
                ))
            choices = chunk.get("choices")
            if not isinstance(choices, list):
                continue
            for choice in choices:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue  # n > 1 is not supported: follow the first choice
                delta = choice.get("delta")
                if type(delta) is dict and len(delta) == 1 and "content" in delta:
                    # The per-token chunk: text only.
                    text = delta["content"]
                    if isinstance(text, str) and text:
                        self.produced = True
                        out.append(TextDelta(text))
                elif isinstance(delta, dict):
                    events = OpenAIAdapter._delta_events(delta, self.calls)
                    if events:
                        self.produced = True
                        out += events
                reason = choice.get("finish_reason")
                if reason is not None:
                    self.finish = str(reason)
                    out += self.close_calls()
        return out


class OpenAIAdapter(HTTPAdapter):
    """Chat Completions streaming over one shared ``httpx.AsyncClient``."""

    name = "openai"

    base_url_env = "OPENAI_BASE_URL"
    api_key_env = "OPENAI_API_KEY"
    default_base_url = DEFAULT_BASE_URL

    def build_body(self, request: AdapterRequest) -> dict[str, Any]:
        """The JSON body of the Chat Completions request for ``request``."""
        options = request.options
        system = options.get("system")
        body: dict[str, Any] = {
            "model": request.model or DEFAULT_MODEL,
            "messages": to_openai_messages(
                request.messages, system if isinstance(system, str) else None
            ),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for key in PASSTHROUGH_OPTIONS:
            if key in options:
                body[key] = options[key]
        if request.tools:
            extra = body.get("tools")
            body["tools"] = to_openai_tools(request.tools) + (
                list(extra) if isinstance(extra, list) else []
            )
        return body

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        body = self.build_body(request)
        reply = _Reply(body["model"], self._secrets())
        let_out = False  # the readers had their turn after the first events
        events = self._sse_batches(
            f"{self.base_url}/chat/completions", self._headers(), body, last=_is_done
        )
        del body  # an idle stream keeps no copy of its request (the history)
        async with aclosing(events) as batches:
            async for batch in batches:
                for out in reply.feed(batch):
                    yield out
                # The last read's events are not held while the stream waits for the next.
                del batch
                if reply.error is not None:
                    raise reply.error
                if reply.produced and not let_out:
                    # The first events are published: let the readers' streams write them
                    # before the rest of what this read brought is worked through (with
                    # a whole short answer in one read, that is its end and final write).
                    let_out = True
                    await anyio.lowlevel.checkpoint()
                    await anyio.lowlevel.checkpoint()
                if reply.done:
                    break
        if not reply.done and reply.finish is None:
            for out in reply.close_calls():
                yield out
            if reply.usage is not None:
                yield reply.usage_event()
            raise UpstreamProtocolError("openai stream ended before it finished")
        for out in reply.close_calls():
            yield out
        if reply.usage is not None:
            yield reply.usage_event()
        yield Finish(map_finish_reason(reply.finish) if reply.finish is not None else "stop")

    @staticmethod
    def _delta_events(delta: dict[str, Any], calls: dict[int, _ToolCall]) -> list[AdapterEvent]:
        out: list[AdapterEvent] = []
        reasoning = delta.get("reasoning_content")
        if not (isinstance(reasoning, str) and reasoning):
            reasoning = delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            out.append(ReasoningDelta(reasoning))
        for key in ("content", "refusal"):
            text = delta.get(key)
            if isinstance(text, str) and text:
                out.append(TextDelta(text))
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for position, fragment in enumerate(tool_calls):
                if not isinstance(fragment, dict):
                    continue
                index = as_int(fragment.get("index"))
                if index is None:
                    index = position
                function = fragment.get("function")
                if not isinstance(function, dict):
                    function = {}
                call = calls.get(index)
                if call is None:
                    call_id = fragment.get("id")
                    name = function.get("name")
                    call = _ToolCall(
                        call_id if isinstance(call_id, str) and call_id
                        else f"call_{uuid.uuid4().hex[:24]}",
                        name if isinstance(name, str) else "",
                    )
                    calls[index] = call
                    out.append(ToolCallStart(call.id, call.name))
                if not call.open:
                    continue
                args = function.get("arguments")
                if isinstance(args, str) and args:
                    out.append(ToolCallDelta(call.id, args))
                elif isinstance(args, dict):  # some local servers send parsed arguments
                    out.append(ToolCallDelta(call.id, json.dumps(args)))
        return out


__all__ = [
    "DEFAULT_BASE_URL",
    "OpenAIAdapter",
    "map_finish_reason",
    "to_openai_messages",
    "to_openai_tools",
]
