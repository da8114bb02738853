"""The small frozen records the store hands to its callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

OpenStatus = Literal[
    "opened", "thread_not_found", "busy", "unavailable", "unauthorized",
    "turn_not_found", "not_last_turn",
]
AppendOutcome = Literal["inserted", "race_recovered", "conflict_no_match"]


@dataclass(frozen=True, slots=True)
class TurnContinued:
    """What ``Store.continue_turn`` did (see there); the fields beyond ``status`` are
    set when ``status == "continued"``."""

    status: Literal["continued", "paused", "thread_not_found", "turn_not_found", "not_paused",
                    "busy", "unavailable"]
    user_message_id: int | None = None
    assistant_message_id: int | None = None
    assistant_status: str | None = None
    content: list[dict[str, Any]] = field(default_factory=list)
    event_map: list[Any] | None = None
    resume_with: dict[str, Any] = field(default_factory=dict)
    call_details: list[dict[str, Any]] = field(default_factory=list)
    user_content: list[dict[str, Any]] = field(default_factory=list)
    history: list[MessageRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ThreadRow:
    id: str
    owner_id: int
    title: str | None
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: int
    thread_id: str
    role: str
    content: list[dict[str, Any]]
    status: str
    turn_id: str | None
    created_at: str
    updated_at: str
    # How the reply was streamed (``messages.event_map``), read by ``get_turn`` only;
    # None elsewhere and for rows that have none.
    event_map: list[Any] | None = None


@dataclass(frozen=True, slots=True)
class TurnRows:
    user: MessageRow | None
    assistant: MessageRow | None


@dataclass(frozen=True, slots=True)
class TurnOpened:
    """What ``Store.open_turn`` did.

    ``assistant_status`` is the status of the existing assistant row when it was
    recovered (e.g. ``"complete"`` → replay, ``"streaming"`` → attach), else
    ``"streaming"``. ``busy_turn_id`` names the turn that holds the thread when
    ``status == "busy"``. The ids are ``None`` unless ``status == "opened"``.
    ``history`` (``open_turn(with_history=True)`` only, and only when the
    assistant row was inserted): the thread's earlier messages, oldest first,
    without this turn's rows; else None. ``titled``: ``open_turn(title=...)`` gave the
    thread that title.
    ``status == "unauthorized"``: ``open_turn(key_prefix=..., key_hash=...)`` found
    that API key revoked, unknown or not ``owner_id``'s; nothing was written.
    ``Store.regenerate_turn`` answers with the same record: ``turn_not_found`` (no
    user row for that turn), ``not_last_turn`` (a later turn exists), and
    ``user_content``, the stored user turn the new reply answers.
    """

    status: OpenStatus
    user_message_id: int | None = None
    assistant_message_id: int | None = None
    user_inserted: bool = False
    assistant_inserted: bool = False
    assistant_status: str | None = None
    busy_turn_id: str | None = None
    history: list[MessageRow] | None = None
    titled: bool = False
    user_content: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    id: int | None
    inserted: bool
    outcome: AppendOutcome


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """The token usage of one turn, as ``finalize_turn`` stores it."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int = 0
    model_breakdown: dict[str, Any] = field(default_factory=dict)
    call_details: list[Any] = field(default_factory=list)
    estimated: bool = False
    usage_type: str = "chat"


@dataclass(frozen=True, slots=True)
class UsageRow:
    id: int
    usage_type: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int
    model_breakdown: dict[str, Any]
    call_details: list[Any]
    estimated: bool
    thread_id: str
    message_id: int | None
    user_id: int
    created_at: str


@dataclass(frozen=True, slots=True)
class FinalizeItem:
    """One turn to finalize, as ``Store.finalize_turns`` takes it (see ``finalize_turn``)."""

    message_id: int
    thread_id: str
    user_id: int
    content: list[dict[str, Any]]
    status: str
    usage: UsageRecord
    event_map: list[Any] | None = None  # stored with the content (see MessageRow)
