"""Turn routes: start (or attach to, or replay) a turn, resume, regenerate or cancel it.

Each route parses, authenticates and applies the limits; the turn itself (open,
attach, generate, finish) is ``gateway.turn.lifecycle``'s.
"""

from __future__ import annotations

import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.auth import CachedKey, authenticate, authenticate_key, cached_key, forget_key
from gateway.api.auth import unauthorized as _unauthorized
from gateway.api.errors import ApiError, database_unavailable, not_found
from gateway.api.limits import check_rate, check_stream_quota, release_stream, reserve_stream
from gateway.api.validation import (
    TurnRequest,
    check_id,
    check_model_field,
    check_thread_path_id,
    parse_answers,
    parse_turn_request,
    read_json,
    require_object,
)
from gateway.context import AppContext, context
from gateway.replicas.follow import cancel_shared, check_relay
from gateway.turn import lifecycle
from gateway.turn.lifecycle import Refused
from gateway.turn.tools import Answers
from llm_adapters.base import Adapter
from llm_adapters.registry import parse_model
from persistence import build_user_content
from turngate.exceptions import UnknownAdapter

logger = logging.getLogger("turngate.gateway")

_BUSY_RETRY_AFTER = "2"


def _refusal(exc: Refused) -> ApiError:
    """The HTTP answer to a turn the lifecycle refused."""
    if exc.kind == "unavailable":
        return database_unavailable()
    if exc.kind == "thread_not_found":
        return not_found()
    if exc.kind == "turn_not_found":
        return not_found("turn")
    if exc.kind == "unauthorized":
        return _unauthorized()
    if exc.kind == "shutting_down":
        return ApiError(503, exc.kind, exc.message, {"Retry-After": "5"})
    if exc.kind == "invalid_answer":
        return ApiError(400, exc.kind, exc.message)
    if exc.kind in ("thread_busy", "turn_in_progress"):
        return ApiError(409, exc.kind, exc.message, {"Retry-After": _BUSY_RETRY_AFTER})
    return ApiError(409, exc.kind, exc.message)


def _resolve_adapter(ctx: AppContext, model_string: str) -> tuple[Adapter, str]:
    name, model = parse_model(model_string)
    try:
        adapter = ctx.adapters.get(name)
    except UnknownAdapter as exc:
        raise ApiError(400, "unknown_adapter", str(exc)) from None
    except Exception:
        # An installed adapter that fails to load is the operator's problem (the cause,
        # with its traceback, is in the log); the client hears the model is unusable.
        logger.exception("adapter_load_failed adapter=%s", name,
                         extra={"event": "adapter_load_failed", "adapter": name})
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


async def start_turn(request: Request) -> Response:
    """``POST /v1/threads/{id}/turns``: start a turn and stream its reply."""
    ctx = context(request)
    started = time.monotonic()
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    # A key seen here before: no authenticate round trip, open_turn re-checks it.
    key = cached_key(request, ctx.keys)
    user_id = key.user_id if key is not None else await authenticate(request, ctx.store, ctx.keys)
    try:
        await check_rate(ctx, user_id)
        body = parse_turn_request(
            await read_json(request, ctx.settings.max_body_bytes), ctx.settings
        )
    except ApiError:
        await _confirm_key(ctx, key)  # a revoked key hears 401, not what else was wrong
        raise
    return await start(ctx, user_id, thread_id, body, started, key=key)


def _check_client_tools(ctx: AppContext, body: TurnRequest) -> None:
    """A client-side tool may not take the name of one of the gateway's tools."""
    hub = ctx.runner.tools
    for name in body.tools:
        if hub is not None and hub.get(name) is not None:
            raise ApiError(400, "invalid_tools", f"tool name {name!r} is taken by a tool of "
                           "this gateway's MCP servers; choose another name")


async def _confirm_key(ctx: AppContext, key: CachedKey | None) -> None:
    """Authenticate a cached key for real (401 if it is no longer valid)."""
    if key is not None:
        await authenticate_key(key.key, ctx.store, ctx.keys)


async def _reserve(ctx: AppContext, user_id: int, thread_id: str, turn_id: str) -> bool:
    """The limits on a new generation; True if a slot across replicas is now held."""
    check_stream_quota(ctx, user_id)
    check_relay(ctx)
    return await reserve_stream(ctx, user_id, thread_id, turn_id)


async def start(
    ctx: AppContext, user_id: int, thread_id: str, body: TurnRequest, started: float,
    *, key: CachedKey | None = None,
) -> Response:
    """Start the turn (or attach to it, or replay it) and answer with its stream.

    ``key``: the caller was not authenticated yet (a cached key). ``open_turn``
    checks it in its statement; every other way out authenticates it first.
    """
    model_string = body.model or ctx.settings.default_model
    try:
        try:
            adapter, model = _resolve_adapter(ctx, model_string)
            _check_client_tools(ctx, body)
            attached = await lifecycle.attach_running(ctx, user_id, thread_id, body.turn_id)
            if attached is not None:
                await _confirm_key(ctx, key)  # a revoked key never attaches
                return attached
            held = await _reserve(ctx, user_id, thread_id, body.turn_id)
        except Refused as exc:
            raise _refusal(exc) from None
    except ApiError:
        await _confirm_key(ctx, key)
        raise
    started_generation = False
    try:
        response, started_generation = await lifecycle.open_turn(
            ctx, user_id, thread_id, body.turn_id,
            build_user_content(body.text, body.images, body.mentioned_documents),
            adapter, model, model_string, started,
            key_prefix=key.prefix if key is not None else None,
            key_hash=key.secret_hash if key is not None else None,
            client_tools=body.tools,
        )
        return response
    except Refused as exc:
        if exc.kind == "unauthorized" and key is not None:
            forget_key(ctx.keys, key)
        raise _refusal(exc) from None
    finally:
        if held and not started_generation:
            await release_stream(ctx, user_id, thread_id, body.turn_id)


async def regenerate_turn(request: Request) -> Response:
    """``POST /v1/threads/{id}/turns/{turn_id}/regenerate``: a new reply to that turn."""
    ctx = context(request)
    started = time.monotonic()
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store, ctx.keys)
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
    """Answer the turn's user message again (``lifecycle.open_regenerate``).

    ``replaces``: the reply the client saw (``lifecycle.attach_to_regenerate``).
    """
    model_string = model or ctx.settings.default_model
    adapter, model_name = _resolve_adapter(ctx, model_string)
    try:
        attached = await lifecycle.attach_to_regenerate(
            ctx, user_id, thread_id, turn_id, replaces
        )
        if attached is not None:
            return attached
        held = await _reserve(ctx, user_id, thread_id, turn_id)
        started_generation = False
        try:
            response, started_generation = await lifecycle.open_regenerate(
                ctx, user_id, thread_id, turn_id, replaces, adapter, model_name,
                model_string, started,
            )
            return response
        finally:
            if held and not started_generation:
                await release_stream(ctx, user_id, thread_id, turn_id)
    except Refused as exc:
        raise _refusal(exc) from None


async def continue_turn(request: Request) -> Response:
    """``POST /v1/threads/{id}/turns/{turn_id}/continue``: answer a paused reply (its
    approvals, its client-side tools' outputs) and stream the rest of it."""
    ctx = context(request)
    started = time.monotonic()
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store, ctx.keys)
    await check_rate(ctx, user_id)
    turn_id = check_id(request.path_params["turn_id"], "turn_id", ctx.settings)
    answers = parse_answers(await read_json(request, ctx.settings.max_body_bytes))
    return await continue_paused(ctx, user_id, thread_id, turn_id, answers, started)


async def continue_paused(
    ctx: AppContext, user_id: int, thread_id: str, turn_id: str, answers: Answers,
    started: float, *, lenient: bool = False,
) -> Response:
    """Continue the paused reply of ``turn_id`` (``lifecycle.continue_turn``)."""
    try:
        held = await _reserve(ctx, user_id, thread_id, turn_id)
        started_generation = False
        try:
            response = await lifecycle.continue_turn(
                ctx, user_id, thread_id, turn_id, answers,
                lambda model_string: _resolve_adapter(ctx, model_string), started,
                lenient=lenient,
            )
            started_generation = True
            return response
        finally:
            if held and not started_generation:
                await release_stream(ctx, user_id, thread_id, turn_id)
    except Refused as exc:
        raise _refusal(exc) from None


async def stream(
    ctx: AppContext, user_id: int, thread_id: str, turn_id: str, after: int
) -> Response | None:
    """The turn's stream from SSE id ``after`` (``lifecycle.stream_turn``)."""
    try:
        return await lifecycle.stream_turn(ctx, user_id, thread_id, turn_id, after)
    except Refused as exc:
        raise _refusal(exc) from None


async def resume_turn(request: Request) -> Response:
    """``GET /v1/threads/{id}/turns/{turn_id}/stream``: replay from Last-Event-ID, then follow."""
    ctx = context(request)
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store, ctx.keys)
    turn_id = check_id(request.path_params["turn_id"], "turn_id", ctx.settings)
    after = _last_event_id(request)
    thread = await ctx.store.get_thread(thread_id, user_id)
    if thread is None:
        raise not_found()
    response = await stream(ctx, user_id, thread_id, turn_id, after)
    return response if response is not None else Response(status_code=204)


async def cancel_turn(request: Request) -> Response:
    """``POST /v1/threads/{id}/turns/{turn_id}/cancel``: stop a running generation."""
    ctx = context(request)
    thread_id = check_thread_path_id(request.path_params["thread_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store, ctx.keys)
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
    "cancel_turn", "regenerate", "regenerate_turn", "resume_turn", "start", "start_turn",
    "stream",
]
