"""Turn routes: start (or attach to, or replay) a turn, resume, regenerate or cancel it."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.auth import CachedKey, authenticate, authenticate_key, cached_key, forget_key
from gateway.api.auth import unauthorized as _unauthorized
from gateway.api.errors import ApiError, database_unavailable, not_found
from gateway.api.limits import check_rate, check_stream_quota, release_stream, reserve_stream
from gateway.api.ui_messages import usage_metadata
from gateway.api.validation import (
    TurnRequest,
    check_id,
    check_model_field,
    check_thread_path_id,
    parse_turn_request,
    read_json,
    require_object,
)
from gateway.context import AppContext, context
from gateway.replicas.follow import attach_shared, cancel_shared, check_relay, supersede_shared
from gateway.streaming.relay import LiveTurn
from gateway.streaming.responses import follow_live, from_list, replay_chunks, sse_response
from gateway.turn.lifecycle import history_messages
from llm_adapters.base import AdapterRequest, ChatMessage
from llm_adapters.registry import parse_model
from persistence import build_user_content
from turngate.exceptions import UnknownAdapter

_BUSY_RETRY_AFTER = "2"


def _unavailable() -> ApiError:
    return database_unavailable()


def _resolve_adapter(ctx: AppContext, model_string: str) -> tuple[Any, str]:
    name, model = parse_model(model_string)
    try:
        adapter = ctx.adapters.get(name)
    except UnknownAdapter as exc:
        raise ApiError(400, "unknown_adapter", str(exc)) from None
    except Exception:
        raise ApiError(400, "unknown_adapter", f"adapter {name!r} could not be loaded") from None
    validate = getattr(adapter, "validate_model", None)
    if validate is not None:
        try:
            validate(model)
        except ValueError as exc:
            raise ApiError(400, "invalid_model", str(exc)) from None
    return adapter, model


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id", "").strip()
    if not raw:
        return -1
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise ApiError(
            400, "invalid_last_event_id", f"Last-Event-ID {raw[:20]!r} must be an integer"
        )
    return int(raw)


async def _stored_usage(
    ctx: AppContext, user_id: int, thread_id: str, message_id: int
) -> dict[str, Any]:
    # The message's own row (one indexed lookup): scanning the thread's usage
    # missed turns beyond the first page on long threads.
    rows, _ = await ctx.store.list_usage(
        user_id, thread_id=thread_id, message_id=message_id, limit=1
    )
    for row in rows:
        return usage_metadata(row)
    return {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0, "costMicros": 0,
            "estimated": True}


async def _attach_or_replay(
    ctx: AppContext, user_id: int, thread_id: str, turn_id: str, after: int,
    message_id: int | None = None,
) -> Response | None:
    """Stream an existing turn: live from the relay, else rebuilt from the database.

    None when the turn has no assistant row (nothing to resume). ``message_id``: the
    reply wanted, when the relay may still hold the one it replaced (regenerate).
    """
    live = ctx.relay.get(thread_id, turn_id)
    if (
        live is not None and live.owner_id == user_id and not live.overflowed
        and message_id in (None, live.message_id)
    ):
        return sse_response(ctx, follow_live(ctx, live, after))
    try:
        rows = await ctx.store.get_turn(thread_id, turn_id)
    except Exception:
        raise _unavailable() from None
    assistant = rows.assistant
    if assistant is None:
        return None
    if ctx.shared is not None and ctx.relay.get(thread_id, turn_id) is None:
        # Several replicas: the turn's stream as its generating replica relays it.
        shared = await attach_shared(
            ctx, thread_id, turn_id, after, assistant.status == "streaming", user_id
        )
        if shared is not None:
            return shared
    if assistant.status == "streaming":
        live = await ctx.relay.wait_for(
            thread_id, turn_id, within=2.0 if ctx.shared is None else 0.0,
            message_id=assistant.id,
        )
        if live is not None and live.owner_id == user_id and live.message_id == assistant.id:
            return sse_response(ctx, follow_live(ctx, live, after))
        raise ApiError(
            409, "turn_in_progress", "this turn is being generated elsewhere; retry shortly",
            {"Retry-After": _BUSY_RETRY_AFTER},
        )
    usage = await _stored_usage(ctx, user_id, thread_id, assistant.id)
    chunks = replay_chunks(
        message_id=assistant.id,
        user_message_id=rows.user.id if rows.user is not None else None,
        thread_id=thread_id,
        turn_id=turn_id,
        parts=assistant.content,
        status=assistant.status,
        usage=usage,
        event_map=assistant.event_map,
    )
    return sse_response(ctx, from_list(chunks, after))


async def start_turn(request: Request) -> Response:
    """``POST /v1/threads/{id}/turns``: start a turn and stream its reply."""
    ctx = context(request)
    started = time.monotonic()
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    # A key seen here before: no authenticate round trip, open_turn re-checks it.
    key = cached_key(request, ctx.store)
    user_id = key.user_id if key is not None else await authenticate(request, ctx.store)
    try:
        await check_rate(ctx, user_id)
        body = parse_turn_request(
            await read_json(request, ctx.settings.max_body_bytes), ctx.settings
        )
    except ApiError:
        await _confirm_key(ctx, key)  # a revoked key hears 401, not what else was wrong
        raise
    return await run_turn(ctx, user_id, thread_id, body, started, key=key)


async def _confirm_key(ctx: AppContext, key: CachedKey | None) -> None:
    """Authenticate a cached key for real (401 if it is no longer valid)."""
    if key is not None:
        await authenticate_key(key.key, ctx.store)


async def run_turn(
    ctx: AppContext, user_id: int, thread_id: str, body: TurnRequest, started: float,
    *, key: CachedKey | None = None,
) -> Response:
    """Open the turn (or find it) and answer with its stream.

    ``key``: the caller was not authenticated yet (a cached key). ``open_turn``
    checks it in its statement; every other way out authenticates it first.
    """
    model_string = body.model or ctx.settings.default_model
    try:
        adapter, model = _resolve_adapter(ctx, model_string)

        # The same turn again, still known here: attach without touching the database.
        live = ctx.relay.get(thread_id, body.turn_id)
        if live is not None and live.owner_id == user_id and not live.overflowed:
            await _confirm_key(ctx, key)  # a revoked key never attaches
            return sse_response(ctx, follow_live(ctx, live))
        running = ctx.relay.running_on_thread(thread_id)
        if (
            running is not None and running.owner_id == user_id
            and running.turn_id != body.turn_id
            and not await ctx.runner.supersede(running)
        ):
            raise ApiError(
                409, "thread_busy", "another turn is streaming on this thread",
                {"Retry-After": _BUSY_RETRY_AFTER},
            )
        if ctx.runner.draining:
            raise ApiError(
                503, "shutting_down", "the server is shutting down", {"Retry-After": "5"}
            )
        check_stream_quota(ctx, user_id)
        check_relay(ctx)
        # Several replicas: the user's slot across all of them, before anything is written.
        held = await reserve_stream(ctx, user_id, thread_id, body.turn_id)
    except ApiError:
        await _confirm_key(ctx, key)
        raise
    started_generation = False
    try:
        response, started_generation = await _open_and_start(
            ctx, user_id, thread_id, body, adapter, model, model_string, started, key
        )
        return response
    finally:
        if held and not started_generation:
            await release_stream(ctx, user_id, thread_id, body.turn_id)


async def _open_and_start(
    ctx: AppContext, user_id: int, thread_id: str, body: TurnRequest, adapter: Any,
    model: str, model_string: str, started: float, key: CachedKey | None,
) -> tuple[Response, bool]:
    """Open the turn; start its generation, or attach to or replay it if it exists.

    The flag says whether a generation started here (it then owns the stream slot).
    """
    content = build_user_content(body.text, body.images, body.mentioned_documents)
    opened = await ctx.store.open_turn(
        thread_id, user_id, body.turn_id, content,
        lease_owner=ctx.instance_id, lease_seconds=ctx.settings.lease_seconds,
        with_history=True, history_limit=ctx.settings.history_messages,
        key_prefix=key.prefix if key is not None else None,
        key_hash=key.secret_hash if key is not None else None,
    )
    if opened.status == "unavailable":
        raise _unavailable()
    if opened.status == "unauthorized":
        assert key is not None
        forget_key(ctx.store, key)
        raise _unauthorized()
    if opened.status == "thread_not_found":
        raise not_found()
    own_turn_busy = opened.status == "busy" and opened.busy_turn_id == body.turn_id
    if (
        opened.status == "busy" and not own_turn_busy and opened.busy_turn_id is not None
        and await supersede_shared(ctx, thread_id, opened.busy_turn_id, user_id)
    ):
        # Another replica's turn nobody reads any more ended for this one: open again.
        opened = await ctx.store.open_turn(
            thread_id, user_id, body.turn_id, content,
            lease_owner=ctx.instance_id, lease_seconds=ctx.settings.lease_seconds,
            with_history=True, history_limit=ctx.settings.history_messages,
        )
        if opened.status == "unavailable":
            raise _unavailable()
        own_turn_busy = opened.status == "busy" and opened.busy_turn_id == body.turn_id
    if opened.status == "busy" and not own_turn_busy:
        raise ApiError(
            409, "thread_busy", "another turn is streaming on this thread",
            {"Retry-After": _BUSY_RETRY_AFTER},
        )
    if own_turn_busy or not opened.assistant_inserted:
        # The store never names the request's own turn as the busy one; if it ever
        # did, that turn is streaming, which is an attach, not a conflict.
        # A retry or double submit: never a second generation.
        response = await _attach_or_replay(ctx, user_id, thread_id, body.turn_id, -1)
        if response is None:
            raise _unavailable()
        return response, False

    assert opened.assistant_message_id is not None and opened.user_message_id is not None
    # The earlier messages came back with the open, in the same round trip.
    history = history_messages(opened.history or [], body.turn_id)
    history.append(ChatMessage("user", content))
    live = LiveTurn(thread_id, body.turn_id, user_id, opened.assistant_message_id)
    ctx.runner.launch(
        live, adapter, AdapterRequest(model=model, messages=history),
        user_message_id=opened.user_message_id, model_string=model_string, started=started,
    )
    return sse_response(ctx, follow_live(ctx, live)), True


async def regenerate_turn(request: Request) -> Response:
    """``POST /v1/threads/{id}/turns/{turn_id}/regenerate``: a new reply to that turn."""
    ctx = context(request)
    started = time.monotonic()
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store)
    await check_rate(ctx, user_id)
    turn_id = check_id(request.path_params["turn_id"], "turn_id", ctx.settings)
    empty = request.headers.get("content-length", "0") == "0" and (
        "transfer-encoding" not in request.headers
    )
    body = {} if empty else require_object(
        await read_json(request, ctx.settings.max_body_bytes)
    )
    replaces = body.get("replaces")
    if replaces is not None and (type(replaces) is not int or replaces < 1):
        raise ApiError(
            400, "invalid_replaces",
            f"replaces {str(replaces)[:20]!r} must be the id of the reply to replace",
        )
    return await regenerate(
        ctx, user_id, thread_id, turn_id, check_model_field(body), replaces, started
    )


async def regenerate(
    ctx: AppContext, user_id: int, thread_id: str, turn_id: str, model: str | None,
    replaces: int | None, started: float,
) -> Response:
    """Answer the turn's user message again; the reply it had becomes ``superseded``.

    ``replaces``: the reply the client saw. A regenerate sent twice makes one new
    reply: the second finds it (replaces no longer current, or it streams with a
    reader) and attaches to it. A reply still streaming with nobody reading (a
    Stop, then Regenerate) is stopped first (what its reader was sent stays in the
    superseded row); one that names it and has a reader is 409.
    """
    model_string = model or ctx.settings.default_model
    adapter, model_name = _resolve_adapter(ctx, model_string)
    live = ctx.relay.running_on_thread(thread_id)
    if live is not None and live.owner_id == user_id and live.turn_id == turn_id:
        if replaces is not None and replaces != live.message_id:
            # The reply the client saw was replaced already: a double click.
            return sse_response(ctx, follow_live(ctx, live))
        if replaces is None and not live.abandoned:
            # Someone reads it (a double click without an id): attach, do not restart.
            return sse_response(ctx, follow_live(ctx, live))
        if not await ctx.runner.supersede(live):
            raise ApiError(
                409, "thread_busy", "the reply is still being generated; stop it first",
                {"Retry-After": _BUSY_RETRY_AFTER},
            )
    if ctx.runner.draining:
        raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
    check_stream_quota(ctx, user_id)
    check_relay(ctx)
    held = await reserve_stream(ctx, user_id, thread_id, turn_id)
    started_generation = False
    try:
        opened = await ctx.store.regenerate_turn(
            thread_id, user_id, turn_id, replaces=replaces,
            lease_owner=ctx.instance_id, lease_seconds=ctx.settings.lease_seconds,
            history_limit=ctx.settings.history_messages,
        )
        if opened.status == "unavailable":
            raise _unavailable()
        if opened.status == "thread_not_found":
            raise not_found()
        if opened.status == "turn_not_found":
            raise not_found("turn")
        if opened.status == "not_last_turn":
            raise ApiError(
                409, "not_last_turn",
                f"turn {turn_id[:40]!r} is not the thread's last; only the last reply "
                "can be regenerated",
            )
        if opened.status == "busy":
            raise ApiError(
                409, "thread_busy", "the reply is still being generated; stop it first",
                {"Retry-After": _BUSY_RETRY_AFTER},
            )
        assert opened.assistant_message_id is not None and opened.user_message_id is not None
        if not opened.assistant_inserted:
            response = await _attach_or_replay(
                ctx, user_id, thread_id, turn_id, -1, opened.assistant_message_id
            )
            if response is None:
                raise _unavailable()
            return response
        history = history_messages(opened.history or [], turn_id)
        history.append(ChatMessage("user", opened.user_content or []))
        fresh = LiveTurn(thread_id, turn_id, user_id, opened.assistant_message_id)
        ctx.runner.launch(
            fresh, adapter, AdapterRequest(model=model_name, messages=history),
            user_message_id=opened.user_message_id, model_string=model_string,
            started=started,
        )
        started_generation = True
        return sse_response(ctx, follow_live(ctx, fresh))
    finally:
        if held and not started_generation:
            await release_stream(ctx, user_id, thread_id, turn_id)


async def resume_turn(request: Request) -> Response:
    """``GET /v1/threads/{id}/turns/{turn_id}/stream``: replay from Last-Event-ID, then follow."""
    ctx = context(request)
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store)
    turn_id = check_id(request.path_params["turn_id"], "turn_id", ctx.settings)
    after = _last_event_id(request)
    thread = await ctx.store.get_thread(thread_id, user_id)
    if thread is None:
        raise not_found()
    response = await _attach_or_replay(ctx, user_id, thread_id, turn_id, after)
    return response if response is not None else Response(status_code=204)


async def cancel_turn(request: Request) -> Response:
    """``POST /v1/threads/{id}/turns/{turn_id}/cancel``: stop a running generation."""
    ctx = context(request)
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store)
    turn_id = check_id(request.path_params["turn_id"], "turn_id", ctx.settings)
    thread = await ctx.store.get_thread(thread_id, user_id)
    if thread is None:
        raise not_found()
    live = ctx.relay.get(thread_id, turn_id)
    if live is not None and live.owner_id == user_id:
        cancelled = live.cancel("cancelled")
        return JSONResponse({"cancelled": cancelled, "status": live.status or "streaming"})
    rows = await ctx.store.get_turn(thread_id, turn_id)
    if rows.assistant is None:
        raise not_found("turn")
    if rows.assistant.status == "streaming" and ctx.shared is not None:
        return await cancel_shared(ctx, thread_id, turn_id, user_id)
    return JSONResponse({"cancelled": False, "status": rows.assistant.status})


__all__ = [
    "cancel_turn", "regenerate", "regenerate_turn", "resume_turn", "run_turn", "start_turn",
]
