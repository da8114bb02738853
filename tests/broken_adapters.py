"""Three deliberately broken adapters, each failing one property of ``check-adapter``.

They echo the user's words back, as a well-behaved adapter would, except:

- :class:`NeverAwaits` never suspends between events (property ``yields``);
- :class:`NoUsage` never reports usage (property ``usage``);
- :class:`SwallowsCancel` catches the cancellation of its upstream call and goes on
  calling its upstream (property ``disconnect``); ``calls_after_cancel`` counts
  the calls it made after it swallowed one;
- :class:`Hangs` sends one word and then waits forever (every property after it
  times out).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

import anyio
import anyio.lowlevel

from llm_adapters import AdapterEvent, AdapterRequest, BaseAdapter, Finish, TextDelta, Usage


def _words(request: AdapterRequest) -> list[str]:
    return request.messages[-1].text.split() if request.messages else []


def _usage(name: str, request: AdapterRequest, completion: int) -> Usage:
    return Usage(name, sum(len(m.text.split()) for m in request.messages), completion)


class NeverAwaits(BaseAdapter):
    """Every event in one go: a departed client cannot stop it, the loop is blocked."""

    name = "never-awaits"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        words = _words(request)
        for word in words:
            yield TextDelta(word + " ")  # no await: never yields to the event loop
        yield _usage(self.name, request, len(words))
        yield Finish("stop")


class NoUsage(BaseAdapter):
    """Well-behaved but for its usage, which it never reports."""

    name = "no-usage"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        for word in _words(request):
            await anyio.lowlevel.checkpoint()
            yield TextDelta(word + " ")
        yield Finish("stop")


class SwallowsCancel(BaseAdapter):
    """Catches the cancellation of each upstream call and carries on calling."""

    name = "swallows-cancel"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        self.calls = 0
        self.calls_after_cancel = 0
        self._swallowed = False

    async def _upstream_call(self) -> None:
        self.calls += 1
        if self._swallowed:
            self.calls_after_cancel += 1
        await anyio.sleep(0.001)  # the fake upstream's latency: a checkpoint a cancel can hit

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        words = _words(request)
        self._swallowed = False
        for word in words:
            try:
                await self._upstream_call()
            except anyio.get_cancelled_exc_class():
                self._swallowed = True  # the bug: swallowed, and the loop goes on
            yield TextDelta(word + " ")
        yield _usage(self.name, request, len(words))
        yield Finish("stop")


class Hangs(BaseAdapter):
    """One word, then an upstream that never answers again."""

    name = "hangs"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)

    async def stream(self, request: AdapterRequest) -> AsyncGenerator[AdapterEvent, None]:
        yield TextDelta("one ")
        await anyio.sleep_forever()
        yield Finish("stop")


__all__ = ["Hangs", "NeverAwaits", "NoUsage", "SwallowsCancel"]
