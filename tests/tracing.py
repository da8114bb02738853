"""How far a generation got: the scripted adapter with a ``trace=KEY`` option, for tests.

``trace_turns(gw)`` replaces the ``scripted`` adapter of the running gateway ``gw``
with ``TracingAdapter`` and returns its traces. A model string such as
``scripted:tokens=3,delay_ms=25,trace=KEY`` then generates what
``scripted:tokens=3,delay_ms=25`` does, and ``traces[KEY]`` counts the deltas the
adapter produced and says whether it finished and whether its generator was closed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from llm_adapters.base import AdapterRequest
from llm_adapters.events import (
    AdapterEvent,
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
)
from llm_adapters.scripted import ScriptedAdapter
from tests.fixtures_server import GatewayServer


@dataclass
class Trace:
    """How far one traced generation got."""

    deltas_sent: int = 0  # reasoning, tool-argument and text deltas
    text_deltas_sent: int = 0
    finished: bool = False  # it reached its Finish event
    closed: bool = False  # its generator ended or was closed


def _untraced(model: str) -> tuple[str | None, str]:
    """The ``trace=KEY`` option of ``model`` (None if absent), and the rest of it."""
    key: str | None = None
    rest: list[str] = []
    for item in model.split(","):
        if item.strip().startswith("trace="):
            key = item.strip().removeprefix("trace=")
        else:
            rest.append(item)
    return key, ",".join(rest)


class TracingAdapter(ScriptedAdapter):
    """``ScriptedAdapter`` recording each ``trace=KEY`` generation in ``traces[KEY]``."""

    def __init__(self, traces: dict[str, Trace]) -> None:
        super().__init__()
        self.traces = traces

    def validate_model(self, model: str) -> None:
        super().validate_model(_untraced(model)[1])

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        key, model = _untraced(request.model)
        trace = Trace()
        if key is not None:
            self.traces[key] = trace
        inner = super().stream(dataclasses.replace(request, model=model))
        try:
            async for event in inner:
                if isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta):
                    trace.deltas_sent += 1
                if isinstance(event, TextDelta):
                    trace.text_deltas_sent += 1
                if isinstance(event, Finish):
                    trace.finished = True
                yield event
        finally:
            await inner.aclose()
            trace.closed = True


def trace_turns(gw: GatewayServer) -> dict[str, Trace]:
    """Trace the ``scripted`` turns of ``gw`` from now on; the traces, by key."""
    traces: dict[str, Trace] = {}
    gw.ctx.adapters.register("scripted", lambda env: TracingAdapter(traces))
    return traces


__all__ = ["Trace", "TracingAdapter", "trace_turns"]
