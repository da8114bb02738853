"""The other turn writers: legacy append, checkpoint, finalize, lease recovery."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from persistence import _pg_sql
from persistence._base import _dump_json, _StoreBase, utcnow_text
from persistence._sql import Conn
from persistence._turns import (
    _SQLITE_USAGE_INSERT,
    FINAL_STATUSES,
    _plus_seconds,
    _sqlite_interrupt,
)
from persistence.content import NO_TEXT_MARKER, is_empty_assistant_content
from persistence.rows import AppendOutcome, AppendResult, FinalizeItem, UsageRecord
from turngate.exceptions import PersistenceError

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
                        "AND turn_id = :turn_id AND role = :role AND status <> 'superseded'",
                        {"thread_id": thread_id, "turn_id": turn_id, "role": role},
                    )
            else:
                new_id, old_id, found = await self._append_sqlite(conn, values)
                if not found:
                    return None, "row_missing"
            return _append_result(new_id, old_id)

        return await self._write(
            "append_message", op, thread_id=thread_id, turn_id=turn_id, role=role
        )

    async def _append_sqlite(self, conn: Conn, values: dict[str, Any]) -> tuple[Any, Any, bool]:
        now = utcnow_text()
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
            + _pg_sql.ON_TURN_CONFLICT + " "
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
            "AND turn_id = :turn_id AND role = :role AND status <> 'superseded'",
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
        reclaim: bool = False,
        event_map: list[Any] | None = None,
    ) -> bool:
        """Save partial content of a streaming row and extend its lease (one statement).

        False if the row is no longer streaming or its lease belongs to another
        owner (the turn was finalized or taken over). With ``reclaim`` (the owner
        found its lease lost), a row that a reaper marked ``interrupted`` is taken
        back: ``streaming`` again under ``lease_owner`` with ``content``, its
        estimated usage row removed; refused (False) if another turn streams on
        the thread meanwhile. ``event_map`` (how the content was streamed) is stored
        with it. Raises ``DatabaseUnavailable``.
        """
        payload = _dump_json(content)
        stream_map = None if event_map is None else _dump_json(event_map)

        async def op(conn: Conn) -> tuple[bool, str]:
            params = {
                "message_id": message_id,
                "content": payload,
                "lease_owner": lease_owner,
                "lease_seconds": float(lease_seconds),
                "event_map": stream_map,
            }
            if self._is_pg and reclaim:
                row = await conn.fetch_one(_pg_sql.RECLAIM, params)
                done = row is not None and bool(row["updated"])
            elif self._is_pg:
                done = await conn.fetch_val(_pg_sql.CHECKPOINT, params) is not None
            else:
                done = await _checkpoint_sqlite(conn, params, reclaim)
            return done, "ok" if done else "row_missing"

        return await self._write(
            "reclaim" if reclaim else "checkpoint", op, message_id=message_id
        )

    async def checkpoint_many(
        self,
        items: Sequence[tuple[int, list[dict[str, Any]], list[Any] | None]],
        *,
        lease_owner: str,
        lease_seconds: float,
    ) -> set[int]:
        """``checkpoint`` for many rows in one statement; returns the ids it wrote.

        ``items``: ``(message_id, content, event_map)``. Each named row that is still
        ``streaming`` under ``lease_owner`` gets its content and event map, and its
        lease extended; a row missing from the result is no longer ours (the
        caller acts on that, as on a ``checkpoint`` that returned False). No
        reclaim here: taking a row back is ``checkpoint(reclaim=True)``, one turn at
        a time. Raises ``DatabaseUnavailable``.
        """
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if not items:
            return set()
        ids = [int(i) for i, _, _ in items]
        contents = [_dump_json(c) for _, c, _ in items]
        maps = [None if m is None else _dump_json(m) for _, _, m in items]

        async def op(conn: Conn) -> tuple[set[int], str]:
            if self._is_pg:
                rows = await conn.fetch_all(
                    _pg_sql.CHECKPOINT_MANY,
                    {"ids": ids, "contents": contents, "event_maps": maps,
                     "lease_owner": lease_owner, "lease_seconds": float(lease_seconds)},
                )
            else:
                now = utcnow_text()
                rows = await conn.fetch_all(
                    "UPDATE messages SET content = v.content, event_map = v.event_map, "
                    "updated_at = :now, lease_expires_at = :expires "
                    "FROM (SELECT json_extract(value, '$[0]') AS id, "
                    "json_extract(value, '$[1]') AS content, "
                    "json_extract(value, '$[2]') AS event_map FROM json_each(:rows)) AS v "
                    "WHERE messages.id = v.id AND messages.status = 'streaming' "
                    "AND messages.lease_owner = :lease_owner RETURNING messages.id",
                    {"rows": _dump_json([list(r) for r in zip(ids, contents, maps,
                                                              strict=True)]),
                     "lease_owner": lease_owner, "now": now,
                     "expires": _plus_seconds(now, lease_seconds)},
                )
            written = {int(r["id"]) for r in rows}
            return written, "ok" if len(written) == len(ids) else "row_missing"

        return await self._write("checkpoint", op, lease_owner=lease_owner, count=len(ids))

    async def renew_leases(
        self, lease_owner: str, lease_seconds: float, message_ids: Sequence[int]
    ) -> set[int]:
        """Extend the leases of ``message_ids`` that are still ``streaming`` under
        ``lease_owner`` (one statement); returns the ids it renewed.

        For the maintenance loop: the caller names the turns it still generates or
        still tries to finalize, whose content did not change since their last
        checkpoint (those that changed go through ``checkpoint``). A named row
        missing from the result is no longer ours (finalized, or taken by a
        reaper): the caller acts on that. Content and ``updated_at`` are not
        touched. Raises ``DatabaseUnavailable``.
        """
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        ids = sorted({int(i) for i in message_ids})
        if not ids:
            return set()

        async def op(conn: Conn) -> tuple[set[int], str]:
            if self._is_pg:
                rows = await conn.fetch_all(
                    _pg_sql.RENEW_LEASES,
                    {"ids": ids, "lease_owner": lease_owner,
                     "lease_seconds": float(lease_seconds)},
                )
            else:
                rows = await conn.fetch_all(
                    "UPDATE messages SET lease_expires_at = :expires "
                    "WHERE id IN (SELECT value FROM json_each(:ids)) "
                    "AND lease_owner = :lease_owner AND status = 'streaming' RETURNING id",
                    {
                        "ids": _dump_json(ids),
                        "lease_owner": lease_owner,
                        "expires": _plus_seconds(utcnow_text(), lease_seconds),
                    },
                )
            renewed = {int(r["id"]) for r in rows}
            return renewed, "ok" if len(renewed) == len(ids) else "row_missing"

        return await self._write(
            "renew_leases", op, lease_owner=lease_owner, count=len(ids)
        )

    async def finalize_turn(
        self,
        message_id: int,
        thread_id: str,
        user_id: int,
        content: list[dict[str, Any]],
        status: str,
        usage: UsageRecord,
        *,
        event_map: list[Any] | None = None,
    ) -> str:
        """Store the final content and status of a streaming row and its one usage row.

        Empty content (no text, reasoning or tool call) is stored as the
        ``(no text response)`` status marker. A row that a reaper marked
        ``interrupted`` (its owner outlived the lease) is overwritten: the final
        content wins, and the reaper's usage row is replaced by ``usage``, still one
        row. Any other row that is no longer streaming is not overwritten (outcome
        ``row_missing``), but the usage row is inserted regardless, at most once per
        message. One statement on PostgreSQL. Never raises: returns ``ok``,
        ``row_missing`` or ``failed`` (and logs it).
        """
        values = _dumped(
            _finalize_record(
                FinalizeItem(message_id, thread_id, user_id, content, status, usage, event_map)
            )
        )

        async def op(conn: Conn) -> tuple[str, str]:
            if status not in FINAL_STATUSES:
                raise ValueError(f"not a final status: {status!r}")
            if self._is_pg:
                row = await conn.fetch_one(_pg_sql.FINALIZE_TURN, values)
                assert row is not None
                updated = bool(row["updated"])
            else:
                now = utcnow_text()
                updated = await _finalize_sqlite_row(conn, values, now)
            outcome = "ok" if updated else "row_missing"
            return outcome, outcome

        try:
            return await self._write(
                "finalize_turn", op, message_id=message_id, thread_id=thread_id, status=status
            )
        except Exception:
            logger.exception("finalize_turn failed for message %s", message_id)
            return "failed"

    async def finalize_turns(self, items: Sequence[FinalizeItem]) -> list[str]:
        """``finalize_turn`` for many turns at once: one outcome per item, in order.

        The same rules and outcomes as ``finalize_turn`` (empty content → the status
        marker; a reaper's ``interrupted`` is overwritten, its usage row replaced; any
        other row no longer streaming is not overwritten, ``row_missing``; at most
        one usage row per message), as if the items ran one after another: a message
        that appears twice is finalized by its first item. PostgreSQL: one statement
        for the whole batch; SQLite: one operation on the writer (all or nothing). An item with
        a status that is not final is ``failed`` without touching the others; if the
        batch itself fails every other item is ``failed`` (nothing was written, or
        all of it), for the caller to retry one by one. One log line per batch (items
        at debug). Never raises.
        """
        outcomes = ["failed"] * len(items)
        valid = [i for i, item in enumerate(items) if item.status in FINAL_STATUSES]
        if not valid:
            return outcomes
        records = [_finalize_record(items[i]) for i in valid]

        async def op(conn: Conn) -> tuple[list[bool], str]:
            if self._is_pg:
                batch = _dump_json([rec | {"idx": n} for n, rec in enumerate(records)])
                found = await conn.fetch_all(_pg_sql.FINALIZE_TURNS, {"batch": batch})
                hit = {int(r["idx"]) for r in found}
                updated = [n in hit for n in range(len(records))]
            else:
                now = utcnow_text()
                updated = []
                for rec in records:
                    updated.append(await _finalize_sqlite_row(conn, _dumped(rec), now))
            return updated, "ok" if all(updated) else "row_missing"

        started = time.perf_counter()
        try:
            updated, _ = await self._run(op, write=True)
        except Exception:
            logger.exception("finalize_turns failed for a batch of %d", len(items))
            updated = None
        if updated is not None:
            for n, i in enumerate(valid):
                outcomes[i] = "ok" if updated[n] else "row_missing"
        counts = Counter(outcomes)
        batch_outcome = next(
            (o for o in ("failed", "row_missing") if counts[o]), "ok"
        )
        # The batch's one db_op line (and observer call), with the outcome counts.
        self._report(
            "finalize_turns", batch_outcome, started, count=len(items), ok=counts["ok"],
            row_missing=counts["row_missing"], failed=counts["failed"],
        )
        if logger.isEnabledFor(logging.DEBUG):
            for item, outcome in zip(items, outcomes, strict=True):
                logger.debug(
                    "finalize_item message_id=%s status=%s outcome=%s",
                    item.message_id, item.status, outcome,
                    extra={"event": "finalize_item", "message_id": item.message_id,
                           "thread_id": item.thread_id, "status": item.status,
                           "outcome": outcome},
                )
        return outcomes

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

        ids = await self._write("recover_expired_turns", op)
        if ids:
            logger.info(
                "recovered_turns: marked %d turn%s interrupted (lease expired), message_ids=%s",
                len(ids), "" if len(ids) == 1 else "s", ",".join(map(str, ids)),
                extra={"event": "recovered_turns", "count": len(ids), "message_ids": ids},
            )
        return ids

    async def _recover_sqlite(self, conn: Conn) -> list[int]:
        now = utcnow_text()
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
        except PersistenceError as exc:
            logger.warning("ping failed: %s", exc)
            return False


def _finalize_record(item: FinalizeItem) -> dict[str, Any]:
    """The columns of one finalize (json values still as objects); empty → the marker."""
    usage = item.usage
    return {
        "message_id": item.message_id,
        "content": NO_TEXT_MARKER if is_empty_assistant_content(item.content) else item.content,
        "status": item.status,
        "usage_type": usage.usage_type,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cost_micros": usage.cost_micros,
        "model_breakdown": usage.model_breakdown,
        "call_details": usage.call_details,
        "estimated": usage.estimated,
        "thread_id": item.thread_id,
        "user_id": item.user_id,
        # Text (only the gateway reads it), also inside the PostgreSQL batch's json.
        "event_map": None if item.event_map is None else _dump_json(item.event_map),
    }


_JSON_COLUMNS = ("content", "model_breakdown", "call_details")


def _dumped(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its json columns as text, as the single-row statements bind them."""
    return record | {k: _dump_json(record[k]) for k in _JSON_COLUMNS}


async def _finalize_sqlite_row(conn: Conn, values: dict[str, Any], now: str) -> bool:
    """One finalize on SQLite, inside the caller's write transaction; True if updated."""
    updated = await conn.fetch_val(
        "UPDATE messages SET content = :content, status = :status, event_map = :event_map, "
        "updated_at = :now, lease_owner = NULL, lease_expires_at = NULL "
        "WHERE id = :message_id AND status IN ('streaming', 'interrupted') RETURNING id",
        {k: values[k] for k in ("content", "status", "message_id", "event_map")} | {"now": now},
    )
    usage = {k: v for k, v in values.items() if k not in ("content", "status", "event_map")}
    # The row was ours to write: our usage replaces a reaper's estimate (_pg_sql).
    sql = _SQLITE_USAGE_UPSERT if updated is not None else _SQLITE_USAGE_INSERT
    await conn.fetch_val(sql, usage | {"now": now})
    return updated is not None


_SQLITE_USAGE_UPSERT = _SQLITE_USAGE_INSERT.replace(
    "DO NOTHING",
    "DO UPDATE SET usage_type = excluded.usage_type, prompt_tokens = excluded.prompt_tokens, "
    "completion_tokens = excluded.completion_tokens, total_tokens = excluded.total_tokens, "
    "cost_micros = excluded.cost_micros, model_breakdown = excluded.model_breakdown, "
    "call_details = excluded.call_details, estimated = excluded.estimated",
)


async def _checkpoint_sqlite(conn: Conn, params: dict[str, Any], reclaim: bool) -> bool:
    """``checkpoint`` on SQLite, inside the caller's write transaction (see _pg_sql)."""
    now = utcnow_text()
    values = {k: params[k] for k in ("message_id", "content", "lease_owner", "event_map")} | {
        "now": now, "expires": _plus_seconds(now, params["lease_seconds"]),
    }
    done = await conn.fetch_val(
        "UPDATE messages SET content = :content, event_map = :event_map, updated_at = :now, "
        "lease_expires_at = :expires WHERE id = :message_id "
        "AND status = 'streaming' AND lease_owner = :lease_owner RETURNING id",
        values,
    )
    if done is not None or not reclaim:
        return done is not None
    done = await conn.fetch_val(
        "UPDATE messages SET content = :content, event_map = :event_map, updated_at = :now, "
        "status = 'streaming', lease_owner = :lease_owner, lease_expires_at = :expires "
        "WHERE id = :message_id AND status = 'interrupted' AND lease_owner IS NULL "
        "AND NOT EXISTS (SELECT 1 FROM messages o WHERE o.thread_id = messages.thread_id "
        "AND o.status = 'streaming' AND o.id <> messages.id) RETURNING id",
        values,
    )
    if done is not None:
        await conn.execute(
            "DELETE FROM token_usage WHERE message_id = :message_id AND estimated",
            {"message_id": params["message_id"]},
        )
    return done is not None


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
