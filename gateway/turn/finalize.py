"""Finalizes turns in batches: one statement for every turn that ended meanwhile.

When 1,000 clients leave at once, 1,000 generations end within milliseconds of
each other; one finalize statement each (plus its log line) would keep the event
loop and the pool busy for seconds, with the later streams' disconnect handling
waiting behind them. The batcher collects finalize requests and writes them with
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

``write_final`` is what the lifecycle calls: the batched write, retried with
backoff until it lands.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from gateway.streaming.relay import LiveTurn
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
    """Collects finalize requests; ``run`` (a task of the app's task group) writes them.

    One per app, owned by its ``TurnRunner`` and started by the app's lifespan; until
    ``run`` is running (no lifespan) each request is written on its own.
    """

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
        if len(retry) == len(batch):
            # Every row failed: the database, most likely, not a row. One alone tells; if
            # it fails too, the rest stay failed now and their turns retry with backoff,
            # instead of each waiting out the database's deadline in turn (20 rows on a
            # locked SQLite file: 50 s before the last one heard).
            first, retry = retry[0], retry[1:]
            first.outcome = await self._one(first.item)
            if first.outcome == "failed":
                return
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


async def finalize(
    batcher: FinalizeBatcher,
    message_id: int,
    thread_id: str,
    user_id: int,
    content: list[dict[str, Any]],
    status: str,
    usage: UsageRecord,
    event_map: list[Any] | None = None,
) -> str:
    """``Store.finalize_turn``, through ``batcher``. Never raises."""
    item = FinalizeItem(message_id, thread_id, user_id, content, status, usage, event_map)
    try:
        return await batcher.finalize(item)
    except Exception:
        logger.exception("finalize_failed message_id=%s", item.message_id)
        return "failed"


# Backoff of a final write that failed: the first retry at once-ish, then doubling up
# to half a checkpoint interval (at most 1 s), so a thread whose final write waited on
# the database is free again within a checkpoint interval of its return.
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 1.0


async def write_final(
    runner: TurnRunner, live: LiveTurn, parts: list[dict[str, Any]], event_map: list[Any],
    status: str, record: UsageRecord,
) -> tuple[str, int]:
    """Write the turn's final row and usage until it lands; ``(outcome, attempts)``.

    A write that fails (database down, locked, pool exhausted) is retried with
    backoff for as long as the process lives; meanwhile the turn stays in
    ``relay.running()``, so the maintenance loop keeps renewing its lease and no
    reaper takes it. Ends with ``ok`` (written),
    ``row_missing`` (the row is not ours to write: deleted, superseded, final
    already) or, only once a drain gave up on it, ``failed``.
    """
    attempts = 0
    delay = RETRY_FIRST_SECONDS
    cap = min(RETRY_MAX_SECONDS, runner.settings.checkpoint_seconds / 2)
    while True:
        attempts += 1
        # The lock waits for a checkpoint of this turn still in flight (bounded by
        # the store's deadline), so a reclaim cannot follow the final write.
        async with live.db_lock:
            outcome = await finalize(
                runner.batcher, live.message_id, live.thread_id, live.owner_id, parts, status,
                record, event_map,
            )
        if outcome == "row_missing" and attempts > 1:
            outcome = await _written_already(runner, live, status)
        if outcome != "failed" or runner.give_up.is_set():
            return outcome, attempts
        runner.metrics.finalize_retries.inc()
        if attempts == 1:
            logger.warning(
                "finalize_retrying message_id=%s status=%s", live.message_id, status,
                extra={"event": "finalize_retrying", "message_id": live.message_id,
                       "thread_id": live.thread_id, "turn_id": live.turn_id,
                       "status": status},
            )
        with anyio.move_on_after(delay):
            await runner.give_up.wait()
        delay = min(delay * 2, cap)


async def _written_already(runner: TurnRunner, live: LiveTurn, status: str) -> str:
    """After a failed attempt, ``row_missing`` may mean that attempt committed and
    only its answer was lost: the row already holds our status."""
    try:
        rows = await runner.store.get_turn(live.thread_id, live.turn_id)
    except Exception as exc:
        logger.warning("finalize_check_failed message_id=%s: %s", live.message_id,
                       str(exc) or type(exc).__name__,
                       extra={"event": "finalize_check_failed", "message_id": live.message_id})
        return "failed"
    row = rows.assistant
    if row is not None and row.id == live.message_id and row.status == status:
        return "ok"
    return "row_missing"


__all__ = ["MAX_BATCH", "FinalizeBatcher", "finalize", "write_final"]
