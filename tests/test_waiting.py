"""The waiting helpers: they return what they waited for, and a timeout names the
condition and the state last seen."""

from __future__ import annotations

import anyio
import pytest

from tests.waiting import eventually, until, until_sync

pytestmark = pytest.mark.anyio


async def test_eventually_returns_the_first_value_that_satisfies() -> None:
    seen: list[int] = []

    async def probe() -> int:
        seen.append(len(seen))
        return seen[-1]

    assert await eventually(probe, lambda v: v >= 3, within=2, what="three", every=0) == 3
    assert seen == [0, 1, 2, 3]


async def test_eventually_fails_with_what_and_the_last_value() -> None:
    async def probe() -> dict[str, str]:
        return {"status": "streaming"}

    started = anyio.current_time()
    with pytest.raises(AssertionError) as caught:
        await eventually(probe, lambda v: v["status"] == "complete", within=0.1,
                         what="the turn to complete")
    assert anyio.current_time() - started < 1
    assert str(caught.value) == (
        "the turn to complete: not within 0.1 s; last seen: {'status': 'streaming'}")


async def test_until_reports_what_shown_returns() -> None:
    state = ["a"]
    assert await until(lambda: state[0], within=1, what="a value") == "a"
    with pytest.raises(AssertionError, match=r"^two items: not within 0.05 s; last seen: \['a'\]$"):
        await until(lambda: len(state) == 2, within=0.05, what="two items", shown=lambda: state)


def test_until_sync() -> None:
    calls: list[int] = []
    assert until_sync(lambda: calls.append(1) or len(calls) == 3, within=2, what="x", every=0)
    with pytest.raises(AssertionError, match=r"^never: not within 0.05 s; last seen: 0$"):
        until_sync(lambda: 0, within=0.05, what="never")
