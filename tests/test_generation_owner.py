"""Who owns a turn's generation (gateway/turn/lifecycle.py): ``TurnRunner.own_generations``,
a task of the app's task group. When it ends, a generation still running is interrupted
(through its own cancel scope, so its shielded finish runs) and awaited before it
returns; a generation that fails fails the app's task group."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from gateway.ops.metrics import Metrics
from gateway.ops.settings import Settings
from gateway.streaming.relay import LiveTurn, LocalRelay
from gateway.turn.lifecycle import TurnRunner
from llm_adapters.pricing import PriceTable
from persistence import Store

pytestmark = pytest.mark.anyio


def _runner() -> TurnRunner:
    settings = Settings.from_env({"DATABASE_URL": "sqlite:///unused.db"})
    return TurnRunner(settings, Store(settings.database_url), LocalRelay(),
                      PriceTable(settings.prices), Metrics(), "test")


async def test_a_running_generation_is_interrupted_and_awaited_when_its_owner_ends() -> None:
    runner = _runner()
    live = LiveTurn("th", "t1", 1, 10)
    runner.relay.add(live)
    entered, finished = anyio.Event(), anyio.Event()
    ended_as: list[str | None] = []

    async def generate() -> None:
        with anyio.CancelScope() as scope:
            live.cancel_scope = scope
            entered.set()
            await anyio.sleep_forever()
        live.cancel_scope = None
        with anyio.CancelScope(shield=True):  # as a generation's finish: never cut short
            await anyio.sleep(0.05)
            ended_as.append(live.cancel_reason)
            runner.relay.ended(live)
            finished.set()

    owner = anyio.CancelScope()

    async def own() -> None:
        with owner:
            await runner.own_generations()

    async with anyio.create_task_group() as tg:
        runner.task_group = tg
        tg.start_soon(own)
        await anyio.lowlevel.checkpoint()
        runner._start_generation(generate())
        with anyio.fail_after(2):
            await entered.wait()
        owner.cancel()
    # The owner returned only once the generation had finished.
    assert finished.is_set() and ended_as == ["interrupted"]
    assert not runner._generations


async def test_a_failing_generation_fails_the_apps_task_group() -> None:
    runner = _runner()

    async def generate() -> None:
        await anyio.lowlevel.checkpoint()
        raise RuntimeError("generation failed")

    with anyio.fail_after(2), pytest.raises(BaseExceptionGroup) as raised:
        async with anyio.create_task_group() as tg:
            runner.task_group = tg
            tg.start_soon(runner.own_generations)
            await anyio.lowlevel.checkpoint()
            runner._start_generation(generate())
            await anyio.sleep_forever()  # the app's other tasks: cancelled by the failure
    assert raised.value.subgroup(RuntimeError) is not None
