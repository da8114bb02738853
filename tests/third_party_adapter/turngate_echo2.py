"""A third-party turngate adapter: echoes the last user message back, reversed word order.

Installed from ``tests/third_party_adapter`` and found by turngate through the
entry-point group ``turngate.adapters`` (``echo2 = "turngate_echo2:Echo2Adapter"``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import anyio.lowlevel

from llm_adapters import AdapterEvent, AdapterRequest, BaseAdapter, Finish, TextDelta, Usage


class Echo2Adapter(BaseAdapter):
    """Streams the words of the last user message in reverse order."""

    name = "echo2"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        self.prefix = self.env.get("ECHO2_PREFIX", "")

    async def stream(self, request: AdapterRequest) -> AsyncIterator[AdapterEvent]:
        last = request.messages[-1].text if request.messages else ""
        words = list(reversed(last.split()))
        if self.prefix:
            words.insert(0, self.prefix)
        for word in words:
            await anyio.lowlevel.checkpoint()  # yield to the loop between events
            yield TextDelta(word + " ")
        prompt = sum(len(m.text.split()) for m in request.messages)
        yield Usage(f"echo2:{request.model}" if request.model else "echo2", prompt, len(words))
        yield Finish("stop")
