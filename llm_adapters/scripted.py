"""The deterministic ``scripted`` adapter: no network, for the demo, tests and benchmarks.

Model string options: ``scripted:tokens=N,delay_ms=D,reasoning=R,tools=T,fail_after=F``.
It streams R reasoning deltas, then T tool calls (arguments in several fragments,
then a result), then N text deltas ``"w1 "``, ``"w2 "``, ... with D ms between
deltas, and reports usage (prompt tokens = words in the prompt, completion
tokens = deltas sent). With F it fails with an upstream error after F text
deltas. Plain ``scripted`` echoes the user's text back word by word (split on
whitespace, each word followed by one space); ``chunk=C`` echoes it verbatim
instead (newlines, Markdown, HTML as typed), in deltas of C characters.

``trace=KEY`` records progress in :data:`TRACES` so tests can see how far a
generation got and whether it was closed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from llm_adapters.base import AdapterRequest, BaseAdapter
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


@dataclass
class Trace:
    """How far one traced generation got."""

    deltas_sent: int = 0
    text_deltas_sent: int = 0
    finished: bool = False
    closed: bool = False


TRACES: dict[str, Trace] = {}
_MAX_TRACES = 10_000

_INT_OPTIONS = ("tokens", "delay_ms", "reasoning", "tools", "fail_after", "chunk")


@dataclass(frozen=True, slots=True)
class ScriptOptions:
    """Parsed options of a ``scripted:...`` model string."""

    tokens: int | None = None
    delay_ms: int = 0
    reasoning: int = 0
    tools: int = 0
    fail_after: int | None = None
    chunk: int | None = None
    trace: str | None = None


def parse_options(model: str) -> ScriptOptions:
    """Parse ``tokens=N,delay_ms=D,...``; raise ``ValueError`` naming the bad part."""
    values: dict[str, int | str] = {}
    for item in filter(None, (part.strip() for part in model.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"scripted option {item!r} must be in format \"<name>=<value>\"")
        if key == "trace":
            values["trace"] = raw[:100]
            continue
        if key not in _INT_OPTIONS:
            raise ValueError(
                f"unknown scripted option {key!r}; expected one of "
                f"{', '.join(_INT_OPTIONS + ('trace',))}"
            )
        if not raw.isdigit() or int(raw) > 1_000_000:
            raise ValueError(f"scripted option {key}={raw!r} must be an integer 0..1000000")
        values[key] = int(raw)
    return ScriptOptions(**values)  # type: ignore[arg-type]


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
        trace = Trace()
        if opts.trace:
            if len(TRACES) >= _MAX_TRACES:
                TRACES.clear()
            TRACES[opts.trace] = trace
        prompt_tokens = sum(len(_words(m.text)) for m in request.messages)
        delay = opts.delay_ms / 1000

        async def pause() -> None:
            # Always suspend: a producer that never yields keeps generating
            # after its client left (docs/DECISIONS.md, "Known traps").
            if delay:
                await anyio.sleep(delay)
            else:
                await anyio.lowlevel.checkpoint()

        try:
            for i in range(1, opts.reasoning + 1):
                await pause()
                trace.deltas_sent += 1
                yield ReasoningDelta(f"r{i} ")
            for i in range(1, opts.tools + 1):
                call_id = f"call_{i}"
                args = json.dumps({"query": f"q{i}", "n": i})
                await pause()
                yield ToolCallStart(call_id, "lookup")
                step = max(1, len(args) // 3)
                for start in range(0, len(args), step):
                    await pause()
                    trace.deltas_sent += 1
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
                trace.deltas_sent += 1
                trace.text_deltas_sent += 1
                yield TextDelta(text)
            await pause()
            yield Usage(f"scripted:{request.model}" if request.model else "scripted",
                        prompt_tokens, trace.deltas_sent)
            trace.finished = True
            yield Finish("stop")
        finally:
            trace.closed = True
