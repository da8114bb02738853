"""The adapter contract, shaped like httpx's transport.

An adapter has one async method, :meth:`Adapter.stream`, an async generator
that yields :mod:`llm_adapters.events` for one request; ``aclose()`` releases
what it holds (HTTP connection pools), and it is an async context manager.

Closing the generator (``aclose()``, or leaving ``async with aclosing(...)``)
must close the upstream request at once, so that no tokens burn after the
browser left. Adapters must await something real between events, so that a
cancelled turn stops within one event.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable

from llm_adapters.events import AdapterEvent

Role = Literal["user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of the conversation, with its stored content parts (docs/API.md).

    User parts: ``{"type":"text","text"}``, ``{"type":"image","image":"data:..."}``,
    ``{"type":"mentioned-documents","documents":[...]}``. Assistant parts:
    ``reasoning``, ``text``, ``tool-call`` (``toolCallId``, ``toolName``, ``args``,
    ``argsText``, and once the call is answered ``result`` (the tool's output) or
    ``errorText`` (it failed or was denied)) and ``status``. Within one turn the
    assistant message holds every step so far: text, the calls it made with their
    results, then the text of the next step.
    """

    role: Role
    parts: list[dict[str, Any]]

    @property
    def text(self) -> str:
        """The concatenated text parts (what most providers need)."""
        return "".join(p.get("text", "") for p in self.parts if p.get("type") == "text")

    @property
    def prompt_text(self) -> str:
        """The text parts as a provider should read them: separate parts (an
        assistant's text before and after a tool call) joined by a blank line
        instead of being glued together."""
        return "\n\n".join(
            p["text"]
            for p in self.parts
            if p.get("type") == "text" and isinstance(p.get("text"), str) and p["text"]
        )


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the model may call: its name (``^[a-zA-Z0-9_-]{1,64}$``), what it
    does, and the JSON Schema of its arguments (an object schema)."""

    name: str
    description: str
    input_schema: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )


@dataclass(frozen=True, slots=True)
class AdapterRequest:
    """What one model call asks of an adapter.

    ``messages`` is the thread's history, oldest first, ending with the new
    user turn, or, in a later step of the same turn, with the assistant message
    so far (its tool calls carrying their results). ``model`` is the part of the
    model string after ``<adapter>:``. ``tools`` are offered to the model in the
    provider's own form.
    """

    model: str
    messages: list[ChatMessage]
    options: Mapping[str, Any] = field(default_factory=dict)
    tools: tuple[ToolSpec, ...] = ()


def _answered(part: dict[str, Any]) -> bool:
    """A tool call with its answer (a result or an error), which providers accept.
    A call the provider ran itself (``providerExecuted``) is not one: the provider
    does not take its own server tools' calls back as client tool calls."""
    return (
        part.get("type") == "tool-call"
        and bool(part.get("toolCallId"))
        and not part.get("providerExecuted")
        and ("result" in part or isinstance(part.get("errorText"), str))
    )


def assistant_steps(parts: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """An assistant message as the model produced it, one ``(text, answered calls)``
    per step: a text part after a tool call starts the next step. Calls without an
    answer, and calls the provider ran itself, are left out (the providers reject
    a call without its answer)."""
    steps: list[tuple[list[str], list[dict[str, Any]]]] = [([], [])]
    for part in parts:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str) and part["text"]:
            if steps[-1][1]:
                steps.append(([], []))
            steps[-1][0].append(part["text"])
        elif kind == "tool-call" and _answered(part):
            steps[-1][1].append(part)
    return [("\n\n".join(texts), calls) for texts, calls in steps if texts or calls]


def tool_output_text(part: dict[str, Any]) -> str:
    """The answer of an answered tool call as the model reads it: the result as text
    (JSON unless it is a string), or the error prefixed with ``Error:``."""
    if "result" in part:
        return (result if isinstance(result := part["result"], str)
                else json.dumps(result, ensure_ascii=False))
    return f"Error: {part['errorText']}"


def tool_arguments_text(part: dict[str, Any]) -> str:
    """The arguments of a tool call as JSON text."""
    args_text = part.get("argsText")
    if isinstance(args_text, str) and args_text:
        return args_text
    return json.dumps(part.get("args") or {})


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """Where an HTTP adapter sends its requests: the provider's base URL (empty: the
    provider's own) and its API key (empty: none)."""

    base_url: str = ""
    api_key: str = field(default="", repr=False)


@runtime_checkable
class Adapter(Protocol):
    """An LLM provider behind one async-generator method."""

    name: str

    def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        """Yield the events of one generation; raise ``UpstreamError`` on failure."""
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...

    async def __aenter__(self) -> Adapter: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class BaseAdapter(ABC):
    """Convenience base: context-manager methods and a no-op ``aclose``.

    Subclasses are constructed with the process environment (a mapping), so
    that settings such as base URLs and keys are read the way each provider's
    own SDK reads them.
    """

    name = "base"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env: Mapping[str, str] = env or {}

    @abstractmethod
    def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        """Yield the events of one generation; raise ``UpstreamError`` on failure."""

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> BaseAdapter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


__all__ = [
    "Adapter",
    "AdapterRequest",
    "BaseAdapter",
    "ChatMessage",
    "ProviderConfig",
    "Role",
    "ToolSpec",
    "assistant_steps",
    "tool_arguments_text",
    "tool_output_text",
]
