"""``Store``: the one object the gateway talks to for everything in the database."""

from __future__ import annotations

from persistence._accounts import _AccountsMixin
from persistence._continue import _ContinueMixin
from persistence._probe import _HealthMixin
from persistence._threads import _ThreadsMixin
from persistence._turns import _RegenerateMixin, _TurnsMixin
from persistence._writers import _WritersMixin


class Store(
    _AccountsMixin, _ThreadsMixin, _TurnsMixin, _RegenerateMixin, _ContinueMixin,
    _WritersMixin, _HealthMixin,
):
    """Async access to turngate's database (PostgreSQL via asyncpg, or SQLite).

    ``Store(url, *, statement_timeout=5.0, pool_size=None, acquire_timeout=None)``;
    ``await store.connect()`` / ``await store.disconnect()`` or
    ``async with Store(url) as store``.

    - ``statement_timeout``: asyncpg's ``command_timeout`` (and connect timeout) and
      SQLite's busy timeout; the store's own backstop deadline per operation is
      ``2 × statement_timeout + 1`` s, counted from when a connection is in hand
      (on SQLite's writer: from when the operation starts).
    - ``pool_size``: the asyncpg pool's min and max size (default 10, asyncpg's
      own default). Ignored on SQLite, where a read opens a connection of its own
      and every write goes through the store's one writer connection, queued and
      committed in batches (``persistence._sqlite_writer``).
    - ``acquire_timeout``: on PostgreSQL, how long an operation waits for a pooled
      connection while the database gives no answer (default ``statement_timeout``):
      operations take the connections in arrival order and a queue that keeps moving
      is never cut short (``persistence._pool_gate``; at most 10,000 wait). On
      SQLite, how long a write waits for the writer to take it
      (``acquire_timeout + statement_timeout``: the writer may be waiting out the
      busy timeout first). Past it the operation fails as ``DatabaseUnavailable``
      (``open_turn`` → ``unavailable``, ``finalize_turn`` → ``failed``); on
      PostgreSQL with a warning naming the pool size.
    ``store.dialect`` is ``"postgresql"`` or ``"sqlite"``. Set
    ``store.on_operation = fn(op, outcome, seconds)`` to observe every writer.
    ``store.health`` records recent failures of every operation; ``store.probe()``
    is readiness's round trip on the store's own pool.

    Every method runs its database work shielded from cancellation with a
    deadline; a cancellation of the caller is delivered at its next checkpoint.
    """
