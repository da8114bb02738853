"""Stored messages → AI SDK ``UIMessage``s (``GET /v1/threads/{id}/messages?format=ui``).

So that ``useChat({messages})`` (or assistant-ui) can start from stored
history, and so that ids agree with what the stream told the client:

- a user message's id is its ``turn_id`` (the id the client gave the message
  when it sent it through ``POST /api/chat``), else the row id;
- an assistant message's id is ``str(row id)``, the ``messageId`` of the
  ``start`` chunk of its stream.

Parts follow the shape the SDK's own stream processor builds: ``step-start``,
``reasoning`` and ``text`` with ``state: "done"`` (``"streaming"`` while the
turn is still generating), ``tool-<name>`` with a tool state (``approval-requested``
with its ``approval`` for a paused reply's call waiting for a person, so that
``addToolApprovalResponse`` works after a reload; one ``step-start`` per model
call), ``file`` for
images and ``data-mentioned-documents`` for mentioned documents. The
``status`` placeholder of an empty reply is not a part: it goes to
``metadata.notice``. ``metadata`` also carries ``threadId``, ``turnId``,
``status`` and ``createdAt``, and for a reply what its stream's ``start`` and
``finish`` gave the live view: ``userMessageId`` and ``usage``. A reasoning part
keeps its stream id (``r<k>``), as the SDK's processor does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from gateway.turn.replay import UsageLike, usage_metadata

_DATA_URL_TYPE = re.compile(r"^data:([^;,]+)[;,]")

_UNFINISHED_TOOL = "The tool call did not finish: the reply ended first."


class MessageLike(Protocol):
    """What a stored message row must have (``persistence.rows.MessageRow``)."""

    @property
    def id(self) -> int: ...
    @property
    def thread_id(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def content(self) -> list[dict[str, Any]]: ...
    @property
    def status(self) -> str: ...
    @property
    def turn_id(self) -> str | None: ...
    @property
    def created_at(self) -> str: ...


def _media_type(url: str) -> str:
    match = _DATA_URL_TYPE.match(url)
    return match.group(1) if match else "application/octet-stream"


def _user_parts(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image" and isinstance(part.get("image"), str):
            url = part["image"]
            parts.append({"type": "file", "mediaType": _media_type(url), "url": url})
        elif kind == "mentioned-documents":
            docs = part.get("documents")
            parts.append({
                "type": "data-mentioned-documents",
                "data": {"documents": docs if isinstance(docs, list) else []},
            })
    if not parts:
        parts.append({"type": "text", "text": ""})
    return parts


def _tool_part(part: dict[str, Any], waiting: bool) -> dict[str, Any]:
    """``waiting``: the turn is still generating or paused (``requires_action``), so a
    call without an answer is still to be answered, not one that never finished."""
    name = str(part.get("toolName") or "unknown")
    args = part.get("args")
    out: dict[str, Any] = {
        "type": f"tool-{name}",
        "toolCallId": str(part.get("toolCallId", "")),
        "input": args if args is not None else {},
    }
    approval = part.get("approval")
    answered = "result" in part or isinstance(part.get("errorText"), str)
    if isinstance(approval, dict) and isinstance(approval.get("id"), str):
        out["approval"] = {"id": approval["id"]}
        if answered:
            out["approval"]["approved"] = not part.get("denied")
    if "result" in part:
        out["state"] = "output-available"
        out["output"] = part["result"]
    elif part.get("denied"):
        out["state"] = "output-denied"
    elif isinstance(part.get("errorText"), str):
        out["state"] = "output-error"
        out["errorText"] = part["errorText"]
    elif waiting and "approval" in out:
        out["state"] = "approval-requested"
    elif waiting:
        out["state"] = "input-available"
    else:
        out["state"] = "output-error"
        out["errorText"] = _UNFINISHED_TOOL
    return out


def _assistant_parts(
    content: list[dict[str, Any]], streaming: bool, paused: bool = False
) -> tuple[list[dict[str, Any]], str | None]:
    parts: list[dict[str, Any]] = [{"type": "step-start"}]
    notice: str | None = None
    state = "streaming" if streaming else "done"
    started = 0  # text and reasoning parts, numbered as the stream's encoder numbers them
    step = 0
    for part in content:
        kind = part.get("type")
        part_step = part.get("step", 0)
        if type(part_step) is int and part_step > step:
            step = part_step
            parts.append({"type": "step-start"})  # a later model call of the turn
        if kind in ("text", "reasoning"):
            text = str(part.get("text", ""))
            if text:
                started += 1
                ui: dict[str, Any] = {"type": kind, "text": text, "state": state}
                if kind == "reasoning":
                    # The SDK keeps a reasoning part's stream id ("r<k>"), not a text's.
                    ui = {"type": kind, "id": f"r{started}", "text": text, "state": state}
                parts.append(ui)
        elif kind == "tool-call":
            parts.append(_tool_part(part, streaming or paused))
        elif kind == "status":
            notice = str(part.get("text", ""))
    if len(parts) == 1:
        parts = []
    return parts, notice


def to_ui_message(
    row: MessageLike,
    *,
    user_message_id: int | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One stored row as a ``UIMessage``.

    An assistant row's metadata also gets what its stream's ``start`` and ``finish``
    carried: ``userMessageId`` (the user row of its turn) and ``usage``, when given.
    """
    metadata: dict[str, Any] = {
        "threadId": row.thread_id,
        "status": row.status,
        "createdAt": row.created_at,
    }
    if row.turn_id is not None:
        metadata["turnId"] = row.turn_id
    if row.role == "assistant":
        if user_message_id is not None:
            metadata["userMessageId"] = str(user_message_id)
        if usage is not None:
            metadata["usage"] = usage
        parts, notice = _assistant_parts(
            row.content, row.status == "streaming", paused=row.status == "requires_action"
        )
        if notice:
            metadata["notice"] = notice
        errors = [p.get("errorText") for p in row.content if p.get("type") == "error"]
        if errors:
            metadata["errorText"] = str(errors[-1])
        return {"id": str(row.id), "role": "assistant", "parts": parts, "metadata": metadata}
    return {
        "id": row.turn_id or str(row.id),
        "role": "user" if row.role == "user" else "system",
        "parts": _user_parts(row.content),
        "metadata": metadata,
    }


def to_ui_messages(
    rows: Iterable[MessageLike], usage: Mapping[int, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Stored rows, in order, as AI SDK ``UIMessage``s (``usage`` by assistant row id)."""
    rows = list(rows)
    users = {row.turn_id: row.id for row in rows if row.role == "user" and row.turn_id}
    return [
        to_ui_message(
            row,
            user_message_id=users.get(row.turn_id) if row.turn_id else None,
            usage=(usage or {}).get(row.id),
        )
        for row in rows
    ]


__all__ = ["MessageLike", "UsageLike", "to_ui_message", "to_ui_messages", "usage_metadata"]
