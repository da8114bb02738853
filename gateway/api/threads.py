"""Thread routes: create and list threads, read and append messages, read usage."""

from __future__ import annotations

from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.auth import authenticate
from gateway.api.errors import ApiError, not_found
from gateway.api.limits import check_rate
from gateway.api.ui_messages import to_ui_messages, usage_metadata
from gateway.api.validation import (
    check_id,
    check_thread_path_id,
    parse_legacy_message,
    read_json,
    require_object,
)
from gateway.context import AppContext, context
from persistence import ThreadIdTaken

_MAX_LIMIT = 200


def _limit(request: Request, default: int = 50) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= _MAX_LIMIT:
        raise ApiError(
            400, "invalid_limit", f"limit {raw[:20]!r} must be an integer 1..{_MAX_LIMIT}"
        )
    return int(raw)


def _bad_cursor(request: Request) -> ApiError:
    shown = request.query_params.get("before", "")[:40]
    return ApiError(
        400, "invalid_cursor", f"before {shown!r} is not a cursor returned by this API"
    )


def _cursor(request: Request) -> str | None:
    raw = request.query_params.get("before")
    if raw is not None and (len(raw) > 200 or not raw.isprintable()):
        raise ApiError(400, "invalid_cursor", "before must be a cursor returned by this API")
    return raw


def thread_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "title": row.title, "created_at": row.created_at,
            "updated_at": row.updated_at}


def message_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "role": row.role, "content": row.content, "status": row.status,
            "turn_id": row.turn_id, "created_at": row.created_at, "updated_at": row.updated_at}


async def create_thread(request: Request) -> Response:
    """``POST /v1/threads``: ``{"id"?, "title"?}`` → 201 (200 if the caller already has it)."""
    ctx = context(request)
    user_id = await authenticate(request, ctx.store, ctx.keys)
    await check_rate(ctx, user_id)
    body = require_object(await read_json(request, 64 * 1024))
    thread_id = body.get("id")
    if thread_id is not None:
        thread_id = check_id(thread_id, "id", ctx.settings)
    title = body.get("title")
    if title is not None and (not isinstance(title, str) or len(title) > 500):
        raise ApiError(400, "invalid_title", "title must be a string of at most 500 characters")
    try:
        row, created = await ctx.store.create_thread(user_id, thread_id, title)
    except ThreadIdTaken:
        raise ApiError(409, "thread_id_taken", "that thread id is already in use") from None
    return JSONResponse(thread_json(row), status_code=201 if created else 200)


async def list_threads(request: Request) -> Response:
    """``GET /v1/threads``: the caller's threads, newest first, paginated by ``before``."""
    ctx = context(request)
    user_id = await authenticate(request, ctx.store, ctx.keys)
    try:
        rows, next_cursor = await ctx.store.list_threads(
            user_id, limit=_limit(request), before=_cursor(request)
        )
    except ValueError:
        raise _bad_cursor(request) from None
    return JSONResponse({"threads": [thread_json(r) for r in rows], "next_cursor": next_cursor})


async def list_messages(request: Request) -> Response:
    """``GET /v1/threads/{id}/messages``: the thread's messages in order.

    Regenerated-away replies (``superseded``) only with ``?include=superseded``.
    """
    ctx = context(request)
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store, ctx.keys)
    include = request.query_params.get("include", "")
    if include not in ("", "superseded"):
        raise ApiError(
            400, "invalid_include", f"include {include[:20]!r} must be \"superseded\" or absent"
        )
    rows = await ctx.store.list_messages(
        thread_id, user_id, include_superseded=include == "superseded"
    )
    if rows is None:
        raise not_found()
    fmt = request.query_params.get("format", "native")
    if fmt == "ui":
        return JSONResponse({"messages": to_ui_messages(rows, await _usage_by_message(
            ctx, user_id, thread_id))})
    if fmt != "native":
        raise ApiError(400, "invalid_format", f"format {fmt[:20]!r} must be \"native\" or \"ui\"")
    return JSONResponse({"messages": [message_json(r) for r in rows]})


async def _usage_by_message(
    ctx: AppContext, user_id: int, thread_id: str
) -> dict[int, dict[str, Any]]:
    """The thread's usage rows as the stream's ``finish`` reports them, by message id."""
    usage: dict[int, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        rows, cursor = await ctx.store.list_usage(
            user_id, thread_id=thread_id, limit=_MAX_LIMIT, before=cursor
        )
        for row in rows:
            if row.message_id is not None:
                usage[row.message_id] = usage_metadata(row)
        if cursor is None:
            return usage


async def append_message(request: Request) -> Response:
    """``POST /v1/threads/{id}/messages``: the legacy client's idempotent append."""
    ctx = context(request)
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store, ctx.keys)
    await check_rate(ctx, user_id)
    body = require_object(await read_json(request, ctx.settings.max_body_bytes))
    role, content = parse_legacy_message(body, ctx.settings)
    turn_id = body.get("turn_id")
    if turn_id is not None:
        turn_id = check_id(turn_id, "turn_id", ctx.settings)
    result = await ctx.store.append_message(thread_id, user_id, role, content, turn_id)
    if result is None:
        raise not_found()
    return JSONResponse(
        {"id": result.id, "inserted": result.inserted}, status_code=201 if result.inserted else 200
    )


async def list_usage(request: Request) -> Response:
    """``GET /v1/usage``: the caller's token_usage rows, optionally for one thread."""
    ctx = context(request)
    user_id = await authenticate(request, ctx.store, ctx.keys)
    thread_id = request.query_params.get("thread_id")
    if thread_id is not None:
        thread_id = check_thread_path_id(thread_id, ctx.settings)
        if await ctx.store.get_thread(thread_id, user_id) is None:
            raise not_found()
    try:
        rows, next_cursor = await ctx.store.list_usage(
            user_id, thread_id=thread_id, limit=_limit(request, 100), before=_cursor(request)
        )
    except ValueError:
        raise _bad_cursor(request) from None
    return JSONResponse({"usage": [_usage_json(r, ctx) for r in rows],
                         "next_cursor": next_cursor})


def _usage_json(row: Any, ctx: AppContext) -> dict[str, Any]:
    breakdown = row.model_breakdown if isinstance(row.model_breakdown, dict) else {}
    return {
        "id": row.id, "usage_type": row.usage_type, "thread_id": row.thread_id,
        "message_id": row.message_id, "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens, "total_tokens": row.total_tokens,
        "cost_micros": row.cost_micros, "model_breakdown": row.model_breakdown,
        "call_details": row.call_details, "estimated": row.estimated,
        "created_at": row.created_at,
        # Models of this row without a price: their cost was counted as 0, not known as 0.
        "unpriced_models": sorted(m for m in breakdown if ctx.prices.price(m) is None),
    }


_MAX_TITLE = 500


async def rename_thread(request: Request) -> Response:
    """``PATCH /v1/threads/{id}``: ``{"title": str | null}`` → the thread."""
    ctx = context(request)
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store, ctx.keys)
    await check_rate(ctx, user_id)
    body = require_object(await read_json(request, 64 * 1024))
    unknown = sorted(set(body) - {"title"})
    if unknown:
        raise ApiError(
            400, "invalid_body", f"unknown field {unknown[0][:40]!r}; expected only \"title\""
        )
    if "title" not in body:
        raise ApiError(400, "invalid_title", "title is required (a string, or null to clear it)")
    title = body["title"]
    if title is not None and (not isinstance(title, str) or len(title) > _MAX_TITLE):
        shown = type(title).__name__ if not isinstance(title, str) else f"{len(title)} characters"
        raise ApiError(
            400, "invalid_title",
            f"title must be a string of at most {_MAX_TITLE} characters or null, not {shown}",
        )
    if isinstance(title, str):
        title = " ".join(title.split()) or None
    row = await ctx.store.rename_thread(thread_id, user_id, title)
    if row is None:
        raise not_found()
    return JSONResponse(thread_json(row))


async def delete_thread(request: Request) -> Response:
    """``DELETE /v1/threads/{id}``: cancel and finalize a running turn, then delete the
    thread and its messages; its ``token_usage`` rows stay."""
    ctx = context(request)
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store, ctx.keys)
    await check_rate(ctx, user_id)
    if await ctx.store.get_thread(thread_id, user_id) is None:
        raise not_found()
    cancelled = await _end_running_turn(ctx, thread_id, user_id)
    deleted = await ctx.store.delete_thread(thread_id, user_id)
    if deleted is None:
        raise not_found()
    return JSONResponse({"id": thread_id, "deleted": True, "messages_deleted": deleted,
                         "cancelled_turn": cancelled})


async def _end_running_turn(ctx: AppContext, thread_id: str, user_id: int) -> str | None:
    """Cancel the turn streaming on the thread and wait until it is finalized (its row
    and usage row written); its turn_id, or None if none ran."""
    live = ctx.relay.running_on_thread(thread_id)
    if live is not None:
        live.cancel("cancelled")
        with anyio.move_on_after(ctx.settings.finalize_timeout + 2):
            await live.wait_done()
        return live.turn_id
    streaming = [
        r for r in await ctx.store.list_messages(thread_id, user_id) or ()
        if r.role == "assistant" and r.status == "streaming" and r.turn_id
    ]
    if not streaming or ctx.shared is None:
        return None
    from gateway.replicas.follow import cancel_shared

    turn_id = streaming[0].turn_id
    assert turn_id is not None
    await cancel_shared(ctx, thread_id, turn_id, user_id)
    return turn_id


__all__ = [
    "append_message", "create_thread", "delete_thread", "list_messages", "list_threads",
    "list_usage", "rename_thread",
]
