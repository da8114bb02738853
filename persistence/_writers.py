"""The other turn writers: legacy append, checkpoint, finalize, lease recovery."""

from __future__ import annotations

import logging
from typing import Any

from persistence import _pg_sql
from persistence._base import _dump_json, _StoreBase, _utcnow_text
from persistence._sql import Conn
from persistence._turns import (
    _SQLITE_USAGE_INSERT,
    FINAL_STATUSES,
    _plus_seconds,
    _sqlite_interrupt,
)
from persistence.content import NO_TEXT_MARKER, is_empty_assistant_content
from persistence.rows import AppendOutcome, AppendResult, UsageRecord

logger = logging.getLogger("turngate.persistence")

_ROLES = frozenset({"user", "assistant"})


class _WritersMixin(_StoreBase):
    async def append_message(
        self,
        thread_id: str,
        owner_id: int,
        role: str,
        content: list[dict[str, Any]],
        turn_id: str | None = None,
    ) -> AppendResult | None:
        """The legacy route's writer: store one message with status ``complete``.

        Idempotent on ``(thread_id, turn_id, role)``: on conflict the existing row's
        id is returned with ``inserted=False`` (outcome ``race_recovered``). Returns
        None, writing nothing, if the thread is not ``owner_id``'s. Never touches
        token_usage. ``role`` must be ``user`` or ``assistant`` (else ``ValueError``);
        raises ``DatabaseUnavailable`` if the database fails.
        """
        if role not in _ROLES:
            raise ValueError(f"role must be one of {sorted(_ROLES)}")
        values = {
            "thread_id": thread_id,
            "owner_id": owner_id,
            "role": role,
            "content": _dump_json(content),
            "author_id": owner_id if role == "user" else None,
            "turn_id": turn_id,
        }

        async def op(conn: Conn) -> tuple[AppendResult | None, str]:
            if self._is_pg:
                row = await conn.fetch_one(_pg_sql.APPEND_MESSAGE, values)
                assert row is not None
                if not row["thread_found"]:
                    return None, "row_missing"
                new_id, old_id = row["new_id"], row["old_id"]
                if new_id is None and old_id is None and turn_id is not None:
                    # Lost a race: the winner's row was invisible to our snapshot.
                    old_id = await conn.fetch_val(
                        "SELECT id FROM messages WHERE thread_id = :thread_id "
                        "AND turn_id = :turn_id AND role = :role",
                        {"thread_id": thread_id, "turn_id": turn_id, "role": role},
                    )
            else:
                new_id, old_id, found = await self._append_sqlite(conn, values)
                if not found:
                    return None, "row_missing"
            return _append_result(new_id, old_id)

        return await self._shielded(
            "append_message", op, thread_id=thread_id, turn_id=turn_id, role=role
        )

    async def _append_sqlite(self, conn: Conn, values: dict[str, Any]) -> tuple[Any, Any, bool]:
        now = _utcnow_text()
        async with self._sqlite_writer(conn):
            found = await conn.fetch_val(
                "SELECT 1 FROM threads WHERE id = :thread_id AND owner_id = :owner_id",
                {"thread_id": values["thread_id"], "owner_id": values["owner_id"]},
            )
            if found is None:
                return None, None, False
            new_id = await conn.fetch_val(
                "INSERT INTO messages (thread_id, role, content, status, author_id, turn_id, "
                "created_at, updated_at) VALUES (:thread_id, :role, :content, 'complete', "
                ":author_id, :turn_id, :now, :now) "
                "ON CONFLICT (thread_id, turn_id, role) WHERE turn_id IS NOT NULL DO NOTHING "
                "RETURNING id",
                {k: v for k, v in values.items() if k != "owner_id"} | {"now": now},
            )
            if new_id is not None:
                await conn.execute(
                    "UPDATE threads SET updated_at = :now WHERE id = :thread_id",
                    {"thread_id": values["thread_id"], "now": now},
                )
                return new_id, None, True
            old_id = await conn.fetch_val(
                "SELECT id FROM messages WHERE thread_id = :thread_id "
                "AND turn_id = :turn_id AND role = :role",
                {k: values[k] for k in ("thread_id", "turn_id", "role")},
            )
            return None, old_id, True

    async def checkpoint(
        self,
        message_id: int,
        content: list[dict[str, Any]],
        *,
        lease_owner: str,
        lease_seconds: float,
    ) -> bool:
        """Save partial content of a streaming row and extend its lease (one statement).

        False if the row is no longer streaming or its lease belongs to another
        owner (the turn was finalized or taken over). Raises ``DatabaseUnavailable``.
        """
        payload = _dump_json(content)

        async def op(conn: Conn) -> tuple[bool, str]:
            if self._is_pg:
                done = await conn.fetch_val(
                    _pg_sql.CHECKPOINT,
                    {
                        "message_id": message_id,
                        "content": payload,
                        "lease_owner": lease_owner,
                        "lease_seconds": float(lease_seconds),
                    },
                )
            else:
                now = _utcnow_text()
                async with self._sqlite_writer(conn):
                    done = await conn.fetch_val(
                        "UPDATE messages SET content = :content, updated_at = :now, "
                        "lease_expires_at = :expires WHERE id = :message_id "
                        "AND status = 'streaming' AND lease_owner = :lease_owner RETURNING id",
                        {
                            "message_id": message_id,
                            "content": payload,
                            "lease_owner": lease_owner,
                            "now": now,
                            "expires": _plus_seconds(now, lease_seconds),
                        },
                    )
            return done is not None, "ok" if done is not None else "row_missing"

        return await self._shielded("checkpoint", op, message_id=message_id)

    async def renew_leases(self, lease_owner: str, lease_seconds: float) -> int:
        """Extend the lease of every ``streaming`` row of ``lease_owner`` (one statement).

        For the maintenance loop: one statement per interval for all of this
        process's running turns whose content did not change since their last
        checkpoint (those that changed go through ``checkpoint``). Content and
        ``updated_at`` are not touched. Returns how many rows were renewed. Raises
        ``DatabaseUnavailable``.
        """
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")

        async def op(conn: Conn) -> tuple[int, str]:
            if self._is_pg:
                count = int(
                    await conn.fetch_val(
                        _pg_sql.RENEW_LEASES,
                        {"lease_owner": lease_owner, "lease_seconds": float(lease_seconds)},
                    )
                )
            else:
                # One autocommit statement: the write lock only queues our own writers.
                async with self._write_lock:
                    rows = await conn.fetch_all(
                        "UPDATE messages SET lease_expires_at = :expires "
                        "WHERE lease_owner = :lease_owner AND status = 'streaming' RETURNING id",
                        {
                            "lease_owner": lease_owner,
                            "expires": _plus_seconds(_utcnow_text(), lease_seconds),
                        },
                    )
                count = len(rows)
            return count, "ok" if count else "row_missing"

        return await self._shielded("renew_leases", op, lease_owner=lease_owner)

    async def finalize_turn(
        self,
        message_id: int,
        thread_id: str,
        user_id: int,
        content: list[dict[str, Any]],
        status: str,
        usage: UsageRecord,
    ) -> str:
        """Store the final content and status of a streaming row and its one usage row.

        Empty content (no text, reasoning or tool call) is stored as the
        ``(no text response)`` status marker. A row that is no longer streaming is
        not overwritten (outcome ``row_missing``), but the usage row is inserted
        regardless, at most once per message. One statement on PostgreSQL. Never
        raises: returns ``ok``, ``row_missing`` or ``failed`` (and logs it).
        """
        if is_empty_assistant_content(content):
            content = NO_TEXT_MARKER
        values: dict[str, Any] = {
            "message_id": message_id,
            "content": _dump_json(content),
            "status": status,
            "usage_type": usage.usage_type,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "cost_micros": usage.cost_micros,
            "model_breakdown": _dump_json(usage.model_breakdown),
            "call_details": _dump_json(usage.call_details),
            "estimated": usage.estimated,
            "thread_id": thread_id,
            "user_id": user_id,
        }

        async def op(conn: Conn) -> tuple[str, str]:
            if status not in FINAL_STATUSES:
                raise ValueError(f"not a final status: {status!r}")
            if self._is_pg:
                row = await conn.fetch_one(_pg_sql.FINALIZE_TURN, values)
                assert row is not None
                updated = bool(row["updated"])
            else:
                updated = await self._finalize_sqlite(conn, values)
            outcome = "ok" if updated else "row_missing"
            return outcome, outcome

        try:
            return await self._shielded(
                "finalize_turn", op, message_id=message_id, thread_id=thread_id, status=status
            )
        except Exception:
            logger.exception("finalize_turn failed for message %s", message_id)
            return "failed"

    async def _finalize_sqlite(self, conn: Conn, values: dict[str, Any]) -> bool:
        now = _utcnow_text()
        async with self._sqlite_writer(conn):
            updated = await conn.fetch_val(
                "UPDATE messages SET content = :content, status = :status, updated_at = :now, "
                "lease_owner = NULL, lease_expires_at = NULL "
                "WHERE id = :message_id AND status = 'streaming' RETURNING id",
                {k: values[k] for k in ("content", "status", "message_id")} | {"now": now},
            )
            usage = {k: v for k, v in values.items() if k not in ("content", "status")}
            await conn.fetch_val(_SQLITE_USAGE_INSERT, usage | {"now": now})
        return updated is not None

    async def recover_expired_turns(self) -> list[int]:
        """Mark rows left ``streaming`` under an expired lease as ``interrupted``.

        Their checkpointed content stays; each gets one estimated token_usage row
        (prompt 0, completion ≈ ceil(chars / 4)). Returns the ids. For start-up and
        a periodic sweep; raises ``DatabaseUnavailable``.
        """

        async def op(conn: Conn) -> tuple[list[int], str]:
            if self._is_pg:
                rows = await conn.fetch_all(_pg_sql.RECOVER_EXPIRED)
                ids = [int(r["id"]) for r in rows]
            else:
                ids = await self._recover_sqlite(conn)
            return ids, "ok" if ids else "row_missing"

        return await self._shielded("recover_expired_turns", op)

    async def _recover_sqlite(self, conn: Conn) -> list[int]:
        now = _utcnow_text()
        async with self._sqlite_writer(conn):
            rows = await conn.fetch_all(
                "SELECT m.id, m.thread_id, m.content, t.owner_id FROM messages m "
                "JOIN threads t ON t.id = m.thread_id "
                "WHERE m.status = 'streaming' AND m.lease_expires_at < :now ORDER BY m.id",
                {"now": now},
            )
            for row in rows:
                await _sqlite_interrupt(conn, row, int(row["owner_id"]), now)
        return [int(r["id"]) for r in rows]

    async def ping(self) -> bool:
        """True if the database answers ``SELECT 1`` in time; never raises."""
        try:
            return bool(await self._run(lambda c: c.fetch_val("SELECT 1")) == 1)
        except Exception:
            return False


def _append_result(new_id: Any, old_id: Any) -> tuple[AppendResult, str]:
    outcome: AppendOutcome
    if new_id is not None:
        outcome = "inserted"
    elif old_id is not None:
        outcome = "race_recovered"
    else:
        outcome = "conflict_no_match"
    row_id = new_id if new_id is not None else old_id
    result = AppendResult(
        id=None if row_id is None else int(row_id), inserted=new_id is not None, outcome=outcome
    )
    return result, outcome
