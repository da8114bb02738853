"""A running turn's upkeep: checkpoints of its partial reply, its lease, crash recovery.

``maintain`` is one task of the app's task group (started by the lifespan); it
runs every ``checkpoint_seconds`` over the turns of ``TurnRunner.relay``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio

from gateway.streaming.relay import LiveTurn
from gateway.turn.accumulator import ContentBuilder
from persistence.content import ASSISTANT_SHELL
from turngate.exceptions import RelayError

if TYPE_CHECKING:
    from gateway.replicas.limits import SharedLimits
    from gateway.turn.lifecycle import TurnRunner

logger = logging.getLogger("turngate.turns")


# Rows per checkpoint statement: bounds one statement's size (and how long the turns in
# it wait for their locks) while a pass over 1,000 changed turns is 10 round trips.
CHECKPOINT_BATCH = 100


async def checkpoint_running(runner: TurnRunner) -> None:
    """Save the partial content of running turns that changed; renew the other leases.

    Leases belong to generations that are running or whose final write is
    being retried, nothing else: the renewal names exactly those rows. Turns
    whose content did not change since their last checkpoint (idle streams,
    slow upstreams) and turns that are finalizing have nothing written but their
    lease: one statement renews them all. The turns that changed are written
    ``CHECKPOINT_BATCH`` to a statement (``Store.checkpoint_many``). A row missing
    from a checkpoint or a renewal (a reaper marked it ``interrupted`` after a
    stall longer than the lease) is taken back at once, or, if that is refused,
    its generation is stopped (``_lease_lost``).
    """
    renew: list[LiveTurn] = []
    changed: list[LiveTurn] = []
    for live in runner.relay.running():
        content = live.content
        if live.done:
            continue
        if (
            live.finalizing
            or not isinstance(content, ContentBuilder)
            or content.version == live.checkpointed_version
        ):
            renew.append(live)
        else:
            changed.append(live)
    for i in range(0, len(changed), CHECKPOINT_BATCH):
        await _checkpoint_batch(runner, changed[i : i + CHECKPOINT_BATCH])
    if not renew:
        return
    renewed = await runner.store.renew_leases(
        runner.instance_id, runner.settings.lease_seconds, [t.message_id for t in renew]
    )
    for live in renew:
        if live.message_id not in renewed and not live.finalizing and not live.done:
            content = live.content
            await _reclaim(
                runner, live, content if isinstance(content, ContentBuilder) else None
            )


async def _checkpoint_batch(runner: TurnRunner, turns: list[LiveTurn]) -> None:
    """One statement for ``turns``, each under its lock (so its final write waits).

    A turn whose lock is taken is having its final write: the row is no longer a
    checkpoint's, and waiting for it would hold up the others.
    """
    held: list[tuple[LiveTurn, ContentBuilder, int]] = []
    items: list[tuple[int, list[dict[str, Any]], list[Any] | None]] = []
    try:
        for live in turns:
            content = live.content
            if live.finalizing or live.done or not isinstance(content, ContentBuilder):
                continue
            try:
                live.db_lock.acquire_nowait()
            except anyio.WouldBlock:
                continue
            held.append((live, content, content.version))
            items.append((live.message_id, content.snapshot(), content.event_map()))
        written = await runner.store.checkpoint_many(
            items, lease_owner=runner.instance_id, lease_seconds=runner.settings.lease_seconds
        )
    finally:
        for live, _, _ in held:
            live.db_lock.release()
            live.drop_idle_lock()
    for live, content, version in held:
        if live.message_id in written:
            live.checkpointed_version = version
        else:
            await _reclaim(runner, live, content)


async def _reclaim(runner: TurnRunner, live: LiveTurn, content: ContentBuilder | None) -> None:
    """A checkpoint or renewal missed the row: ``_lease_lost``, under the turn's lock."""
    async with live.db_lock:
        if live.finalizing or live.done:
            return  # its final write has begun: the row is no longer a checkpoint's
        version = content.version if content is not None else live.checkpointed_version
        parts = content.snapshot() if content is not None else list(ASSISTANT_SHELL)
        stream_map = content.event_map() if content is not None else []
        await _lease_lost(runner, live, parts, stream_map, version)


async def _lease_lost(
    runner: TurnRunner, live: LiveTurn, parts: list[dict[str, Any]], stream_map: list[Any],
    version: int,
) -> None:
    """Our row was not ours any more: take it back, or stop the generation.

    Taking it back works when a reaper marked it ``interrupted`` (the owner
    outlived its lease: a stall, a lock, a partition) and no other turn streams
    on the thread; the reply then goes on as if nothing happened. Otherwise
    (another turn started on the thread, the row is gone) the generation stops;
    its final write stores the content so far as ``interrupted`` and the stream
    ends with an ``error`` chunk that says why.
    """
    reclaimed = await runner.store.checkpoint(
        live.message_id, parts, lease_owner=runner.instance_id,
        lease_seconds=runner.settings.lease_seconds, reclaim=True, event_map=stream_map,
    )
    fields = {"message_id": live.message_id, "thread_id": live.thread_id,
              "turn_id": live.turn_id}
    if reclaimed:
        live.checkpointed_version = version
        logger.warning("lease_reclaimed message_id=%s", live.message_id,
                       extra={"event": "lease_reclaimed", **fields})
        return
    logger.warning("lease_lost message_id=%s: generation stopped", live.message_id,
                   extra={"event": "lease_lost", **fields})
    live.lease_gone = True
    live.cancel("interrupted")


async def _renew_stream_holds(runner: TurnRunner, limits: SharedLimits) -> None:
    running = [(t.owner_id, t.thread_id, t.turn_id) for t in runner.relay.running()]
    if not running:
        return
    try:
        await limits.renew_streams(running)
    except RelayError:
        pass  # Redis is away (logged there); new turns get 503 meanwhile


async def maintain(runner: TurnRunner) -> None:
    """Periodic upkeep: checkpoints, lease renewal, crash recovery, relay sweep."""
    while True:
        await anyio.sleep(runner.settings.checkpoint_seconds)
        try:
            await checkpoint_running(runner)
            if runner.limits is not None:
                await _renew_stream_holds(runner, runner.limits)
            await runner.store.recover_expired_turns()
            runner.relay.sweep()
        except Exception as exc:
            # One line per failed pass, naming the cause; the traceback only at debug.
            logger.warning("maintenance_failed: %s", str(exc) or type(exc).__name__,
                           exc_info=logger.isEnabledFor(logging.DEBUG),
                           extra={"event": "maintenance_failed"})


__all__ = ["CHECKPOINT_BATCH", "checkpoint_running", "maintain"]
