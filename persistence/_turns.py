"""Opening a turn and regenerating one; the other turn writers are in ``_writers``.

PostgreSQL runs ``open_turn`` as one statement (``_pg_sql``). SQLite runs a few
statements on the store's writer (``persistence._sqlite_writer``), inside its
``BEGIN IMMEDIATE`` batch: the write lock is held from the start and writers run
one after another, so the checks cannot race.

Log outcomes of ``open_turn``: ``inserted`` (a row was written), ``race_recovered``
(both rows existed: a repeat or a lost race), ``row_missing`` (thread not found /
not the caller's), ``conflict_no_match`` (busy: another turn is streaming),
``unauthorized`` (the API key given to check was no longer valid), ``failed``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg

from persistence import _pg_sql
from persistence._base import (
    _dump_json,
    _load_json,
    _parse_iso,
    _StoreBase,
    utcnow_text,
)
from persistence._sql import Conn
from persistence._threads import _MESSAGE_COLUMNS, _message_row
from persistence.content import (
    ASSISTANT_SHELL,
    estimate_completion_tokens,
)
from persistence.rows import MessageRow, TurnOpened
from turngate.exceptions import DatabaseUnavailable

logger = logging.getLogger("turngate.persistence")

FINAL_STATUSES = frozenset(
    {"complete", "cancelled", "error", "interrupted", "requires_action"}
)
_ROLES = frozenset({"user", "assistant"})
_BUSY_INDEX = "uq_messages_thread_streaming"
# Fresh-snapshot attempts of an open that collided on the busy index; one is enough
# unless new turns of the same thread keep committing in between.
_BUSY_RACE_RETRIES = 4


class _BusyRace(Exception):
    """A concurrent opener (of this turn or another) took the thread's streaming slot
    after this statement's snapshot was taken."""


_SHELL_JSON = _dump_json(ASSISTANT_SHELL)


def _history_rows(value: Any) -> list[MessageRow]:
    """The json array of ``OPEN_TURN_WITH_HISTORY``'s ``history`` column as rows."""
    return [
        MessageRow(
            id=int(m["id"]),
            thread_id=str(m["thread_id"]),
            role=str(m["role"]),
            content=m["content"],
            status=str(m["status"]),
            turn_id=m["turn_id"],
            created_at=str(m["created_at"]),
            updated_at=str(m["updated_at"]),
        )
        for m in _load_json(value) or ()
    ]


def _plus_seconds(iso: str, seconds: float) -> str:
    return (_parse_iso(iso) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_SQLITE_USAGE_INSERT = (
    "INSERT INTO token_usage (usage_type, prompt_tokens, completion_tokens, total_tokens, "
    "cost_micros, model_breakdown, call_details, estimated, thread_id, message_id, user_id, "
    "created_at) VALUES (:usage_type, :prompt_tokens, :completion_tokens, :total_tokens, "
    ":cost_micros, :model_breakdown, :call_details, :estimated, :thread_id, :message_id, "
    ":user_id, :now) ON CONFLICT (message_id) WHERE message_id IS NOT NULL DO NOTHING "
    "RETURNING id"
)


async def _sqlite_interrupt(conn: Conn, row: Any, owner_id: int, now: str) -> None:
    """Mark one expired streaming row interrupted, with its estimated usage row."""
    await conn.execute(
        "UPDATE messages SET status = 'interrupted', lease_owner = NULL, "
        "lease_expires_at = NULL, updated_at = :now WHERE id = :id AND status = 'streaming'",
        {"id": row["id"], "now": now},
    )
    tokens = estimate_completion_tokens(_load_json(row["content"]))
    await conn.fetch_val(
        _SQLITE_USAGE_INSERT,
        {
            "usage_type": "chat",
            "prompt_tokens": 0,
            "completion_tokens": tokens,
            "total_tokens": tokens,
            "cost_micros": 0,
            "model_breakdown": "{}",
            "call_details": "[]",
            "estimated": True,
            "thread_id": row["thread_id"],
            "message_id": row["id"],
            "user_id": owner_id,
            "now": now,
        },
    )


async def _retrying_busy_race(
    conn: Conn, thread_id: str, turn_id: str, attempt: Callable[[], Awaitable[TurnOpened]]
) -> TurnOpened:
    """``attempt`` (one ``open_turn`` statement), run again when it lost a race for the
    busy index (PostgreSQL).

    The statement's snapshot predates a concurrent opener's commit, so its checks
    can pass while the insert of the shell then collides on the thread's one
    streaming slot (``_BusyRace``) – whether the winner opened *this* turn (a double
    submit) or another one. The failed statement wrote nothing; run again (a new
    snapshot, which sees the winner's rows), it resolves to the existing rows or
    reports the other turn as busy through its own checks. Only the race costs the
    extra round trip.
    """
    for _ in range(_BUSY_RACE_RETRIES):
        try:
            return await attempt()
        except _BusyRace:
            continue
    # Still colliding after several fresh snapshots: a storm of distinct turns on
    # one thread. Whoever holds the slot now is busy, and never this turn (its
    # own streaming row would have resolved the open above).
    busy = await conn.fetch_val(_pg_sql.STREAMING_TURN_OF_THREAD, {"thread_id": thread_id})
    if busy == turn_id:
        raise DatabaseUnavailable("open_turn kept losing the race for its own turn")
    return TurnOpened(status="busy", busy_turn_id=busy)


class _TurnsMixin(_StoreBase):
    async def open_turn(
        self,
        thread_id: str,
        owner_id: int,
        turn_id: str,
        user_content: list[dict[str, Any]],
        *,
        lease_owner: str,
        lease_seconds: float,
        with_history: bool = False,
        history_limit: int = 200,
        key_prefix: str | None = None,
        key_hash: str | None = None,
        title: str | None = None,
    ) -> TurnOpened:
        """Write the user row and the assistant shell of a turn, idempotently.

        Nothing is written unless the thread exists and is ``owner_id``'s
        (``thread_not_found``), nor while another turn of the thread streams under
        a live lease (``busy``; an expired one is marked ``interrupted`` first).
        A repeated call for the same turn returns the existing ids with
        ``*_inserted=False`` and the assistant row's status. The thread's
        ``updated_at`` moves only when a row was really inserted. One statement on
        PostgreSQL. Never raises for database failures: ``unavailable``.

        ``with_history=True``: when this call inserted the assistant row (a new
        generation starts, ``assistant_inserted``), ``history`` is the thread's other
        messages (all rows except this turn's), oldest first, at most the
        ``history_limit`` most recent; in the same statement on PostgreSQL, in the
        same transaction on SQLite. Otherwise ``history`` is None.

        ``key_prefix`` and ``key_hash`` (the API key's stored prefix and sha256 hex of
        its secret, both or neither): the same statement (PostgreSQL) or transaction
        (SQLite) first requires that key to exist, be unrevoked and belong to
        ``owner_id``; else nothing is written and the status is ``unauthorized``. This
        lets the gateway skip its authenticate round trip for a key it has seen.

        ``title``: the thread's title if this is its first turn (no message of another
        turn exists), the thread is untitled and this call inserted the assistant row;
        written by the same statement (PostgreSQL) or transaction (SQLite), so a title
        known when the turn opens costs no round trip of its own. ``titled`` says
        whether it was written (``updated_at`` moves only for the inserted rows).
        """
        if history_limit < 0:
            raise ValueError("history_limit must not be negative")
        if (key_prefix is None) != (key_hash is None):
            raise ValueError("key_prefix and key_hash go together")
        key = (key_prefix, key_hash) if key_prefix is not None and key_hash is not None else None
        content = _dump_json(user_content)
        history = history_limit if with_history else None

        async def op(conn: Conn) -> tuple[TurnOpened, str]:
            if self._is_pg:
                opened = await _retrying_busy_race(
                    conn, thread_id, turn_id,
                    lambda: self._open_turn_pg(
                        conn, thread_id, owner_id, turn_id, content, lease_owner,
                        lease_seconds, history, key, title,
                    ),
                )
            else:
                opened = await self._open_turn_sqlite(
                    conn,
                    thread_id,
                    owner_id,
                    turn_id,
                    content,
                    lease_owner,
                    lease_seconds,
                    history,
                    key,
                    title,
                )
            return opened, _open_outcome(opened)

        try:
            return await self._write(
                "open_turn", op, thread_id=thread_id, turn_id=turn_id, owner_id=owner_id
            )
        except DatabaseUnavailable:
            return TurnOpened(status="unavailable")

    async def _open_turn_pg(
        self,
        conn: Conn,
        thread_id: str,
        owner_id: int,
        turn_id: str,
        content: str,
        lease_owner: str,
        lease_seconds: float,
        history_limit: int | None,
        key: tuple[str, str] | None = None,
        title: str | None = None,
    ) -> TurnOpened:
        values: dict[str, Any] = {
            "thread_id": thread_id,
            "owner_id": owner_id,
            "turn_id": turn_id,
            "user_content": content,
            "shell": _SHELL_JSON,
            "lease_owner": lease_owner,
            "lease_seconds": float(lease_seconds),
            "title": title,
        }
        sql = _pg_sql.OPEN_TURN
        if history_limit is not None:
            sql = _pg_sql.OPEN_TURN_WITH_HISTORY
            values["history_limit"] = history_limit
        if key is not None:
            sql = (
                _pg_sql.OPEN_TURN_KEYED if history_limit is None
                else _pg_sql.OPEN_TURN_WITH_HISTORY_KEYED
            )
            values["key_prefix"], values["key_hash"] = key
        try:
            row = await conn.fetch_one(sql, values)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == _BUSY_INDEX:
                raise _BusyRace from exc
            raise
        assert row is not None  # the final SELECT always yields one row
        if key is not None and not row["key_ok"]:
            return TurnOpened(status="unauthorized")
        if not row["thread_found"]:
            return TurnOpened(status="thread_not_found")
        if row["busy_turn_id"] is not None:
            return TurnOpened(status="busy", busy_turn_id=row["busy_turn_id"])
        user_id = row["user_new"] or row["user_old"]
        assistant_id = row["assistant_new"] or row["assistant_old"]
        assistant_status = "streaming" if row["assistant_new"] else row["assistant_old_status"]
        if user_id is None or assistant_id is None:
            # Lost a race: the winner's rows were invisible to our snapshot.
            turn = await conn.fetch_all(
                "SELECT id, role, status FROM messages "
                "WHERE thread_id = :thread_id AND turn_id = :turn_id AND status <> 'superseded'",
                {"thread_id": thread_id, "turn_id": turn_id},
            )
            by_role = {r["role"]: r for r in turn}
            if "user" not in by_role or "assistant" not in by_role:
                raise DatabaseUnavailable("turn rows vanished during open_turn")
            user_id = user_id or by_role["user"]["id"]
            if assistant_id is None:
                assistant_id = by_role["assistant"]["id"]
                assistant_status = by_role["assistant"]["status"]
        return TurnOpened(
            status="opened",
            user_message_id=int(user_id),
            assistant_message_id=int(assistant_id),
            user_inserted=row["user_new"] is not None,
            assistant_inserted=row["assistant_new"] is not None,
            assistant_status=str(assistant_status),
            titled=bool(row["titled"]),
            history=(
                _history_rows(row["history"])
                if history_limit is not None and row["assistant_new"] is not None
                else None
            ),
        )

    async def _open_turn_sqlite(
        self,
        conn: Conn,
        thread_id: str,
        owner_id: int,
        turn_id: str,
        content: str,
        lease_owner: str,
        lease_seconds: float,
        history_limit: int | None,
        key: tuple[str, str] | None = None,
        title: str | None = None,
    ) -> TurnOpened:
        now = utcnow_text()
        ids = {"thread_id": thread_id, "turn_id": turn_id}
        history: list[MessageRow] | None = None
        if key is not None and await conn.fetch_val(
            "SELECT 1 FROM api_keys WHERE prefix = :prefix AND secret_hash = :hash "
            "AND revoked_at IS NULL AND user_id = :owner_id",
            {"prefix": key[0], "hash": key[1], "owner_id": owner_id},
        ) is None:
            return TurnOpened(status="unauthorized")
        found = await conn.fetch_val(
            "SELECT 1 FROM threads WHERE id = :thread_id AND owner_id = :owner_id",
            {"thread_id": thread_id, "owner_id": owner_id},
        )
        if found is None:
            return TurnOpened(status="thread_not_found")
        mine = {
            r["role"]: r
            for r in await conn.fetch_all(
                "SELECT id, role, status FROM messages WHERE thread_id = :thread_id "
                "AND turn_id = :turn_id AND status <> 'superseded'",
                ids,
            )
        }
        if "assistant" not in mine:
            holder = await conn.fetch_one(
                "SELECT id, thread_id, turn_id, content, lease_expires_at FROM messages "
                "WHERE thread_id = :thread_id AND status = 'streaming'",
                {"thread_id": thread_id},
            )
            if holder is not None:
                expires = holder["lease_expires_at"]
                if expires is None or expires >= now:
                    return TurnOpened(status="busy", busy_turn_id=holder["turn_id"])
                await _sqlite_interrupt(conn, holder, owner_id, now)
        user_new = await conn.fetch_val(
            "INSERT INTO messages (thread_id, role, content, status, author_id, turn_id, "
            "created_at, updated_at) VALUES (:thread_id, 'user', :content, 'complete', "
            ":owner_id, :turn_id, :now, :now) "
            + _pg_sql.ON_TURN_CONFLICT + " "
            "RETURNING id",
            {**ids, "content": content, "owner_id": owner_id, "now": now},
        )
        assistant_new = await conn.fetch_val(
            "INSERT INTO messages (thread_id, role, content, status, turn_id, lease_owner, "
            "lease_expires_at, created_at, updated_at) VALUES (:thread_id, 'assistant', "
            ":shell, 'streaming', :turn_id, :lease_owner, :expires, :now, :now) "
            + _pg_sql.ON_TURN_CONFLICT + " "
            "RETURNING id",
            {
                **ids,
                "shell": _SHELL_JSON,
                "lease_owner": lease_owner,
                "expires": _plus_seconds(now, lease_seconds),
                "now": now,
            },
        )
        if user_new is not None or assistant_new is not None:
            await conn.execute(
                "UPDATE threads SET updated_at = :now WHERE id = :thread_id",
                {"thread_id": thread_id, "now": now},
            )
        titled = title is not None and assistant_new is not None and await conn.fetch_val(
            "UPDATE threads SET title = :title WHERE id = :thread_id AND title IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM messages WHERE thread_id = :thread_id "
            "AND (turn_id IS NULL OR turn_id <> :turn_id)) RETURNING id",
            {**ids, "title": title},
        ) is not None
        if history_limit is not None and assistant_new is not None:
            rows = await conn.fetch_all(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE thread_id = :thread_id "
                "AND (turn_id IS NULL OR turn_id <> :turn_id) AND status <> 'superseded' "
                "ORDER BY id DESC LIMIT :limit",
                {**ids, "limit": history_limit},
            )
            history = [_message_row(r) for r in reversed(rows)]
        return TurnOpened(
            status="opened",
            user_message_id=int(user_new if user_new is not None else mine["user"]["id"]),
            assistant_message_id=int(
                assistant_new if assistant_new is not None else mine["assistant"]["id"]
            ),
            user_inserted=user_new is not None,
            assistant_inserted=assistant_new is not None,
            assistant_status=(
                "streaming" if assistant_new is not None else str(mine["assistant"]["status"])
            ),
            titled=titled,
            history=history,
        )


class _RegenerateMixin(_StoreBase):
    async def regenerate_turn(
        self,
        thread_id: str,
        owner_id: int,
        turn_id: str,
        *,
        replaces: int | None,
        lease_owner: str,
        lease_seconds: float,
        history_limit: int = 200,
    ) -> TurnOpened:
        """Start a new reply to a turn's user message, keeping the old one ``superseded``.

        Only the thread's last turn can be regenerated (``not_last_turn``). ``replaces``
        names the reply the caller saw; if the turn's current reply is another one, a
        regeneration already happened (a double click) and its row is returned with
        ``assistant_inserted=False`` to attach to or replay, as when ``replaces`` is
        None and the current reply still streams. A current reply that streams and is
        the one to replace is ``busy``: the caller stops it first. One transaction on
        both databases (the thread row locked on PostgreSQL), so two regenerations at
        once make one new row. Never raises for database failures: ``unavailable``.
        """

        async def op(conn: Conn) -> tuple[TurnOpened, str]:
            async with self._transaction(conn):
                opened = await self._regenerate(
                    conn, thread_id, owner_id, turn_id, replaces, lease_owner,
                    lease_seconds, history_limit,
                )
            return opened, _open_outcome(opened)

        try:
            return await self._write(
                "regenerate_turn", op, thread_id=thread_id, turn_id=turn_id,
                owner_id=owner_id,
            )
        except DatabaseUnavailable:
            return TurnOpened(status="unavailable")

    async def _regenerate(
        self, conn: Conn, thread_id: str, owner_id: int, turn_id: str, replaces: int | None,
        lease_owner: str, lease_seconds: float, history_limit: int,
    ) -> TurnOpened:
        lock = " FOR UPDATE" if self._is_pg else ""
        ids = {"thread_id": thread_id, "turn_id": turn_id}
        if await conn.fetch_val(
            f"SELECT 1 FROM threads WHERE id = :thread_id AND owner_id = :owner_id{lock}",
            {"thread_id": thread_id, "owner_id": owner_id},
        ) is None:
            return TurnOpened(status="thread_not_found")
        mine = {
            r["role"]: r
            for r in await conn.fetch_all(
                "SELECT id, role, status, content FROM messages WHERE thread_id = :thread_id "
                "AND turn_id = :turn_id AND status <> 'superseded'",
                ids,
            )
        }
        user = mine.get("user")
        if user is None:
            return TurnOpened(status="turn_not_found")
        later = await conn.fetch_val(
            "SELECT 1 FROM messages WHERE thread_id = :thread_id AND id > :user_id "
            "AND (turn_id IS NULL OR turn_id <> :turn_id) LIMIT 1",
            {**ids, "user_id": user["id"]},
        )
        if later is not None:
            return TurnOpened(status="not_last_turn")
        current = mine.get("assistant")
        if current is not None and (
            (replaces is not None and int(current["id"]) != replaces)
            or (replaces is None and current["status"] == "streaming")
        ):
            return TurnOpened(
                status="opened", user_message_id=int(user["id"]),
                assistant_message_id=int(current["id"]),
                assistant_status=str(current["status"]),
            )
        if current is not None and current["status"] == "streaming":
            return TurnOpened(status="busy", busy_turn_id=turn_id)
        now = utcnow_text()
        if current is not None:
            await conn.execute(
                "UPDATE messages SET status = 'superseded', updated_at = :now WHERE id = :id",
                {"id": current["id"], "now": self._ts_param(now)},
            )
        expires = _plus_seconds(now, lease_seconds)
        new_id = await conn.fetch_val(
            "INSERT INTO messages (thread_id, role, content, status, turn_id, lease_owner, "
            "lease_expires_at, created_at, updated_at) VALUES (:thread_id, 'assistant', "
            f"{'CAST(:shell AS jsonb)' if self._is_pg else ':shell'}, 'streaming', :turn_id, "
            ":lease_owner, :expires, "
            ":now, :now) RETURNING id",
            {**ids, "shell": _SHELL_JSON, "lease_owner": lease_owner,
             "expires": self._ts_param(expires), "now": self._ts_param(now)},
        )
        await conn.execute(
            "UPDATE threads SET updated_at = :now WHERE id = :thread_id",
            {"thread_id": thread_id, "now": self._ts_param(now)},
        )
        rows = await conn.fetch_all(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE thread_id = :thread_id "
            "AND (turn_id IS NULL OR turn_id <> :turn_id) AND status <> 'superseded' "
            "ORDER BY id DESC LIMIT :limit",
            {**ids, "limit": history_limit},
        )
        return TurnOpened(
            status="opened", user_message_id=int(user["id"]), assistant_message_id=int(new_id),
            assistant_inserted=True, assistant_status="streaming",
            history=[_message_row(r) for r in reversed(rows)],
            user_content=_load_json(user["content"]),
        )


def _open_outcome(opened: TurnOpened) -> str:
    if opened.status == "unauthorized":
        return "unauthorized"
    if opened.status == "thread_not_found":
        return "row_missing"
    if opened.status == "busy":
        return "conflict_no_match"
    if opened.user_inserted or opened.assistant_inserted:
        return "inserted"
    return "race_recovered"
