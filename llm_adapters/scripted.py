"""The deterministic ``scripted`` adapter: no network, for the demo, tests and benchmarks.

Model string options: ``scripted:tokens=N,delay_ms=D,reasoning=R,tools=T,fail_after=F``.
It streams R reasoning deltas, then T tool calls (arguments in several fragments,
then a result), then N text deltas ``"w1 "``, ``"w2 "``, ... with D ms between
deltas, and reports usage (prompt tokens = words in the prompt, completion
tokens = deltas sent). With F it fails with an upstream error after F text
deltas. Plain ``scripted`` echoes the user's text back word by word (split on
whitespace, each word followed by one space); ``chunk=C`` echoes it verbatim
instead (newlines, Markdown, HTML as typed), in deltas of C characters.

``call=NAME`` makes it call the tool ``NAME`` (offered in ``request.tools``, e.g. an
MCP tool ``time__get_current_time``) with the arguments given as ``arg.KEY=VALUE``
(VALUE percent-decoded, then read as JSON if it is JSON, else kept as a string):
its first model call of a turn streams the call and finishes with ``tool-calls``;
once the request carries the call's result (the turn's assistant message holds the
answered call), it answers ``NAME answered: <result>`` (or ``NAME answered: Error:
<errorText>``). ``parallel=P`` makes P calls at once in each step, ``rounds=R``
calls again in R steps before answering.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import anyio
import anyio.lowlevel

from llm_adapters.base import AdapterRequest, BaseAdapter, tool_output_text
from llm_adapters.events import (
    AdapterEvent,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolResult,
    Usage,
)
from turngate.exceptions import UpstreamProtocolError

_INT_OPTIONS = (
    "tokens", "delay_ms", "reasoning", "tools", "fail_after", "chunk", "parallel", "rounds"
)


@dataclass(frozen=True, slots=True)
class ScriptOptions:
    """Parsed options of a ``scripted:...`` model string."""

    tokens: int | None = None
    delay_ms: int = 0
    reasoning: int = 0
    tools: int = 0
    fail_after: int | None = None
    chunk: int | None = None
    call: str | None = None
    args: tuple[tuple[str, Any], ...] = ()
    parallel: int = 1
    rounds: int = 1


# A turn parses its model string twice (the route validates it, the stream reads it),
# and nothing changes the options once parsed: a string is parsed once while it is cached.
@functools.lru_cache(maxsize=256)
def parse_options(model: str) -> ScriptOptions:
    """Parse ``tokens=N,delay_ms=D,...``; raise ``ValueError`` naming the bad part."""
    values: dict[str, Any] = {}
    args: list[tuple[str, Any]] = []
    for item in filter(None, (part.strip() for part in model.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"scripted option {item!r} must be in format \"<name>=<value>\"")
        if key == "call":
            if not raw:
                raise ValueError("scripted option call= must name a tool")
            values["call"] = raw
            continue
        if key.startswith("arg.") and len(key) > 4:
            args.append((key[4:], _arg_value(raw)))
            continue
        if key not in _INT_OPTIONS:
            raise ValueError(
                f"unknown scripted option {key!r}; expected one of "
                f"{', '.join(_INT_OPTIONS + ('call', 'arg.<name>'))}"
            )
        if not raw.isdigit() or int(raw) > 1_000_000:
            raise ValueError(f"scripted option {key}={raw!r} must be an integer 0..1000000")
        values[key] = int(raw)
    if args:
        values["args"] = tuple(args)
    return ScriptOptions(**values)


def _arg_value(raw: str) -> Any:
    text = unquote(raw)
    try:
        return json.loads(text)
    except ValueError:
        return text


def _words(text: str) -> list[str]:
    return text.split()


class ScriptedAdapter(BaseAdapter):
    """A deterministic adapter that needs no network."""

    name = "scripted"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)

    def validate_model(self, model: str) -> None:
        """Raise ``ValueError`` if ``model`` is not a valid option string."""
        parse_options(model)

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        opts = parse_options(request.model)
        sent = 0  # deltas: the completion tokens it reports
        prompt_tokens = sum(len(_words(m.text)) for m in request.messages)
        delay = opts.delay_ms / 1000

        async def pause() -> None:
            # Always suspend: a producer that never yields keeps generating
            # after its client left (docs/DECISIONS.md, "Known traps").
            if delay:
                await anyio.sleep(delay)
            else:
                await anyio.lowlevel.checkpoint()

        if opts.call:
            async for event in self._tool_step(request, opts, pause):
                yield event
            return
        for i in range(1, opts.reasoning + 1):
            await pause()
            sent += 1
            yield ReasoningDelta(f"r{i} ")
        for i in range(1, opts.tools + 1):
            call_id = f"call_{i}"
            args = json.dumps({"query": f"q{i}", "n": i})
            await pause()
            yield ToolCallStart(call_id, "lookup")
            step = max(1, len(args) // 3)
            for start in range(0, len(args), step):
                await pause()
                sent += 1
                yield ToolCallDelta(call_id, args[start : start + step])
            yield ToolCallEnd(call_id)
            await pause()
            yield ToolResult(call_id, {"answer": f"a{i}"})
        texts: Iterable[str]
        if opts.tokens is None and opts.chunk:
            last = request.messages[-1].text if request.messages else ""
            size = opts.chunk
            texts = [last[i : i + size] for i in range(0, len(last), size)] or ["(empty)"]
        elif opts.tokens is None:
            last = request.messages[-1].text if request.messages else ""
            texts = [w + " " for w in _words(last)] or ["(empty)"]
        else:
            # Lazily: a list of a long script's deltas, built up front, cost the
            # event loop seconds when a thousand such turns started at once.
            texts = (f"w{i} " for i in range(1, opts.tokens + 1))
        for n, text in enumerate(texts):
            if opts.fail_after is not None and n >= opts.fail_after:
                raise UpstreamProtocolError(f"scripted failure after {n} text deltas")
            await pause()
            sent += 1
            yield TextDelta(text)
        await pause()
        yield Usage(f"scripted:{request.model}" if request.model else "scripted",
                    prompt_tokens, sent)
        yield Finish("stop")

    @staticmethod
    async def _tool_step(
        request: AdapterRequest, opts: ScriptOptions, pause: Callable[[], Awaitable[None]]
    ) -> AsyncGenerator[AdapterEvent, None]:
        """One step of a ``call=NAME`` script: call the tool, or answer with its results."""
        name = opts.call
        users = sum(1 for m in request.messages if m.role == "user")
        turn_parts: list[dict[str, Any]] = []
        deltas = 0
        for message in reversed(request.messages):
            if message.role == "user":
                break
            turn_parts = message.parts + turn_parts
        answered = [
            p for p in turn_parts
            if p.get("type") == "tool-call" and p.get("toolName") == name
            and ("result" in p or isinstance(p.get("errorText"), str))
        ]
        prompt_tokens = sum(len(_words(m.text)) for m in request.messages)
        model = f"scripted:{request.model}"
        parallel = max(1, opts.parallel)
        if len(answered) // parallel < opts.rounds:
            arguments = json.dumps(dict(opts.args))
            for i in range(parallel):
                call_id = f"call_{users}_{len(answered) + i + 1}"
                await pause()
                yield ToolCallStart(call_id, str(name))
                await pause()
                deltas += 1
                yield ToolCallDelta(call_id, arguments)
                yield ToolCallEnd(call_id)
            await pause()
            yield Usage(model, prompt_tokens, deltas)
            yield Finish("tool-calls")
            return
        answer = "\n".join(f"{name} answered: {tool_output_text(p)}"
                           for p in answered[-parallel:])
        for start in range(0, len(answer), 16):
            await pause()
            deltas += 1
            yield TextDelta(answer[start : start + 16])
        await pause()
        yield Usage(model, prompt_tokens, deltas)
        yield Finish("stop")
