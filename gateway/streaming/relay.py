"""The in-process relay: live turn events for the first client, attached
clients and resumed streams.

A ``LiveTurn`` holds the encoded chunks of one turn (SSE id = ``first_id`` +
index), so a reader can start from any ``Last-Event-ID`` and then follow live
output. Memory is bounded per turn: at most ``max_bytes`` of chunks are kept
(past it the oldest are dropped, the turn is marked ``overflowed`` so late
readers are refused, and a reader that falls behind what is kept is ended);
after the turn ends it is kept for ``retention_seconds``, swept by one
periodic task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.lowlevel


@dataclass(eq=False)
class LiveTurn:
    """One turn being generated (or recently finished) in this process."""

    thread_id: str
    turn_id: str
    owner_id: int
    message_id: int
    max_bytes: int = 16 * 1024 * 1024
    events: list[bytes] = field(default_factory=list)  # the chunks kept, from ``first_id``
    first_id: int = 0  # the SSE id of ``events[0]``; above 0 once the oldest were dropped
    size: int = 0  # bytes in ``events``
    overflowed: bool = False
    done: bool = False
    status: str | None = None
    finished_at: float | None = None
    subscribers: int = 0
    cancel_scope: anyio.CancelScope | None = None
    cancel_reason: str | None = None
    content: Any = None  # the turn's ContentBuilder, read by checkpoints
    checkpointed_version: int = 0  # the content version last saved (0: the stored shell)
    # Readers: ``joins`` counts every reader that ever attached; ``last_delivered`` is the
    # SSE id of the last chunk handed to the reader whose departure left none.
    joins: int = 0
    last_delivered: int = -1
    # The disconnect policy (``TurnRunner``): called when the last reader has left.
    on_unread: Callable[[LiveTurn], None] | None = None
    # A cancel that keeps only the chunks up to this SSE id in the stored reply (what
    # the last reader was sent), though generation went on meanwhile.
    keep_upto: int | None = None
    # The generation has stopped; its final write is under way (or being retried).
    finalizing: bool = False
    # The row was taken from us (a reaper marked it interrupted) and could not be
    # taken back: the generation is stopped and its stream says so.
    lease_gone: bool = False
    # ``db_lock``'s lock while one is in use (made on demand: ~0.9 KiB each).
    _db_lock: anyio.Lock | None = None
    # Chunks for the readers following at the time only: ``(SSE id of the chunk they
    # precede, chunk)``; they carry no SSE id and are never replayed (``publish_transient``).
    transient: list[tuple[int, bytes]] = field(default_factory=list)
    # The readers waiting for the next publish, a future each (``_wait_changed``); None
    # while nobody waits. Not an event: an asyncio.Event keeps a deque of its own (0.6
    # KiB), which every turn with a reader waiting would hold.
    _waiters: list[asyncio.Future[None]] | None = None
    _joined: anyio.Event | None = None  # only while ``wait_for_reader`` waits

    @property
    def db_lock(self) -> anyio.Lock:
        """Serialises this turn's checkpoint/reclaim with its final write, so a reclaim
        can never put a row back to ``streaming`` after its final write began."""
        lock = self._db_lock
        if lock is None:
            lock = self._db_lock = anyio.Lock()
        return lock

    def drop_idle_lock(self) -> None:
        """Forget ``db_lock`` if nobody holds it or waits for it (the next use makes
        another): an idle turn between checkpoints keeps none."""
        lock = self._db_lock
        if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
            self._db_lock = None

    def publish(self, chunks: list[bytes]) -> None:
        """Append encoded chunks and wake the readers.

        Past ``max_bytes`` the oldest chunks are dropped down to half of it (so a
        drop is rare, not one per chunk); only the newest chunk is kept whatever
        its size.
        """
        if len(chunks) == 1:  # one chunk per event: the per-token path
            chunk = chunks[0]
            self.events.append(chunk)
            self.size += len(chunk)
        elif chunks:
            self.events.extend(chunks)
            self.size += sum(map(len, chunks))
        else:
            return
        if self.size > self.max_bytes:
            self.overflowed = True
            self._drop_oldest(self.max_bytes // 2)
        if self._waiters:
            self._wake()

    def publish_transient(self, chunk: bytes) -> bool:
        """Hand ``chunk`` (an SSE event without an id) to the readers following now.

        It is not one of the turn's chunks: it takes no SSE id, so ids stay dense and
        a resume with ``Last-Event-ID`` is unaffected, and a reader that attaches or
        resumes later never gets it (``batches(transient=True)``). False, sending
        nothing, once the turn has ended (its closing chunks went out).
        """
        if self.done:
            return False
        self.transient.append((self.next_id, chunk))
        self._wake()
        return True

    def _drop_oldest(self, keep_bytes: int) -> None:
        drop, size = 0, self.size
        while size > keep_bytes and drop < len(self.events) - 1:
            size -= len(self.events[drop])
            drop += 1
        del self.events[:drop]
        self.first_id += drop
        self.size = size

    @property
    def next_id(self) -> int:
        """The SSE id the next published chunk gets."""
        return self.first_id + len(self.events)

    def since(self, index: int) -> list[bytes]:
        """The kept chunks from SSE id ``index`` on (from the oldest kept if dropped)."""
        return self.events[max(index - self.first_id, 0) :]

    def complete_upto(self, last: int) -> list[bytes] | None:
        """Every chunk up to SSE id ``last``; None if the oldest were dropped."""
        return self.events[: last + 1] if self.first_id == 0 else None

    def _wake(self) -> None:
        # Wake the readers waiting now and start the list anew, so the next publishes
        # before they run (a burst of an upstream read's events) wake nobody again.
        waiters = self._waiters
        if waiters:
            self._waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait_changed(self) -> None:
        """Wait for the next publish, finish, or transient chunk (``_wake``)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters
        if waiters is None:
            self._waiters = [waiter]
        else:
            waiters.append(waiter)
        try:
            await waiter
        finally:
            waiters = self._waiters
            if waiters is not None and waiter in waiters:  # left without a wake (cancelled)
                waiters.remove(waiter)
                if not waiters:
                    self._waiters = None

    def finish(self, status: str) -> None:
        """Mark the turn ended with its final status; readers drain and stop."""
        self.done = True
        self.status = status
        self.finished_at = time.monotonic()
        self.cancel_scope = None
        self._wake()
        if self._joined is not None:
            self._joined.set()

    def cancel(self, reason: str, *, keep_upto: int | None = None) -> bool:
        """Stop the generation (it is finalized with ``reason``); False if not running.

        ``keep_upto``: store only what the chunks up to that SSE id carried.
        """
        if self.done or self.cancel_scope is None:
            return False
        if self.cancel_reason is None:
            self.cancel_reason = reason
            self.keep_upto = keep_upto
        self.cancel_scope.cancel()
        return True

    def reader_joined(self) -> None:
        """A reader follows the turn (here, or on another replica)."""
        self.subscribers += 1
        self.joins += 1
        if self._joined is not None:
            self._joined.set()
            self._joined = None

    def reader_left(self, delivered: int) -> None:
        """A reader left after chunk ``delivered``; the last one out applies the policy."""
        self.subscribers -= 1
        if self.subscribers == 0 and not self.done:
            self.last_delivered = delivered
            if self.on_unread is not None:
                self.on_unread(self)

    def unread_elsewhere(self) -> None:
        """The last reader on other replicas left; the policy applies if none is here."""
        if self.subscribers == 0 and not self.done:
            self.last_delivered = self.next_id - 1
            if self.on_unread is not None:
                self.on_unread(self)

    @property
    def abandoned(self) -> bool:
        """Whether readers came and all of them left while it still generates."""
        return self.joins > 0 and self.subscribers == 0 and not self.done

    async def wait_for_reader(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a reader to attach; True if one did (or it ended)."""
        joins = self.joins
        with anyio.move_on_after(seconds):
            while self.joins == joins and not self.done:
                if self._joined is None:
                    self._joined = anyio.Event()
                await self._joined.wait()
        return self.joins != joins or self.done

    async def wait_done(self) -> None:
        """Wait until the turn is finalized."""
        while not self.done:
            await self._wait_changed()

    async def batches(
        self, after: int = -1, *, transient: bool = False
    ) -> AsyncGenerator[tuple[int, list[bytes]], None]:
        """Every chunk after SSE id ``after``, then live ones, until the turn ends, as
        ``(SSE id of the first chunk, chunks)``: chunks that are already there come in
        one batch, so a reader that falls behind catches up in one send.

        ``transient``: also the transient chunks published from now on, each alone as
        ``(-1, [chunk])``, in their place among the others (none published before).
        Ends early when the next chunk it needs was dropped (``max_bytes``).
        """
        index = after + 1
        seen = len(self.transient)
        while True:
            if index < self.first_id:
                return  # fell behind what is kept
            end = self.next_id
            if transient and seen < len(self.transient):
                before, chunk = self.transient[seen]
                if index < before:  # the chunks it follows first
                    yield index, self.events[index - self.first_id : before - self.first_id]
                    index = before
                seen += 1
                yield -1, [chunk]
                continue
            if index < end:
                yield index, self.events[index - self.first_id : end - self.first_id]
                index = end
                continue
            if self.done:
                return
            await self._wait_changed()
            # One scheduler tick (no timer): a producer mid-burst adds its next chunk
            # and both go out in one write (bench/: the long-turn events/s).
            await anyio.lowlevel.checkpoint()


class LocalRelay:
    """The live turns of this process, by ``(thread_id, turn_id)``."""

    def __init__(self, retention_seconds: float = 60.0, max_finished: int = 2000) -> None:
        self.retention_seconds = retention_seconds
        self.max_finished = max_finished
        self._turns: dict[tuple[str, str], LiveTurn] = {}
        self._running: dict[str, LiveTurn] = {}
        # Kept with _running: the quota check runs on every turn start and must
        # not scan every running turn of every user.
        self._per_owner: dict[int, int] = {}
        self._registered = anyio.Event()

    def get(self, thread_id: str, turn_id: str) -> LiveTurn | None:
        """The live or retained turn, if this process has it."""
        return self._turns.get((thread_id, turn_id))

    def running_on_thread(self, thread_id: str) -> LiveTurn | None:
        """The turn generating on ``thread_id`` in this process, if any."""
        return self._running.get(thread_id)

    def running(self) -> list[LiveTurn]:
        """Every turn generating in this process."""
        return list(self._running.values())

    def running_for_owner(self, owner_id: int) -> int:
        """How many turns ``owner_id`` has generating here."""
        return self._per_owner.get(owner_id, 0)

    def add(self, live: LiveTurn) -> None:
        """Register a turn that starts generating now."""
        self._turns[(live.thread_id, live.turn_id)] = live
        replaced = self._running.get(live.thread_id)
        if replaced is not live:
            if replaced is not None:
                self._count(replaced.owner_id, -1)
            self._running[live.thread_id] = live
            self._count(live.owner_id, 1)
        self._registered.set()
        self._registered = anyio.Event()

    def ended(self, live: LiveTurn) -> None:
        """The turn stopped generating; it stays readable for the retention time."""
        if self._running.get(live.thread_id) is live:
            del self._running[live.thread_id]
            self._count(live.owner_id, -1)
        if self.retention_seconds == 0:
            self._turns.pop((live.thread_id, live.turn_id), None)

    def forget(self, live: LiveTurn) -> None:
        """Drop a turn's in-memory copy now: its stored row is what a resume must see."""
        if self._turns.get((live.thread_id, live.turn_id)) is live:
            del self._turns[(live.thread_id, live.turn_id)]

    def _count(self, owner_id: int, delta: int) -> None:
        n = self._per_owner.get(owner_id, 0) + delta
        if n > 0:
            self._per_owner[owner_id] = n
        else:
            self._per_owner.pop(owner_id, None)

    async def wait_for(
        self, thread_id: str, turn_id: str, within: float, message_id: int | None = None
    ) -> LiveTurn | None:
        """Wait until the turn is registered (a racing request is about to start it).

        ``message_id``: wait for that reply of the turn, not an earlier one the relay
        still keeps (a regenerate whose new reply is about to start).
        """
        with anyio.move_on_after(within):
            while (live := self.get(thread_id, turn_id)) is None or (
                message_id is not None and live.message_id != message_id
            ):
                await self._registered.wait()
            return live
        return None

    def sweep(self) -> int:
        """Drop finished turns past their retention; returns how many were dropped."""
        now = time.monotonic()
        finished = [
            (key, t) for key, t in self._turns.items() if t.done and t.finished_at is not None
        ]
        expired = [key for key, t in finished if now - t.finished_at >= self.retention_seconds]  # type: ignore[operator]
        overflow = len(finished) - len(expired) - self.max_finished
        if overflow > 0:
            keep = sorted(
                (item for item in finished if item[0] not in set(expired)),
                key=lambda item: item[1].finished_at or 0.0,
            )
            expired.extend(key for key, _ in keep[:overflow])
        for key in expired:
            self._turns.pop(key, None)
        return len(expired)

    def __len__(self) -> int:
        return len(self._turns)


class SharedRelay(Protocol):
    """A relay between replicas (``gateway.replicas.relay.RedisRelay`` when REDIS_URL is set).

    The one-process path never touches it; with it, turns generated here are
    mirrored out, and turns generated elsewhere can be followed and cancelled.
    """

    @property
    def available(self) -> bool:
        """Whether the shared relay answers (new turns are refused while it does not)."""

    async def mirror(self, live: LiveTurn, *, replace: bool = False) -> None:
        """Copy a turn generated here to the shared relay until it ends (a task).
        ``replace``: the turn's copy there is an earlier stream of the same turn (a
        paused turn continuing): start it anew."""

    async def run(self, relay: LocalRelay) -> None:
        """Per-process upkeep: health checks and cancel requests for ``relay``'s turns."""

    async def open(
        self, thread_id: str, turn_id: str, after: int, wait: float,
        still_streaming: Callable[[], Awaitable[bool]],
    ) -> AsyncIterator[bytes] | None:
        """The turn's chunks after SSE id ``after``, then live; None if not relayed."""

    async def request_cancel(
        self, thread_id: str, turn_id: str, owner_id: int, *, supersede: bool = False
    ) -> None:
        """Ask whichever replica generates the turn to cancel it.

        ``supersede``: only if every reader it had there has left (a new turn of its
        thread wants the thread).
        """

    async def reader_joined(self, thread_id: str, turn_id: str) -> None:
        """A reader on this replica follows a turn generated elsewhere."""

    async def reader_left(self, thread_id: str, turn_id: str, owner_id: int) -> None:
        """That reader left; the last one out tells the generating replica."""

    async def remote_readers(self, thread_id: str, turn_id: str) -> int:
        """How many readers follow the turn from other replicas (0 if unknown)."""


__all__ = ["LiveTurn", "LocalRelay", "SharedRelay"]
