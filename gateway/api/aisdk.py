"""AI SDK-compatible routes: ``useChat`` and assistant-ui talk to turngate unchanged.

- ``POST /api/chat``: the body ``DefaultChatTransport`` sends by default,
  ``{id, messages, trigger, messageId?}`` (also the docs' variant
  ``{id, message}`` that sends only the last message). The chat id is the
  thread id (created for the caller when new; 404 when it is someone else's),
  the last user message's id is the turn id, its text parts joined are the
  text and its image file parts (data URLs) are the images. ``trigger:
  "regenerate-message"`` answers that user message again (``messageId``: the
  reply it replaces, which is kept as ``superseded``). Messages ending with the
  assistant's reply (``useChat`` resubmitting after ``addToolApprovalResponse`` or
  ``addToolOutput``) continue that paused reply with the approvals and outputs in
  its tool parts (``POST .../turns/{turn_id}/continue``). ``tools``: client-side
  tools of the turn, as in the turn body. The server keeps
  the history itself, so earlier messages in the body are ignored. The reply
  is the turn stream of ``POST /v1/threads/{id}/turns``, byte for byte.
- ``GET /api/chat/{id}/stream``: the ``useChat({resume: true})`` endpoint. 204
  when no turn is generating on that thread in this process (also for an unknown
  or foreign chat id); else the turn's
  stream replayed from its first chunk and then followed live (the SDK's
  default ``resumeStreamIsReplay``).

Errors on these routes are a plain-text sentence, because ``useChat`` shows the
response body as the error message; the code is in ``x-turngate-error-code``
(``gateway.api.errors``).
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.auth import authenticate
from gateway.api.errors import ApiError, not_found
from gateway.api.limits import check_rate
from gateway.api.turns import continue_paused, regenerate, start, stream
from gateway.api.validation import (
    check_id,
    check_model_field,
    check_thread_path_id,
    parse_answers,
    parse_turn_request,
    read_json,
    require_object,
)
from gateway.context import context
from gateway.turn.tools import Answers
from persistence import ThreadIdTaken


def _last_user_message(body: dict[str, Any]) -> dict[str, Any]:
    """The message to answer: the last user message of ``messages``, or ``message``."""
    messages = body.get("messages")
    if messages is None and isinstance(body.get("message"), dict):
        messages = [body["message"]]
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400, "missing_messages",
            "messages must be a non-empty array of UI messages (or send \"message\")",
        )
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message
    raise ApiError(400, "missing_user_message", "messages has no user message to answer")


def _last_message(body: dict[str, Any]) -> dict[str, Any]:
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else body.get("message")
    return last if isinstance(last, dict) else {}


def _answers_of(message: dict[str, Any]) -> Answers:
    """The answers in a UI assistant message's tool parts: approvals a person gave
    (``approval-responded``) and outputs the client produced (``output-available`` /
    ``output-error``). Those the reply does not wait for are dropped later."""
    approvals: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    parts = message.get("parts")
    for part in parts if isinstance(parts, list) else []:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if not isinstance(kind, str) or not (kind.startswith("tool-") or kind == "dynamic-tool"):
            continue
        state, approval = part.get("state"), part.get("approval")
        if state == "approval-responded" and isinstance(approval, dict):
            answer = {"approvalId": approval.get("id"), "approved": approval.get("approved")}
            if approval.get("reason") is not None:
                answer["reason"] = approval["reason"]
            approvals.append(answer)
        elif state == "output-available" and "output" in part:
            outputs.append({"toolCallId": part.get("toolCallId"), "output": part["output"]})
        elif state == "output-error" and isinstance(part.get("errorText"), str):
            outputs.append({"toolCallId": part.get("toolCallId"),
                            "errorText": part["errorText"]})
    return parse_answers({"approvals": approvals, "toolOutputs": outputs})


def _text_and_images(message: dict[str, Any]) -> tuple[str, list[Any]]:
    parts = message.get("parts")
    if parts is None and isinstance(message.get("content"), str):
        parts = [{"type": "text", "text": message["content"]}]  # pre-v5 message shape
    if not isinstance(parts, list):
        raise ApiError(400, "invalid_message", "the user message must have a parts array")
    texts: list[str] = []
    images: list[Any] = []
    for part in parts:
        if not isinstance(part, dict):
            raise ApiError(400, "invalid_message", "each message part must be an object")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError(400, "invalid_message", "a text part must have a string text")
            texts.append(text)
        elif kind == "file":
            media = part.get("mediaType")
            if isinstance(media, str) and media.startswith("image/"):
                images.append(part.get("url"))
            else:
                raise ApiError(
                    400, "unsupported_file",
                    f"file parts of type {str(media)[:40]!r} are not supported; send images",
                )
    return "\n".join(texts), images


async def chat(request: Request) -> Response:
    """``POST /api/chat``: the AI SDK request, answered by the turn stream."""
    ctx = context(request)
    started = time.monotonic()
    user_id = await authenticate(request, ctx.store, ctx.keys)
    await check_rate(ctx, user_id)
    body = require_object(await read_json(request, ctx.settings.max_body_bytes))
    if "id" not in body:
        raise ApiError(400, "missing_id", "id (the chat id) is required")
    thread_id = check_id(body["id"], "id", ctx.settings)
    message = _last_user_message(body)
    if "id" not in message:
        raise ApiError(400, "missing_message_id", "the user message must have an id")
    last = _last_message(body)
    if last.get("role") == "assistant" and body.get("trigger") != "regenerate-message":
        # useChat resubmits the paused reply once the person approved or the client ran
        # its tool (sendAutomaticallyWhen): the turn of the user message before it goes on.
        turn_id = check_id(message["id"], "message id", ctx.settings)
        return await continue_paused(ctx, user_id, thread_id, turn_id, _answers_of(last),
                                     started, lenient=True)
    if body.get("trigger") == "regenerate-message":
        # messages end with the user message; messageId is the reply it replaces (the
        # id our start chunk gave it), absent when the client has none.
        turn_id = check_id(message["id"], "message id", ctx.settings)
        replaces = body.get("messageId")
        replaced = int(replaces) if isinstance(replaces, str) and replaces.isdigit() else None
        return await regenerate(
            ctx, user_id, thread_id, turn_id, check_model_field(body), replaced, started
        )
    text, images = _text_and_images(message)
    turn = parse_turn_request(
        {"turn_id": message["id"], "text": text, "images": images, "model": body.get("model"),
         "tools": body.get("tools")},
        ctx.settings,
    )
    if await ctx.store.get_thread(thread_id, user_id) is None:
        try:
            # Untitled: its first turn titles it (gateway.turn.titles).
            await ctx.store.create_thread(user_id, thread_id)
        except ThreadIdTaken:
            raise not_found() from None
    return await start(ctx, user_id, thread_id, turn, started)


async def chat_stream(request: Request) -> Response:
    """``GET /api/chat/{id}/stream``: replay-then-follow the running turn, or 204."""
    ctx = context(request)
    thread_id = check_thread_path_id(request.path_params["chat_id"], ctx.settings)
    user_id = await authenticate(request, ctx.store, ctx.keys)
    if await ctx.store.get_thread(thread_id, user_id) is None:
        # useChat({resume: true}) asks on mount, also for a chat not started yet: 204
        # is "nothing to resume", the same answer for someone else's chat (no leak).
        return Response(status_code=204)
    live = ctx.relay.running_on_thread(thread_id)
    if live is None or live.owner_id != user_id:
        return Response(status_code=204)
    response = await stream(ctx, user_id, thread_id, live.turn_id, -1)
    return response if response is not None else Response(status_code=204)


ROUTES: list[Route] = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/chat/{chat_id}/stream", chat_stream, methods=["GET"]),
]

__all__ = ["ROUTES", "chat", "chat_stream"]
