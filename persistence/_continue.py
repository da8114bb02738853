"""Pausing a turn (``requires_action``) and continuing it, once.

A turn that waits for a person's approval or a client-side tool's output is
finalized as ``requires_action`` (``finalize_turn``), after ``pause_turn`` kept what
it continues with. ``continue_turn`` takes it back: one conditional UPDATE from
``requires_action`` to ``streaming`` under the caller's lease, so of two answers
(a double click, two replicas) exactly one continues; the other finds the row no
longer paused.
"""

from __future__ import annotations

import logging
from typing import Any

from persistence._base import _dump_json, _load_json, _StoreBase, utcnow_text
from persistence._sql import Conn
from persistence._threads import _MESSAGE_COLUMNS, _message_row
from persistence._turns import _plus_seconds
from persistence.rows import TurnContinued
from turngate.exceptions import DatabaseUnavailable

logger = logging.getLogger("turngate.persistence")


class _ContinueMixin(_StoreBase):
    async def pause_turn(self, message_id: int, resume_with: dict[str, Any]) -> bool:
        """Keep ``resume_with`` (the model string and client tools) on a streaming
        row about to be finalized as ``requires_action``. False if it is not streaming."""

        async def op(conn: Conn) -> tuple[bool, str]:
            done = await conn.fetch_val(
                "UPDATE messages SET resume_with = :resume_with "
                "WHERE id = :id AND status = 'streaming' RETURNING id",
                {"id": message_id, "resume_with": _dump_json(resume_with)},
            )
            return done is not None, "ok" if done is not None else "row_missing"

        return await self._write("pause_turn", op, message_id=message_id)

    async def continue_turn(
        self,
        thread_id: str,
        owner_id: int,
        turn_id: str,
        *,
        lease_owner: str,
        lease_seconds: float,
        history_limit: int = 200,
        claim: bool = True,
    ) -> TurnContinued:
        """Take the paused reply of ``turn_id`` back to ``streaming`` under our lease.

        With ``claim=False`` only look: ``paused`` with its parts, event map and
        ``resume_with`` (what an answer is checked against), nothing written.

        ``continued`` with the reply's parts, event map, ``resume_with``, its usage
        row's calls, the turn's user content and the thread's earlier messages;
        else ``thread_not_found`` (not the caller's), ``turn_not_found``,
        ``not_paused`` (not waiting: answered already, or never paused; with its
        ``assistant_status``), ``busy`` (another turn streams on the thread) or
        ``unavailable``. Never raises for database failures.
        """

        async def op(conn: Conn) -> tuple[TurnContinued, str]:
            async with self._transaction(conn):
                found = await self._continue(
                    conn, thread_id, owner_id, turn_id, lease_owner, lease_seconds,
                    history_limit, claim,
                )
            return found, found.status

        try:
            return await self._write("continue_turn", op, thread_id=thread_id,
                                     turn_id=turn_id, owner_id=owner_id)
        except DatabaseUnavailable:
            return TurnContinued(status="unavailable")

    async def _continue(
        self, conn: Conn, thread_id: str, owner_id: int, turn_id: str, lease_owner: str,
        lease_seconds: float, history_limit: int, claim: bool,
    ) -> TurnContinued:
        lock = " FOR UPDATE" if self._is_pg and claim else ""
        ids = {"thread_id": thread_id, "turn_id": turn_id}
        if await conn.fetch_val(
            f"SELECT 1 FROM threads WHERE id = :thread_id AND owner_id = :owner_id{lock}",
            {"thread_id": thread_id, "owner_id": owner_id},
        ) is None:
            return TurnContinued(status="thread_not_found")
        mine = {
            str(r["role"]): r
            for r in await conn.fetch_all(
                "SELECT id, role, status, content, event_map, resume_with FROM messages "
                "WHERE thread_id = :thread_id AND turn_id = :turn_id "
                "AND status <> 'superseded'",
                ids,
            )
        }
        user, reply = mine.get("user"), mine.get("assistant")
        if user is None or reply is None:
            return TurnContinued(status="turn_not_found")
        if reply["status"] != "requires_action":
            return TurnContinued(status="not_paused", assistant_status=str(reply["status"]))
        if await conn.fetch_val(
            "SELECT 1 FROM messages WHERE thread_id = :thread_id AND status = 'streaming'",
            {"thread_id": thread_id},
        ) is not None:
            return TurnContinued(status="busy")
        resume_with = _load_json(reply["resume_with"]) if reply["resume_with"] else {}
        event_map = _load_json(reply["event_map"]) if reply["event_map"] else None
        if not claim:
            return TurnContinued(
                status="paused", assistant_message_id=int(reply["id"]),
                assistant_status="requires_action", content=_load_json(reply["content"]),
                event_map=event_map,
                resume_with=resume_with if isinstance(resume_with, dict) else {},
            )
        now = utcnow_text()
        # The one answer that continues: the row leaves requires_action here, once.
        claimed = await conn.fetch_val(
            "UPDATE messages SET status = 'streaming', lease_owner = :lease_owner, "
            "lease_expires_at = :expires, updated_at = :now "
            "WHERE id = :id AND status = 'requires_action' RETURNING id",
            {"id": reply["id"], "lease_owner": lease_owner,
             "expires": self._ts_param(_plus_seconds(now, lease_seconds)),
             "now": self._ts_param(now)},
        )
        if claimed is None:
            return TurnContinued(status="not_paused", assistant_status="streaming")
        calls = await conn.fetch_val(
            "SELECT call_details FROM token_usage WHERE message_id = :id", {"id": reply["id"]}
        )
        rows = await conn.fetch_all(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE thread_id = :thread_id "
            "AND (turn_id IS NULL OR turn_id <> :turn_id) AND status <> 'superseded' "
            "AND id < :user_id ORDER BY id DESC LIMIT :limit",
            {**ids, "user_id": user["id"], "limit": history_limit},
        )
        return TurnContinued(
            status="continued",
            user_message_id=int(user["id"]),
            assistant_message_id=int(reply["id"]),
            assistant_status="streaming",
            content=_load_json(reply["content"]),
            event_map=event_map,
            resume_with=resume_with if isinstance(resume_with, dict) else {},
            call_details=list(_load_json(calls) or []) if calls is not None else [],
            user_content=_load_json(user["content"]),
            history=[_message_row(r) for r in reversed(rows)],
        )


__all__ = ["_ContinueMixin"]
