"""The wait for a pooled PostgreSQL connection: in arrival order, bounded by progress.

A fixed bound on the wait for one of the pool's connections cannot tell a pool that
is busy from one that is stuck. Under a burst (1,000 turns opened at once on ten
connections of a busy event loop) the last operations wait their turn longer than
a database outage should take to answer ``503``, and were refused although every
connection was doing useful work.

So each operation of the store first takes one of ``permits`` (one per pooled
connection) here, in arrival order, then its connection from the pool (at once:
every permit holder finds one free). An operation that ends with a healthy
connection while others wait hands that connection straight to the longest waiter
(``hand_over``) instead of returning it to the pool for the waiter to take again:
on a busy event loop each return and take costs loop iterations, and the turns of
a burst wait for them one after the other. A waiter gives up (``DatabaseUnavailable``)
only once ``stall_timeout`` seconds have passed both since it arrived and since an
operation last got the database's answer (``release(answered=True)``). While
operations keep finishing, the queue moves and every waiter gets its turn, however
long the queue; when the database stops answering (stalled, tables locked, the pool
held by stuck statements) each waiter is refused ``stall_timeout`` after the later
of its arrival and the last answer. With the server down, operations fail at once
and hand their permits on at once, so the queue drains into quick failures.

At most ``max_waiting`` operations wait; one more is refused at once.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import anyio

from turngate.exceptions import DatabaseUnavailable

logger = logging.getLogger("turngate.persistence")

#: Operations that may wait for a pooled connection; one more is refused at once.
MAX_WAITING = 10_000


class _Waiter:
    __slots__ = ("connection", "handed")

    def __init__(self) -> None:
        # Set when a permit is handed to this waiter, with a connection or None.
        self.handed = anyio.Event()
        self.connection: Any = None


class PoolGate:
    """First come, first served permits for a pool of ``permits`` connections."""

    def __init__(
        self, permits: int, *, stall_timeout: float, max_waiting: int = MAX_WAITING
    ) -> None:
        if permits < 1:
            raise ValueError(f"permits must be at least 1, got {permits}")
        self.permits = permits
        self.stall_timeout = stall_timeout
        self.max_waiting = max_waiting
        #: Connections handed straight from one operation to the next.
        self.handed_over = 0
        self._free = permits
        self._waiters: deque[_Waiter] = deque()
        # Connections handed to a waiter that had already left: the next to take a
        # permit uses one; the store returns the rest to the pool when it closes.
        self._spare: list[Any] = []
        self._last_answer = float("-inf")

    @property
    def waiting(self) -> int:
        """Operations waiting for a permit now."""
        return len(self._waiters)

    def _refuse(self, why: str) -> DatabaseUnavailable:
        message = f"no pooled database connection free {why} (pool_size={self.permits})"
        logger.warning("database unavailable: %s", message)
        return DatabaseUnavailable(message)

    async def acquire(self) -> Any:
        """Wait for a permit; the connection handed over with it, or None (take one
        from the pool). ``DatabaseUnavailable`` when the queue is full or the
        database gave no answer for ``stall_timeout`` seconds of the wait."""
        if self._free and not self._waiters:
            self._free -= 1
            return self._spare.pop() if self._spare else None
        if len(self._waiters) >= self.max_waiting:
            raise self._refuse(f"and {len(self._waiters)} operations already waiting")
        waiter = _Waiter()
        self._waiters.append(waiter)
        arrived = anyio.current_time()
        try:
            while True:
                deadline = max(arrived, self._last_answer) + self.stall_timeout
                if anyio.current_time() >= deadline:
                    self._waiters.remove(waiter)
                    raise self._refuse(
                        f"within {self.stall_timeout:g}s without a database answer "
                        f"({len(self._waiters)} other operations waiting)"
                    )
                with anyio.move_on_at(deadline):
                    await waiter.handed.wait()
                if waiter.handed.is_set():
                    return waiter.connection
        except BaseException:
            if waiter.handed.is_set():
                self._pass_on(waiter.connection)  # handed over as we left: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def hand_over(self, connection: Any) -> bool:
        """Give the permit and ``connection`` (healthy, idle, its operation answered)
        to the longest waiter; False if none waits (return it to the pool, then
        ``release``)."""
        if not self._waiters:
            return False
        self._last_answer = anyio.current_time()
        self.handed_over += 1
        self._pass_on(connection)
        return True

    def release(self, *, answered: bool) -> None:
        """Give the permit back (to the longest waiter, if any), its connection
        returned to the pool; ``answered``: the operation that held it got the
        database's answer (a result, or an error the server sent about the request
        itself)."""
        if answered:
            self._last_answer = anyio.current_time()
        self._pass_on(None)

    def take_spares(self) -> list[Any]:
        """The connections handed to waiters that had left, for the pool."""
        spares, self._spare = self._spare, []
        return spares

    def _pass_on(self, connection: Any) -> None:
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.connection = connection
            waiter.handed.set()
            return
        self._free += 1
        if connection is not None:
            self._spare.append(connection)


__all__ = ["MAX_WAITING", "PoolGate"]
