"""The ``anthropic`` adapter: the Messages API, streamed.

Events handled (the cases: ``tests/fixtures/streams/README.md``):

- ``message_start``: the model and the first usage figures;
- content blocks: ``text`` -> ``TextDelta``; ``thinking`` (``thinking_delta`` ->
  ``ReasoningDelta``; ``signature_delta`` is not output); ``tool_use`` and
  ``server_tool_use`` -> ``ToolCallStart`` at block start, ``ToolCallDelta`` per
  non-empty ``input_json_delta`` fragment, ``ToolCallEnd`` at block stop (a block
  whose ``input`` arrived whole at start, with no deltas, sends it as one
  fragment); server tool results (``*_tool_result`` blocks with a
  ``tool_use_id``) -> ``ToolResult``;
- ``message_delta``: the stop reason and cumulative usage; the LAST value of each
  count wins (``input_tokens`` can grow past ``message_start``'s);
- ``ping`` and unknown event types are ignored; an ``error`` event raises
  ``UpstreamProtocolError`` (after yielding the usage known so far).

The stream may end without ``message_stop`` (or without the blank line after
it): once a stop reason was seen the turn finishes normally at EOF.

Prompt tokens are ``input_tokens`` plus the cache-creation and cache-read input
tokens, so that everything the provider processed is counted.

Settings: a :class:`~llm_adapters.base.ProviderConfig` (the gateway passes the
``ANTHROPIC_BASE_URL`` and ``ANTHROPIC_API_KEY`` its settings validated); without
one they are read from the environment mapping as the Anthropic SDK reads them:
``ANTHROPIC_BASE_URL`` (no ``/v1``; default ``https://api.anthropic.com``) and
``ANTHROPIC_API_KEY`` (sent as ``x-api-key``). ``request.options`` may carry
``max_tokens`` (default 4096), ``system`` and the parameters in ``PASSTHROUGH_OPTIONS``.
"""

from __future__ import annotations

import json
import logging
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
    ToolResult,
    Usage,
)
from turngate.exceptions import UpstreamProtocolError

logger = logging.getLogger("turngate.adapters")

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_MODEL = "claude-sonnet-4-5"
DEFAULT_MAX_TOKENS = 4096
API_VERSION = "2023-06-01"

PASSTHROUGH_OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "thinking",
    "tools",
    "tool_choice",
    "metadata",
)

STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool-calls",
}

_TOOL_BLOCKS = ("tool_use", "server_tool_use")
_USAGE_KEYS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


def map_stop_reason(reason: Any) -> FinishReason:
    """The protocol's finish reason for an Anthropic ``stop_reason``."""
    return STOP_REASONS.get(reason, "other") if isinstance(reason, str) else "other"


def _image_block(url: str) -> dict[str, Any] | None:
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, params = header.partition(";")
        if not sep or "base64" not in params.split(";"):
            return None
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type or "image/png", "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    return None


def to_anthropic_tools(tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]]:
    """The tools in Messages API form (``{name, description, input_schema}``)."""
    return [
        {"name": t.name, "description": t.description, "input_schema": dict(t.input_schema)}
        for t in tools
    ]


def _tool_input(part: dict[str, Any]) -> Any:
    args = part.get("args")
    if isinstance(args, dict):
        return args
    try:
        parsed = json.loads(tool_arguments_text(part))
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def to_anthropic_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation in Messages API format.

    User turns: text, plus one base64 ``image`` block per data-URL image. Assistant
    turns, one step at a time (:func:`llm_adapters.base.assistant_steps`): a
    ``text`` block and one ``tool_use`` block per call, then a user message of
    ``tool_result`` blocks (``is_error`` for a call that failed or was denied); a
    following user turn's blocks join that message, since the API wants the
    roles to alternate. Calls without an answer and empty turns are not sent.
    """
    out: list[dict[str, Any]] = []

    def add_user(content: list[dict[str, Any]]) -> None:
        last = out[-1] if out else None
        if last is not None and last["role"] == "user" and isinstance(last["content"], list):
            last["content"].extend(content)
        else:
            out.append({"role": "user", "content": content})

    for message in messages:
        if message.role == "user":
            text = message.prompt_text
            blocks = [
                block
                for p in message.parts
                if p.get("type") == "image" and isinstance(p.get("image"), str)
                for block in [_image_block(p["image"])]
                if block is not None
            ]
            previous = out[-1]["content"] if out and out[-1]["role"] == "user" else None
            after_tools = isinstance(previous, list) and any(
                b.get("type") == "tool_result" for b in previous
            )
            if blocks or after_tools:
                content = ([{"type": "text", "text": text}] if text else []) + blocks
                if content:
                    add_user(content)
            elif text:
                out.append({"role": "user", "content": text})
            continue
        for text, calls in assistant_steps(message.parts):
            if not calls:
                out.append({"role": "assistant", "content": text})
                continue
            assistant: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            assistant += [
                {
                    "type": "tool_use",
                    "id": str(p["toolCallId"]),
                    "name": str(p.get("toolName") or ""),
                    "input": _tool_input(p),
                }
                for p in calls
            ]
            out.append({"role": "assistant", "content": assistant})
            results: list[dict[str, Any]] = []
            for p in calls:
                block: dict[str, Any] = {
                    "type": "tool_result",
                    "tool_use_id": str(p["toolCallId"]),
                    "content": tool_output_text(p),
                }
                if "result" not in p:
                    block["is_error"] = True
                results.append(block)
            add_user(results)
    return out


def _is_stop(event: SSEEvent) -> bool:
    """The ``message_stop`` event that ends a Messages stream."""
    return event.event == "message_stop"


@dataclass
class _Block:
    type: str
    id: str = ""
    initial_input: Any = None
    fragments: int = 0


class AnthropicAdapter(HTTPAdapter):
    """Messages API streaming over one shared ``httpx.AsyncClient``."""

    name = "anthropic"

    base_url_env = "ANTHROPIC_BASE_URL"
    api_key_env = "ANTHROPIC_API_KEY"
    default_base_url = DEFAULT_BASE_URL

    def build_body(self, request: AdapterRequest) -> dict[str, Any]:
        """The JSON body of the Messages request for ``request``."""
        options = request.options
        max_tokens = as_int(options.get("max_tokens"))
        body: dict[str, Any] = {
            "model": request.model or DEFAULT_MODEL,
            "max_tokens": max_tokens if max_tokens and max_tokens > 0 else DEFAULT_MAX_TOKENS,
            "messages": to_anthropic_messages(request.messages),
            "stream": True,
        }
        system = options.get("system")
        if isinstance(system, str | list) and system:
            body["system"] = system
        for key in PASSTHROUGH_OPTIONS:
            if key in options:
                body[key] = options[key]
        if request.tools:
            extra = body.get("tools")
            body["tools"] = to_anthropic_tools(request.tools) + (
                list(extra) if isinstance(extra, list) else []
            )
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        body = self.build_body(request)
        model: str = body["model"]
        counts: dict[str, int] = {}
        stop_reason: str | None = None
        stopped = False
        produced = let_out = False  # content was yielded; the readers had their turn
        blocks: dict[int, _Block] = {}

        def usage_event() -> Usage | None:
            if not counts:
                return None
            prompt = sum(counts.get(k, 0) for k in _USAGE_KEYS[:3])
            return Usage(model, prompt, counts.get("output_tokens", 0))

        def take_usage(raw: Any) -> None:
            if isinstance(raw, dict):
                for key in _USAGE_KEYS:
                    value = as_int(raw.get(key))
                    if value is not None:
                        counts[key] = value

        def end_open_blocks() -> list[AdapterEvent]:
            ends: list[AdapterEvent] = [
                ToolCallEnd(b.id) for b in blocks.values() if b.type in _TOOL_BLOCKS
            ]
            blocks.clear()
            return ends

        events = self._sse_batches(
            f"{self.base_url}/v1/messages", self._headers(), body, last=_is_stop
        )
        async with aclosing(events) as batches:
            async for batch in batches:
                for event in batch:
                    kind = event.event
                    if kind == "ping":
                        continue
                    payload = loads(event.data, "anthropic")
                    if not isinstance(payload, dict):
                        raise UpstreamProtocolError(
                            "anthropic stream event is not a JSON object"
                        )
                    if kind == "message" and isinstance(payload.get("type"), str):
                        kind = payload["type"]  # a frame without an ``event:`` line
                    if kind == "error":
                        usage = usage_event()
                        if usage is not None:
                            yield usage
                        summary = error_summary(payload, self._secrets())
                        raise UpstreamProtocolError(
                            "anthropic stream sent an error event "
                            f"({summary or 'no details'})"
                        )
                    if kind == "content_block_delta":
                        delta = payload.get("delta")
                        if type(delta) is dict and delta.get("type") == "text_delta":
                            # The per-token event: text, whatever its block.
                            text = delta.get("text")
                            if isinstance(text, str) and text:
                                produced = True
                                yield TextDelta(text)
                            continue
                        for out in self._block_delta(payload, blocks):
                            produced = True
                            yield out
                    elif kind == "message_start":
                        message = payload.get("message")
                        if isinstance(message, dict):
                            if isinstance(message.get("model"), str) and message["model"]:
                                model = message["model"]
                            take_usage(message.get("usage"))
                            start = usage_event()
                            if start is not None:  # real input tokens, even if cut short
                                yield Usage(start.model, start.prompt_tokens,
                                            start.completion_tokens, final=False)
                    elif kind == "content_block_start":
                        for out in self._block_start(payload, blocks):
                            produced = True
                            yield out
                    elif kind == "content_block_stop":
                        index = as_int(payload.get("index"))
                        block = blocks.pop(index, None) if index is not None else None
                        if block is not None and block.type in _TOOL_BLOCKS:
                            if block.fragments == 0 and block.initial_input:
                                yield ToolCallDelta(block.id, json.dumps(block.initial_input))
                            yield ToolCallEnd(block.id)
                    elif kind == "message_delta":
                        delta = payload.get("delta")
                        if isinstance(delta, dict) and delta.get("stop_reason") is not None:
                            stop_reason = str(delta["stop_reason"])
                        take_usage(payload.get("usage"))
                    elif kind == "message_stop":
                        stopped = True
                        break
                    # anything else (new event types) is ignored
                if produced and not let_out:
                    # The first content is published: let the readers' streams write it
                    # before the rest of what this read brought is worked through.
                    let_out = True
                    await anyio.lowlevel.checkpoint()
                    await anyio.lowlevel.checkpoint()
                if stopped:
                    break
        for out in end_open_blocks():
            yield out
        usage = usage_event()
        if usage is not None:
            yield usage
        if not stopped and stop_reason is None:
            raise UpstreamProtocolError("anthropic stream ended before it finished")
        yield Finish(map_stop_reason(stop_reason) if stop_reason is not None else "stop")

    @staticmethod
    def _block_start(payload: dict[str, Any], blocks: dict[int, _Block]) -> list[AdapterEvent]:
        index = as_int(payload.get("index"))
        raw = payload.get("content_block")
        if index is None or not isinstance(raw, dict):
            return []
        kind = str(raw.get("type") or "")
        block = _Block(kind)
        blocks[index] = block
        if kind == "text" and isinstance(raw.get("text"), str) and raw["text"]:
            return [TextDelta(raw["text"])]
        if kind == "thinking" and isinstance(raw.get("thinking"), str) and raw["thinking"]:
            return [ReasoningDelta(raw["thinking"])]
        if kind in _TOOL_BLOCKS:
            block.id = str(raw.get("id") or f"toolu_block_{index}")
            block.initial_input = raw.get("input")
            return [ToolCallStart(block.id, str(raw.get("name") or ""))]
        if kind.endswith("_tool_result") and isinstance(raw.get("tool_use_id"), str):
            return [ToolResult(raw["tool_use_id"], raw.get("content"))]
        return []

    @staticmethod
    def _block_delta(payload: dict[str, Any], blocks: dict[int, _Block]) -> list[AdapterEvent]:
        index = as_int(payload.get("index"))
        delta = payload.get("delta")
        block = blocks.get(index) if index is not None else None
        if not isinstance(delta, dict):
            return []
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return [TextDelta(text)] if isinstance(text, str) and text else []
        if kind == "thinking_delta":
            text = delta.get("thinking")
            return [ReasoningDelta(text)] if isinstance(text, str) and text else []
        if kind == "input_json_delta" and block is not None and block.type in _TOOL_BLOCKS:
            fragment = delta.get("partial_json")
            if isinstance(fragment, str) and fragment:
                block.fragments += 1
                return [ToolCallDelta(block.id, fragment)]
        return []  # signature_delta, citations_delta and unknown deltas


__all__ = [
    "AnthropicAdapter",
    "DEFAULT_BASE_URL",
    "map_stop_reason",
    "to_anthropic_messages",
    "to_anthropic_tools",
]
