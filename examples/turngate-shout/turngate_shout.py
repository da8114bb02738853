"""``shout``: an example third-party turngate adapter.

It replies with the words of the user's last message in capitals, one text
delta per word, and reports usage (prompt tokens = words in the conversation,
completion tokens = words sent). Model string options:
``shout:delay_ms=D`` waits D ms before each word (as a provider's stream would),
``shout:fail_after=F`` fails with an upstream error after F words.

Registered through the entry point group ``turngate.adapters`` (see
pyproject.toml); docs/ADAPTERS.md of turngate walks through it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

import anyio
import anyio.lowlevel

from llm_adapters import AdapterEvent, AdapterRequest, BaseAdapter, Finish, TextDelta, Usage
from turngate.exceptions import UpstreamProtocolError


def parse_options(model: str) -> dict[str, int]:
    """``delay_ms=5,fail_after=3`` -> ``{"delay_ms": 5, "fail_after": 3}``; ``ValueError``
    naming the bad part otherwise."""
    options: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in model.split(","))):
        key, _, raw = item.partition("=")
        if key not in ("delay_ms", "fail_after") or not raw.isdigit():
            raise ValueError(
                f"shout option {item!r} must be delay_ms=<int> or fail_after=<int>"
            )
        options[key] = int(raw)
    return options


class ShoutAdapter(BaseAdapter):
    """Replies with the user's words in capitals."""

    name = "shout"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)

    def validate_model(self, model: str) -> None:
        """Called by the gateway before the turn starts: a bad model string is a 400."""
        parse_options(model)

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        options = parse_options(request.model)
        delay = options.get("delay_ms", 0) / 1000
        fail_after = options.get("fail_after")
        words = request.messages[-1].text.split() if request.messages else []
        for n, word in enumerate(words):
            if fail_after is not None and n >= fail_after:
                raise UpstreamProtocolError(f"shout failed after {n} words")
            # Suspend before every event: a departed browser's turn is cancelled here.
            if delay:
                await anyio.sleep(delay)
            else:
                await anyio.lowlevel.checkpoint()
            yield TextDelta(word.upper() + " ")
        prompt = sum(len(m.text.split()) for m in request.messages)
        yield Usage(f"shout:{request.model}" if request.model else "shout", prompt, len(words))
        yield Finish("stop")
