"""``Store``: the one object the gateway talks to for everything in the database."""

from __future__ import annotations

from persistence._accounts import _AccountsMixin
from persistence._threads import _ThreadsMixin
from persistence._turns import _TurnsMixin
from persistence._writers import _WritersMixin


class Store(_AccountsMixin, _ThreadsMixin, _TurnsMixin, _WritersMixin):
    """Async access to turngate's database (PostgreSQL via asyncpg, or SQLite).

    ``Store(url, statement_timeout=5.0)``; ``await store.connect()`` /
    ``await store.disconnect()`` or ``async with Store(url) as store``.
    ``store.dialect`` is ``"postgresql"`` or ``"sqlite"``. Set
    ``store.on_operation = fn(op, outcome, seconds)`` to observe every writer.

    Every method runs its database work shielded from cancellation with a
    deadline; a cancellation of the caller is delivered at its next checkpoint.
    """
