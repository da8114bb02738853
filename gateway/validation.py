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
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "body_too_large", f"body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "body is not valid JSON") from None


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
        raise ApiError(400, "invalid_image", f"images[{index}] must be a data URL string")
    match = _DATA_URL_RE.match(value)
    if match is None:
        raise ApiError(
            400, "invalid_image",
            f"images[{index}] must be in format \"data:image/<type>;base64,<data>\"",
        )
    payload = match.group(2)
    if len(payload) * 3 // 4 > settings.max_image_bytes + 3:
        raise ApiError(
            413, "image_too_large", f"images[{index}] exceeds {settings.max_image_bytes} bytes"
        )
    try:
        decoded = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_image", f"images[{index}] is not valid base64") from None
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
        raise ApiError(
            400, "invalid_mentioned_documents",
            "mentioned_documents must be an array of objects {\"id\", \"title\", \"document_type\"}",
        )
    if len(docs) > 100:
        raise ApiError(400, "invalid_mentioned_documents", "at most 100 mentioned_documents")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > 200):
        raise ApiError(
            400, "invalid_model", "model must be a string in format \"<adapter>:<model>\""
        )
    return TurnRequest(turn_id, text, images, docs, model)


__all__ = [
    "TurnRequest",
    "check_id",
    "check_thread_path_id",
    "parse_turn_request",
    "read_json",
    "require_object",
]
