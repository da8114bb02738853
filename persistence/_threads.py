"""Threads, and the read side: messages, turns, usage rows."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from persistence._base import _dump_json, _iso, _load_json, _StoreBase, utcnow_text
from persistence._sql import Conn
from persistence.rows import MessageRow, ThreadRow, TurnRows, UsageRecord, UsageRow
from turngate.exceptions import PersistenceError

_MAX_THREAD_ID = 200
_MAX_PAGE = 500
_MESSAGE_COLUMNS = "id, thread_id, role, content, status, turn_id, created_at, updated_at"


class ThreadIdTaken(PersistenceError):
    """A client-chosen thread id already belongs to another user."""


# The thread is untitled and ``turn_id`` is its first turn, answered for the first time:
# no message of another turn is older than the first message of that turn (the user row
# of any later turn is newer), and no reply of it was regenerated away (a title the user
# cleared is not given back by a regenerate).
_UNTITLED_FIRST_TURN = (
    "threads.id = :thread_id AND threads.owner_id = :owner_id AND threads.title IS NULL "
    "AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.thread_id = :thread_id "
    "AND (m.turn_id IS NULL OR m.turn_id <> :turn_id) AND m.id < "
    "(SELECT min(f.id) FROM messages f WHERE f.thread_id = :thread_id "
    "AND f.turn_id = :turn_id)) "
    "AND NOT EXISTS (SELECT 1 FROM messages r WHERE r.thread_id = :thread_id "
    "AND r.turn_id = :turn_id AND r.status = 'superseded')"
)
_SET_TITLE = (
    "UPDATE threads SET title = :title WHERE " + _UNTITLED_FIRST_TURN + " RETURNING id"
)
# The title model's usage row: no message (``message_id`` NULL), its own ``usage_type``.
_TITLE_USAGE_COLUMNS = (
    "INSERT INTO token_usage (usage_type, prompt_tokens, completion_tokens, total_tokens, "
    "cost_micros, model_breakdown, call_details, estimated, thread_id, message_id, "
    "user_id, created_at) VALUES (:usage_type, :prompt_tokens, :completion_tokens, "
    ":total_tokens, :cost_micros, "
)
_SQLITE_TITLE_USAGE = (
    _TITLE_USAGE_COLUMNS + ":model_breakdown, :call_details, :estimated, :thread_id, NULL, "
    ":owner_id, :now)"
)
# One statement on PostgreSQL: the usage row is written whether or not the title is.
_PG_SET_TITLE_WITH_USAGE = (
    "WITH titled AS (" + _SET_TITLE + "), usage AS ("
    + _TITLE_USAGE_COLUMNS
    + "CAST(:model_breakdown AS jsonb), CAST(:call_details AS jsonb), :estimated, "
    ":thread_id, NULL, :owner_id, now()) RETURNING id) "
    "SELECT (SELECT count(*) FROM titled) AS titled, (SELECT count(*) FROM usage) AS usage"
)


def _encode_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> list[Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor") from exc
    if not isinstance(values, list):
        raise ValueError("invalid cursor")
    return values


def _clamp_limit(limit: int) -> int:
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return min(limit, _MAX_PAGE)


def _thread_row(row: Any) -> ThreadRow:
    return ThreadRow(
        id=str(row["id"]),
        owner_id=int(row["owner_id"]),
        title=row["title"],
        created_at=_iso(row["created_at"]),
        updated_at=_iso(row["updated_at"]),
    )


def _message_row(row: Any) -> MessageRow:
    return MessageRow(
        id=int(row["id"]),
        thread_id=str(row["thread_id"]),
        role=str(row["role"]),
        content=_load_json(row["content"]),
        status=str(row["status"]),
        turn_id=row["turn_id"],
        created_at=_iso(row["created_at"]),
        updated_at=_iso(row["updated_at"]),
        event_map=_load_json(row["event_map"]) if "event_map" in row.keys() else None,
    )


def _usage_row(row: Any) -> UsageRow:
    return UsageRow(
        id=int(row["id"]),
        usage_type=str(row["usage_type"]),
        prompt_tokens=int(row["prompt_tokens"]),
        completion_tokens=int(row["completion_tokens"]),
        total_tokens=int(row["total_tokens"]),
        cost_micros=int(row["cost_micros"]),
        model_breakdown=_load_json(row["model_breakdown"]),
        call_details=_load_json(row["call_details"]),
        estimated=bool(row["estimated"]),
        thread_id=str(row["thread_id"]),
        message_id=None if row["message_id"] is None else int(row["message_id"]),
        user_id=int(row["user_id"]),
        created_at=_iso(row["created_at"]),
    )


class _ThreadsMixin(_StoreBase):
    async def create_thread(
        self, owner_id: int, thread_id: str | None = None, title: str | None = None
    ) -> tuple[ThreadRow, bool]:
        """Create a thread; returns ``(row, created)``.

        ``thread_id`` None → a server-made UUID. An existing id of the same owner
        is returned with ``created=False`` (idempotent); another owner's id raises
        ``ThreadIdTaken``. An empty or over-long id raises ``ValueError``.
        """
        if thread_id is None:
            thread_id = str(uuid.uuid4())
        if not thread_id or len(thread_id) > _MAX_THREAD_ID:
            raise ValueError(f"thread id must be 1..{_MAX_THREAD_ID} characters")
        now = self._ts_param(utcnow_text())
        tid = thread_id

        async def op(conn: Conn) -> tuple[tuple[ThreadRow | None, bool], str]:
            row = await conn.fetch_one(
                "INSERT INTO threads (id, owner_id, title, created_at, updated_at) "
                "VALUES (:id, :owner_id, :title, :now, :now) "
                "ON CONFLICT (id) DO NOTHING "
                "RETURNING id, owner_id, title, created_at, updated_at",
                {"id": tid, "owner_id": owner_id, "title": title, "now": now},
            )
            if row is not None:
                return (_thread_row(row), True), "inserted"
            row = await conn.fetch_one(
                "SELECT id, owner_id, title, created_at, updated_at FROM threads WHERE id = :id",
                {"id": tid},
            )
            existing = None if row is None else _thread_row(row)
            if existing is None or existing.owner_id != owner_id:
                return (existing, False), "conflict_no_match"
            return (existing, False), "race_recovered"

        result, created = await self._write(
            "create_thread", op, thread_id=tid, owner_id=owner_id
        )
        if result is None or result.owner_id != owner_id:
            raise ThreadIdTaken(f"thread id {tid!r} is taken")
        return result, created

    async def get_thread(self, thread_id: str, owner_id: int) -> ThreadRow | None:
        """The thread if it exists and belongs to ``owner_id``, else None."""
        row = await self._run(
            lambda c: c.fetch_one(
                "SELECT id, owner_id, title, created_at, updated_at FROM threads "
                "WHERE id = :id AND owner_id = :owner_id",
                {"id": thread_id, "owner_id": owner_id},
            )
        )
        return None if row is None else _thread_row(row)

    async def rename_thread(
        self, thread_id: str, owner_id: int, title: str | None
    ) -> ThreadRow | None:
        """Set the title of the owner's thread (``updated_at`` too); None if not theirs."""
        now = self._ts_param(utcnow_text())

        async def op(conn: Conn) -> tuple[ThreadRow | None, str]:
            row = await conn.fetch_one(
                "UPDATE threads SET title = :title, updated_at = :now "
                "WHERE id = :id AND owner_id = :owner_id "
                "RETURNING id, owner_id, title, created_at, updated_at",
                {"id": thread_id, "owner_id": owner_id, "title": title, "now": now},
            )
            return (None, "not_found") if row is None else (_thread_row(row), "updated")

        return await self._write("rename_thread", op, thread_id=thread_id, owner_id=owner_id)

    async def thread_needs_title(self, thread_id: str, owner_id: int, turn_id: str) -> bool:
        """Whether the owner's thread is untitled and ``turn_id`` is its first turn (what
        ``set_title_if_untitled`` requires), read before paying a model for a title."""
        found = await self._run(
            lambda c: c.fetch_val(
                "SELECT 1 FROM threads WHERE " + _UNTITLED_FIRST_TURN,
                {"thread_id": thread_id, "owner_id": owner_id, "turn_id": turn_id},
            )
        )
        return found is not None

    async def set_title_if_untitled(
        self, thread_id: str, owner_id: int, turn_id: str, title: str,
        *, usage: UsageRecord | None = None,
    ) -> bool:
        """Title the owner's thread after its first turn ``turn_id``, only if it is still
        untitled (a title the user set meanwhile stays); True if this call set it.

        ``updated_at`` is left alone: a title the gateway gives does not move the thread
        in the list. ``usage``: the token usage of the call that made the title, stored
        in the same transaction as its own ``token_usage`` row (``message_id`` NULL,
        ``user_id`` the owner) whether or not the title is set, since it was paid for.
        """
        values: dict[str, Any] = {
            "thread_id": thread_id, "owner_id": owner_id, "turn_id": turn_id, "title": title,
        }
        if usage is not None:
            values |= {
                "usage_type": usage.usage_type,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
                "cost_micros": usage.cost_micros,
                "model_breakdown": _dump_json(usage.model_breakdown),
                "call_details": _dump_json(usage.call_details),
                "estimated": usage.estimated,
            }

        async def op(conn: Conn) -> tuple[bool, str]:
            if usage is None:
                titled = await conn.fetch_val(_SET_TITLE, values) is not None
            elif self._is_pg:
                row = await conn.fetch_one(_PG_SET_TITLE_WITH_USAGE, values)
                titled = row is not None and int(row["titled"]) > 0
            else:
                # The writer runs this op in its own savepoint: both rows or neither.
                titled = await conn.fetch_val(_SET_TITLE, values) is not None
                await conn.execute(_SQLITE_TITLE_USAGE, values | {"now": utcnow_text()})
            return titled, "updated" if titled else "kept"

        return await self._write(
            "set_title", op, thread_id=thread_id, owner_id=owner_id, turn_id=turn_id
        )

    async def delete_thread(self, thread_id: str, owner_id: int) -> int | None:
        """Delete the owner's thread and its messages; the number of messages, None if
        not theirs. ``token_usage`` rows are kept: they are the audit trail (no foreign
        keys), still listed by ``list_usage`` with the deleted thread's id."""

        async def op(conn: Conn) -> tuple[int | None, str]:
            async with self._transaction(conn):
                owned = await conn.fetch_one(
                    "SELECT id FROM threads WHERE id = :id AND owner_id = :owner_id",
                    {"id": thread_id, "owner_id": owner_id},
                )
                if owned is None:
                    return None, "not_found"
                count = await conn.fetch_val(
                    "SELECT COUNT(*) FROM messages WHERE thread_id = :id", {"id": thread_id}
                )
                await conn.execute("DELETE FROM messages WHERE thread_id = :id", {"id": thread_id})
                await conn.execute("DELETE FROM threads WHERE id = :id", {"id": thread_id})
            return int(count), "deleted"

        return await self._write("delete_thread", op, thread_id=thread_id, owner_id=owner_id)

    async def list_threads(
        self, owner_id: int, *, limit: int = 50, before: str | None = None
    ) -> tuple[list[ThreadRow], str | None]:
        """The owner's threads, newest ``updated_at`` first (ties by id, descending).

        Returns the page and an opaque cursor for the next page (None at the end);
        pass it back as ``before``. A cursor that cannot be read raises ``ValueError``.
        """
        limit = _clamp_limit(limit)
        values: dict[str, Any] = {"owner_id": owner_id, "limit": limit + 1}
        where = "owner_id = :owner_id"
        if before is not None:
            cursor = _decode_cursor(before)
            if len(cursor) != 2 or not all(isinstance(v, str) for v in cursor):
                raise ValueError("invalid cursor")
            try:
                values["c_updated"] = self._ts_param(cursor[0])
            except ValueError as exc:
                raise ValueError("invalid cursor") from exc
            values["c_id"] = cursor[1]
            # Spelled out rather than a row comparison so both planners use the index.
            where += " AND (updated_at < :c_updated OR (updated_at = :c_updated AND id < :c_id))"
        rows = await self._run(
            lambda c: c.fetch_all(
                "SELECT id, owner_id, title, created_at, updated_at FROM threads "
                f"WHERE {where} ORDER BY updated_at DESC, id DESC LIMIT :limit",
                values,
            )
        )
        page = [_thread_row(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = _encode_cursor(page[-1].updated_at, page[-1].id)
        return page, next_cursor

    async def list_messages(
        self, thread_id: str, owner_id: int, *, include_superseded: bool = False
    ) -> list[MessageRow] | None:
        """The thread's messages in order, or None if the thread is not the owner's.

        Replies replaced by a regenerated one (``superseded``) only when asked for.
        """
        current = "" if include_superseded else " AND m.status <> 'superseded'"
        rows = await self._run(
            lambda c: c.fetch_all(
                "SELECT t.id AS owned, m.id, m.thread_id, m.role, m.content, m.status, "
                "m.turn_id, m.created_at, m.updated_at "
                f"FROM threads t LEFT JOIN messages m ON m.thread_id = t.id{current} "
                "WHERE t.id = :thread_id AND t.owner_id = :owner_id ORDER BY m.id",
                {"thread_id": thread_id, "owner_id": owner_id},
            )
        )
        if not rows:
            return None
        return [_message_row(r) for r in rows if r["id"] is not None]

    async def get_turn(self, thread_id: str, turn_id: str) -> TurnRows:
        """The user and assistant rows of one turn (either may be None), with their
        ``event_map``."""
        rows = await self._run(
            lambda c: c.fetch_all(
                f"SELECT {_MESSAGE_COLUMNS}, event_map FROM messages "
                "WHERE thread_id = :thread_id AND turn_id = :turn_id "
                "AND status <> 'superseded'",
                {"thread_id": thread_id, "turn_id": turn_id},
            )
        )
        by_role = {str(r["role"]): _message_row(r) for r in rows}
        return TurnRows(user=by_role.get("user"), assistant=by_role.get("assistant"))

    async def list_usage(
        self,
        user_id: int,
        *,
        thread_id: str | None = None,
        message_id: int | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> tuple[list[UsageRow], str | None]:
        """The user's token_usage rows, newest first, optionally of one thread or message."""
        limit = _clamp_limit(limit)
        values: dict[str, Any] = {"user_id": user_id, "limit": limit + 1}
        where = "user_id = :user_id"
        if thread_id is not None:
            where += " AND thread_id = :thread_id"
            values["thread_id"] = thread_id
        if message_id is not None:
            where += " AND message_id = :message_id"
            values["message_id"] = message_id
        if before is not None:
            cursor = _decode_cursor(before)
            if len(cursor) != 1 or not isinstance(cursor[0], int):
                raise ValueError("invalid cursor")
            where += " AND id < :c_id"
            values["c_id"] = cursor[0]
        rows = await self._run(
            lambda c: c.fetch_all(
                "SELECT id, usage_type, prompt_tokens, completion_tokens, total_tokens, "
                "cost_micros, model_breakdown, call_details, estimated, thread_id, "
                f"message_id, user_id, created_at FROM token_usage WHERE {where} "
                "ORDER BY id DESC LIMIT :limit",
                values,
            )
        )
        page = [_usage_row(r) for r in rows[:limit]]
        next_cursor = _encode_cursor(page[-1].id) if len(rows) > limit else None
        return page, next_cursor
