"""Request bodies: read within a size limit, parse, and validate into typed values.

Every failure is an ``ApiError`` (a 4xx with a JSON body) raised before
anything is written.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from gateway.errors import ApiError
from gateway.settings import Settings

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_DATA_URL_RE = re.compile(r"^data:(image/[A-Za-z0-9.+-]+);base64,(.*)$", re.DOTALL)
# NUL and lone surrogates: PostgreSQL rejects both in text and JSON, so they never get that far.
_BAD_CHARS_RE = re.compile("[\x00\ud800-\udfff]")
MAX_JSON_DEPTH = 32
_LEGACY_PART_TYPES = {
    "user": frozenset({"text", "image", "mentioned-documents"}),
    "assistant": frozenset({"text", "reasoning", "tool-call"}),
}


def _shown(value: Any, limit: int = 40) -> str:
    """A bad value as it appears in an error message: repr, cut short."""
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_json_value(data: Any) -> Any:
    """Refuse JSON nested deeper than ``MAX_JSON_DEPTH`` or holding NUL / lone surrogates."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _BAD_CHARS_RE.search(value):
                raise ApiError(
                    400, "invalid_json",
                    "strings must not contain NUL (\\u0000) or unpaired surrogates; "
                    "expected valid UTF-8 text",
                )
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(
                    400, "invalid_json", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
                )
            items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
            for key, item in items:
                stack.append((key, depth))
                stack.append((item, depth + 1))
    return data


async def read_json(request: Request, max_bytes: int) -> Any:
    """Read a JSON body without holding more than ``max_bytes`` in memory.

    415 unless the content type is JSON; 413 as soon as the body (declared or
    read so far) exceeds the limit; 400 for bytes that are not JSON.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(
            415, "unsupported_media_type",
            f"content-type {ctype or '(none)'!r} is not supported; expected \"application/json\"",
        )
    declared = request.headers.get("content-length", "").strip()
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(
            413, "body_too_large",
            f"body of {_shown_number(declared)} bytes exceeds the limit of {max_bytes} bytes",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(
                413, "body_too_large", f"body exceeds the limit of {max_bytes} bytes"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        start = raw[:20].decode("utf-8", "replace")
        raise ApiError(
            400, "invalid_json",
            f"body starting {start!r} is not valid JSON; expected a JSON object",
        ) from None
    return check_json_value(data)


def _shown_number(digits: str) -> str:
    return digits if len(digits) <= 20 else digits[:20] + "..."


def require_object(data: Any) -> dict[str, Any]:
    """The body must be a JSON object."""
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", f"body must be a JSON object, not {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    return {
        dict: "an object", list: "an array", str: "a string", bool: "a boolean",
        int: "a number", float: "a number", type(None): "null",
    }.get(type(value), type(value).__name__)


def check_id(value: Any, field: str, settings: Settings) -> str:
    """A thread id or turn id: 1..max chars of letters, digits and ``_.:-``."""
    if not isinstance(value, str):
        raise ApiError(400, f"invalid_{field}", f"{field} must be a string, not {_kind(value)}")
    if not value or len(value) > settings.max_id_chars or not _ID_RE.match(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ApiError(
            400, f"invalid_{field}",
            f"{field} {shown!r} must be 1..{settings.max_id_chars} characters of letters, "
            "digits, '_', '.', ':' or '-', starting with a letter or digit",
        )
    return value


def check_thread_path_id(value: str, settings: Settings) -> str:
    """A thread id from the URL path (a bad one is 404: it cannot exist)."""
    if not value or len(value) > settings.max_id_chars or not _ID_RE.match(value):
        raise ApiError(404, "thread_not_found", "thread not found")
    return value


def _check_image(value: Any, index: int, settings: Settings) -> str:
    if not isinstance(value, str):
        raise ApiError(
            400, "invalid_image",
            f"images[{index}] is {_kind(value)}; expected a string "
            "\"data:image/<type>;base64,<data>\"",
        )
    match = _DATA_URL_RE.match(value)
    if match is None:
        raise ApiError(
            400, "invalid_image",
            f"images[{index}] {_shown(value)} must be in format "
            "\"data:image/<type>;base64,<data>\"",
        )
    payload = match.group(2)
    if len(payload) * 3 // 4 > settings.max_image_bytes + 3:
        raise ApiError(
            413, "image_too_large", f"images[{index}] exceeds {settings.max_image_bytes} bytes"
        )
    try:
        decoded = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, "invalid_image",
            f"images[{index}] data {_shown(payload, 30)} is not valid base64",
        ) from None
    if not decoded:
        raise ApiError(400, "invalid_image", f"images[{index}] is empty")
    if len(decoded) > settings.max_image_bytes:
        raise ApiError(
            413, "image_too_large", f"images[{index}] exceeds {settings.max_image_bytes} bytes"
        )
    return value


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """A validated turn request body."""

    turn_id: str
    text: str
    images: list[str]
    mentioned_documents: list[dict[str, Any]]
    model: str | None


def parse_turn_request(data: Any, settings: Settings) -> TurnRequest:
    """Validate a turn body: ``{"turn_id","text","images"?,"mentioned_documents"?,"model"?}``."""
    body = require_object(data)
    if "turn_id" not in body:
        raise ApiError(400, "missing_turn_id", "turn_id is required")
    turn_id = check_id(body["turn_id"], "turn_id", settings)
    if "text" not in body:
        raise ApiError(400, "missing_text", "text is required")
    text = body["text"]
    if not isinstance(text, str):
        raise ApiError(400, "invalid_text", f"text must be a string, not {_kind(text)}")
    if len(text) > settings.max_text_chars:
        raise ApiError(
            400, "text_too_long",
            f"text has {len(text)} characters; the limit is {settings.max_text_chars}",
        )
    if "\x00" in text:
        raise ApiError(400, "invalid_text", "text must not contain NUL characters")
    images = body.get("images", [])
    if images is None:
        images = []
    if not isinstance(images, list):
        raise ApiError(400, "invalid_images", f"images must be an array, not {_kind(images)}")
    if len(images) > settings.max_images:
        raise ApiError(
            400, "too_many_images", f"{len(images)} images; the limit is {settings.max_images}"
        )
    images = [_check_image(img, i, settings) for i, img in enumerate(images)]
    docs = body.get("mentioned_documents", [])
    if docs is None:
        docs = []
    if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
        bad = docs if not isinstance(docs, list) else next(
            d for d in docs if not isinstance(d, dict)
        )
        raise ApiError(
            400, "invalid_mentioned_documents",
            f"mentioned_documents has {_shown(bad)}; expected an array of objects "
            "{\"id\", \"title\", \"document_type\"}",
        )
    if len(docs) > 100:
        raise ApiError(
            400, "invalid_mentioned_documents",
            f"{len(docs)} mentioned_documents; the limit is 100",
        )
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > 200):
        raise ApiError(
            400, "invalid_model",
            f"model {_shown(model)} must be a string in format \"<adapter>:<model>\"",
        )
    return TurnRequest(turn_id, text, images, docs, model)


def parse_legacy_message(
    body: dict[str, Any], settings: Settings
) -> tuple[str, list[dict[str, Any]]]:
    """Role and content of a legacy append: a string, or an array of known, well-typed parts.

    Parts the gateway itself would never write (usage, status, unknown types) are refused,
    so a client cannot plant them in the history.
    """
    role = body.get("role")
    if not isinstance(role, str) or role not in _LEGACY_PART_TYPES:
        raise ApiError(
            400, "invalid_role", f"role {_shown(role)} must be \"user\" or \"assistant\""
        )
    if "content" not in body:
        raise ApiError(400, "missing_content", "content is required")
    content = body["content"]
    if isinstance(content, str):
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}]
    elif isinstance(content, list) and len(content) <= 200:
        parts = [_legacy_part(role, part, i, settings) for i, part in enumerate(content)]
    else:
        raise ApiError(
            400, "invalid_content",
            f"content {_shown(content)} must be a string or an array of at most 200 parts "
            "{\"type\": ...}",
        )
    chars = sum(len(p["text"]) for p in parts if isinstance(p.get("text"), str))
    if chars > settings.max_text_chars:
        raise ApiError(
            400, "text_too_long",
            f"content has {chars} characters; the limit is {settings.max_text_chars}",
        )
    images = [p for p in parts if p["type"] == "image"]
    if len(images) > settings.max_images:
        raise ApiError(
            400, "too_many_images", f"{len(images)} images; the limit is {settings.max_images}"
        )
    return role, parts


def _legacy_part(role: str, part: Any, index: int, settings: Settings) -> dict[str, Any]:
    allowed = _LEGACY_PART_TYPES[role]
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(part, dict) or kind not in allowed:
        raise ApiError(
            400, "invalid_content",
            f"content[{index}] {_shown(part)} must be an object whose \"type\" is one of "
            f"{', '.join(sorted(allowed))} for role {role!r}",
        )
    if kind in ("text", "reasoning") and not isinstance(part.get("text"), str):
        raise ApiError(
            400, "invalid_content",
            f"content[{index}].text is {_kind(part.get('text'))}; expected a string",
        )
    if kind == "image":
        _check_image(part.get("image"), index, settings)
    if kind == "mentioned-documents" and not (
        isinstance(part.get("documents"), list)
        and all(isinstance(d, dict) for d in part["documents"])
    ):
        raise ApiError(
            400, "invalid_content",
            f"content[{index}].documents must be an array of objects",
        )
    if kind == "tool-call" and not (
        isinstance(part.get("toolCallId"), str) and isinstance(part.get("toolName"), str)
    ):
        raise ApiError(
            400, "invalid_content",
            f"content[{index}] tool-call needs string \"toolCallId\" and \"toolName\"",
        )
    return part


def check_model_field(body: dict[str, Any]) -> str | None:
    """The optional ``model`` of a body (regenerate): None, or a model string."""
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > 200):
        raise ApiError(
            400, "invalid_model",
            f"model {_shown(model)} must be a string in format \"<adapter>:<model>\"",
        )
    return model


__all__ = [
    "MAX_JSON_DEPTH",
    "TurnRequest",
    "check_json_value",
    "check_id",
    "check_model_field",
    "check_thread_path_id",
    "parse_legacy_message",
    "parse_turn_request",
    "read_json",
    "require_object",
]

