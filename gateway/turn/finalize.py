"""Finalizes turns in batches: one statement for every turn that ended meanwhile.

When 1,000 clients leave at once, 1,000 generations end within milliseconds of
each other. One finalize statement each (plus its log line) kept the event loop
and the pool busy for seconds, and the later streams' disconnect handling waited
behind them. The batcher collects finalize requests and writes them with
``Store.finalize_turns`` whenever the previous write has ended: no timer, so a
lone turn is written at once (as ``finalize_turn``, the single-row statement), and
the turns that end while a write is in flight go together in the next one (at most
``max_batch`` per statement).

Each request waits for its own outcome (an ``anyio.Event`` and a slot) inside the
generation task's shielded scope with the finalize deadline, so a turn's closing
chunks are still published only after its row is final. Items that a batch could
not write (a failed batch, one bad row) are retried one by one with
``finalize_turn``, so one bad row cannot fail the others. Nothing here raises
into a generation task.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

import anyio

from persistence import FinalizeItem, Store, UsageRecord

if TYPE_CHECKING:
    from gateway.turn.lifecycle import TurnRunner

logger = logging.getLogger("turngate.turns")

MAX_BATCH = 200


class _Request:
    __slots__ = ("done", "item", "outcome")

    def __init__(self, item: FinalizeItem) -> None:
        self.item = item
        self.outcome = "failed"
        self.done = anyio.Event()


class FinalizeBatcher:
    """Collects finalize requests; ``run`` (a task of the app's task group) writes them."""

    def __init__(self, store: Store, *, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self._pending: list[_Request] = []
        self._wake = anyio.Event()
        self._running = False

    async def finalize(self, item: FinalizeItem) -> str:
        """Queue ``item`` and wait for its outcome (``ok``, ``row_missing``, ``failed``)."""
        if not self._running:  # not started, or stopped: write it ourselves
            return await self._one(item)
        request = _Request(item)
        self._pending.append(request)
        self._wake.set()
        await request.done.wait()
        return request.outcome

    async def run(self) -> None:
        """Write pending requests, one batch after another, until cancelled."""
        self._running = True
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                while self._pending:
                    with anyio.CancelScope(shield=True):
                        await self._flush_next()
        finally:
            self._running = False
            with anyio.CancelScope(shield=True):  # whatever is left (shutdown)
                while self._pending:
                    await self._flush_next()

    async def _flush_next(self) -> None:
        batch = self._pending[: self.max_batch]
        del self._pending[: self.max_batch]
        try:
            await self._write(batch)
        except Exception:  # finalize_turn(s) never raise; belt and braces
            logger.exception("finalize_batch_failed count=%d", len(batch))
        finally:
            for request in batch:
                request.done.set()

    async def _write(self, batch: list[_Request]) -> None:
        if len(batch) == 1:
            request = batch[0]
            request.outcome = await self._one(request.item)
            return
        outcomes = await self.store.finalize_turns([r.item for r in batch])
        retry: list[_Request] = []
        for request, outcome in zip(batch, outcomes, strict=True):
            request.outcome = outcome
            if outcome == "failed":
                retry.append(request)
        if not retry:
            return
        logger.warning("finalize_batch_retry count=%d of=%d", len(retry), len(batch),
                       extra={"event": "finalize_batch_retry", "count": len(retry),
                              "of": len(batch)})
        # One by one, a pool's worth at a time: a bad row fails alone.
        limiter = anyio.CapacityLimiter(max(1, self.store.pool_size // 2))

        async def one(request: _Request) -> None:
            async with limiter:
                request.outcome = await self._one(request.item)

        async with anyio.create_task_group() as tg:
            for request in retry:
                tg.start_soon(one, request)

    async def _one(self, item: FinalizeItem) -> str:
        return await self.store.finalize_turn(
            item.message_id, item.thread_id, item.user_id, item.content, item.status,
            item.usage, event_map=item.event_map,
        )


_BATCHERS: weakref.WeakKeyDictionary[TurnRunner, FinalizeBatcher] = (
    weakref.WeakKeyDictionary()
)


def batcher_for(runner: TurnRunner) -> FinalizeBatcher:
    """The runner's batcher, started in its task group on first use (the app's lifespan
    starts it up front)."""
    batcher = _BATCHERS.get(runner)
    if batcher is None:
        batcher = _BATCHERS[runner] = FinalizeBatcher(runner.store)
        if runner.task_group is not None:
            runner.task_group.start_soon(batcher.run)
    return batcher


async def finalize(
    runner: TurnRunner,
    message_id: int,
    thread_id: str,
    user_id: int,
    content: list[dict[str, Any]],
    status: str,
    usage: UsageRecord,
    event_map: list[Any] | None = None,
) -> str:
    """``Store.finalize_turn``, through the runner's batcher. Never raises."""
    item = FinalizeItem(message_id, thread_id, user_id, content, status, usage, event_map)
    try:
        return await batcher_for(runner).finalize(item)
    except Exception:
        logger.exception("finalize_failed message_id=%s", item.message_id)
        return "failed"


__all__ = ["MAX_BATCH", "FinalizeBatcher", "batcher_for", "finalize"]
