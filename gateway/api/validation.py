"""Request bodies: read within a size limit, parse, and validate into typed values.

Every failure is an ``ApiError`` (a 4xx with a JSON body) raised before
anything is written.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from gateway.api.errors import ApiError
from gateway.ops.settings import Settings
from gateway.turn.events import ToolFailed, ToolOutput
from gateway.turn.tools import Answers, Decision, cap_output
from llm_adapters.base import ToolSpec
from persistence import build_user_content
from persistence.content import NO_TEXT_MARKER

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_DATA_URL_RE = re.compile(r"^data:(image/[A-Za-z0-9.+-]+);base64,(.*)$", re.DOTALL)
# NUL and lone surrogates: PostgreSQL rejects both in text and JSON, so they never get that far.
_BAD_CHARS_RE = re.compile("[\x00\ud800-\udfff]")
MAX_JSON_DEPTH = 32
# The stored content-part schema (docs/API.md, "Stored content parts"): per role, each part type
# and its keys, required and optional. A legacy append is held to it key by key, so a
# client cannot store parts (or keys) the gateway itself would never write.
_LEGACY_PART_TYPES = {
    "user": frozenset({"text", "image", "mentioned-documents"}),
    "assistant": frozenset({"text", "reasoning", "tool-call", "status"}),
}
_PART_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "text": (frozenset({"type", "text"}), frozenset()),
    "reasoning": (frozenset({"type", "text"}), frozenset()),
    "image": (frozenset({"type", "image"}), frozenset()),
    "mentioned-documents": (frozenset({"type", "documents"}), frozenset()),
    "tool-call": (
        frozenset({"type", "toolCallId", "toolName"}),
        frozenset({"args", "argsText", "result"}),
    ),
    "status": (frozenset({"type", "text"}), frozenset()),
}
_DOCUMENT_KEYS = frozenset({"id", "title", "document_type"})
# The only status part the gateway writes: the marker of a reply with no text.
_STATUS_TEXTS = frozenset(part["text"] for part in NO_TEXT_MARKER)
# Raster formats every vision provider accepts, by the bytes they start with. SVG and
# anything else is refused: no provider takes it as vision input, and SVG can carry
# script into every client that renders the history.
_IMAGE_SIGNATURES: dict[str, tuple[str, tuple[bytes, ...]]] = {
    "image/png": ("PNG", (b"\x89PNG\r\n\x1a\n",)),
    "image/jpeg": ("JPEG", (b"\xff\xd8\xff",)),
    "image/gif": ("GIF", (b"GIF87a", b"GIF89a")),
    "image/webp": ("WebP", (b"RIFF",)),
}
_IMAGE_TYPES_TEXT = "image/png, image/jpeg, image/gif or image/webp"


def _shown(value: Any, limit: int = 40) -> str:
    """A bad value as it appears in an error message: repr, cut short."""
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _NonFiniteNumber(ValueError):
    """A JSON number too large for a double (``1e999``): Python reads it as infinity."""

    def __init__(self, literal: str) -> None:
        super().__init__(literal)
        self.literal = literal


def _finite_float(literal: str) -> float:
    # json.loads turns 1e999 into inf, which PostgreSQL refuses in jsonb (a 500 at
    # write time) and SQLite stores: refuse it here, on both, naming the number.
    value = float(literal)
    if not math.isfinite(value):
        raise _NonFiniteNumber(literal)
    return value


def _non_finite_error(literal: str) -> ApiError:
    return ApiError(
        400, "invalid_json",
        f"number {_shown(literal)} is out of range; expected a finite number "
        "(at most about 1.8e308 in magnitude)",
    )


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
        elif isinstance(value, float) and not math.isfinite(value):
            raise _non_finite_error(repr(value))
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
        data = json.loads(raw, parse_constant=_no_constants, parse_float=_finite_float)
    except _NonFiniteNumber as exc:
        raise _non_finite_error(exc.literal) from None
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
    mime, payload = match.group(1).lower(), match.group(2)
    if mime not in _IMAGE_SIGNATURES:
        raise ApiError(
            400, "invalid_image",
            f"images[{index}] has type {_shown(mime)}; expected {_IMAGE_TYPES_TEXT}",
        )
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
    _check_image_bytes(mime, decoded, index)
    return value


def _check_image_bytes(mime: str, decoded: bytes, index: int) -> None:
    """The declared type must be one providers take, and the bytes must be of that type."""
    name, signatures = _IMAGE_SIGNATURES[mime]
    looks_right = decoded.startswith(signatures) and (
        mime != "image/webp" or decoded[8:12] == b"WEBP"
    )
    if not looks_right:
        raise ApiError(
            400, "invalid_image",
            f"images[{index}] is declared {mime} but its data starts {_shown(decoded[:8])}, "
            f"not like a {name} file; expected {name} data",
        )


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """A validated turn request body."""

    turn_id: str
    text: str
    images: list[str]
    mentioned_documents: list[dict[str, Any]]
    model: str | None
    tools: dict[str, ToolSpec] = field(default_factory=dict)  # client-side tools


def parse_turn_request(data: Any, settings: Settings) -> TurnRequest:
    """Validate a turn body: ``{"turn_id","text","images"?,"mentioned_documents"?,"model"?,
    "tools"?}`` (``tools``: client-side tools, ``parse_client_tools``)."""
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
    if not images and not text.strip():
        # Nothing to answer: a provider refuses an empty user message (or answers
        # nonsense), after the rows and a usage row were written for it.
        raise ApiError(
            400, "empty_text",
            f"text {_shown(text)} is empty or only whitespace and there are no images; "
            "expected some text or at least one image",
        )
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
    # isprintable(): no CR/LF or other control characters, which would end up in log
    # lines, metric labels and provider request bodies.
    if model is not None and (
        not isinstance(model, str) or not model.strip() or len(model) > 200
        or not model.isprintable()
    ):
        raise ApiError(
            400, "invalid_model",
            f"model {_shown(model)} must be a string of at most 200 printable characters "
            "(no control characters) in format \"<adapter>:<model>\"",
        )
    return TurnRequest(turn_id, text, images, docs, model, parse_client_tools(body.get("tools")))


def parse_legacy_message(
    body: dict[str, Any], settings: Settings
) -> tuple[str, list[dict[str, Any]]]:
    """Role and content of a legacy append: a string, or an array of known, well-typed parts.

    Parts the gateway itself would never write (usage parts, unknown types or keys, a
    status part other than the no-text marker) are refused, so a client cannot plant
    them in the history.
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
        checked = [_legacy_part(role, part, i, settings) for i, part in enumerate(content)]
        # A documents part left with no complete entry is not stored (as for a turn).
        parts = [p for p in checked if p.get("type") != "mentioned-documents" or p["documents"]]
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
    """One part of a legacy append, held to the stored schema (docs/API.md)."""
    allowed = _LEGACY_PART_TYPES[role]
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(part, dict) or not isinstance(kind, str) or kind not in allowed:
        raise ApiError(
            400, "invalid_content",
            f"content[{index}] {_shown(part)} must be an object whose \"type\" is one of "
            f"{', '.join(sorted(allowed))} for role {role!r}",
        )
    fields: dict[str, Any] = part
    required, optional = _PART_KEYS[kind]
    missing = sorted(required - part.keys())
    unknown = sorted(part.keys() - required - optional)
    if missing or unknown:
        what = (f"lacks {', '.join(map(repr, missing))}" if missing
                else f"has unknown key {_shown(unknown[0])}")
        raise ApiError(
            400, "invalid_content",
            f"content[{index}] ({kind}) {what}; expected exactly the keys "
            f"{', '.join(sorted(required))}"
            + (f" (optional: {', '.join(sorted(optional))})" if optional else ""),
        )
    if kind in ("text", "reasoning", "status") and not isinstance(part["text"], str):
        raise ApiError(
            400, "invalid_content",
            f"content[{index}].text is {_kind(part['text'])}; expected a string",
        )
    if kind == "status" and part["text"] not in _STATUS_TEXTS:
        raise ApiError(
            400, "invalid_content",
            f"content[{index}] status text {_shown(part['text'])} is not one the gateway "
            f"writes; expected {' or '.join(map(repr, sorted(_STATUS_TEXTS)))}",
        )
    if kind == "image":
        _check_image(part["image"], index, settings)
    if kind == "mentioned-documents":
        fields = {"type": kind, "documents": _legacy_documents(part["documents"], index)}
    if kind == "tool-call":
        for key in ("toolCallId", "toolName"):
            if not isinstance(part[key], str) or not part[key]:
                raise ApiError(
                    400, "invalid_content",
                    f"content[{index}].{key} {_shown(part[key])} must be a non-empty string",
                )
        if "argsText" in part and not isinstance(part["argsText"], str):
            raise ApiError(
                400, "invalid_content",
                f"content[{index}].argsText is {_kind(part['argsText'])}; expected a string",
            )
    return fields


def _legacy_documents(documents: Any, index: int) -> list[dict[str, Any]]:
    """Document entries: objects of id, title, document_type and nothing else.

    Entries missing a field are dropped, as for a turn (docs/API.md); other keys are refused.
    """
    if not isinstance(documents, list) or len(documents) > 100:
        raise ApiError(
            400, "invalid_content",
            f"content[{index}].documents {_shown(documents)} must be an array of at most 100 "
            "objects {\"id\", \"title\", \"document_type\"}",
        )
    for entry in documents:
        if not isinstance(entry, dict) or entry.keys() - _DOCUMENT_KEYS:
            shown = entry if not isinstance(entry, dict) else sorted(entry.keys() - _DOCUMENT_KEYS)
            raise ApiError(
                400, "invalid_content",
                f"content[{index}].documents has {_shown(shown)}; expected objects with only "
                "\"id\", \"title\", \"document_type\"",
            )
    parts = build_user_content("", (), documents)
    return parts[1]["documents"] if len(parts) > 1 else []


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



_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_CLIENT_TOOLS = 64
MAX_ANSWERS = 128


def parse_client_tools(value: Any) -> dict[str, ToolSpec]:
    """Client-side tools of a turn body: ``[{"name", "description"?, "inputSchema"?}]``.

    A name is valid for every provider (``^[a-zA-Z0-9_-]{1,64}$``) and not given
    twice; ``inputSchema`` is a JSON Schema object of ``"type": "object"``.
    """
    if value is None:
        return {}
    if not isinstance(value, list):
        raise ApiError(400, "invalid_tools", f"tools must be an array, not {_kind(value)}")
    if len(value) > MAX_CLIENT_TOOLS:
        raise ApiError(400, "invalid_tools",
                       f"{len(value)} tools; the limit is {MAX_CLIENT_TOOLS}")
    tools: dict[str, ToolSpec] = {}
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ApiError(400, "invalid_tools", f"tools[{i}] is {_kind(item)}; expected an "
                           "object {\"name\", \"description\", \"inputSchema\"}")
        name = item.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise ApiError(400, "invalid_tools", f"tools[{i}].name {_shown(name)} must match "
                           "^[a-zA-Z0-9_-]{1,64}$")
        if name in tools:
            raise ApiError(400, "invalid_tools", f"tools[{i}].name {name!r} is given twice")
        description = item.get("description", "")
        if not isinstance(description, str) or len(description) > 4096:
            raise ApiError(400, "invalid_tools", f"tools[{i}].description must be a string "
                           "of at most 4096 characters")
        schema = item.get("inputSchema", {"type": "object", "properties": {}})
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise ApiError(400, "invalid_tools", f"tools[{i}].inputSchema {_shown(schema)} "
                           "must be a JSON Schema object with \"type\": \"object\"")
        tools[name] = ToolSpec(name, description, schema)
    return tools


def parse_answers(data: Any) -> Answers:
    """A continuation body: ``{"approvals": [{"approvalId", "approved", "reason"?}],
    "toolOutputs": [{"toolCallId", "output"} | {"toolCallId", "errorText"}]}``."""
    body = require_object(data)
    approvals_raw = body.get("approvals") or []
    outputs_raw = body.get("toolOutputs") or []
    for field_name, raw in (("approvals", approvals_raw), ("toolOutputs", outputs_raw)):
        if not isinstance(raw, list):
            raise ApiError(400, "invalid_answers", f"{field_name} must be an array, "
                           f"not {_kind(raw)}")
        if len(raw) > MAX_ANSWERS:
            raise ApiError(400, "invalid_answers",
                           f"{len(raw)} {field_name}; the limit is {MAX_ANSWERS}")
    approvals: dict[str, Decision] = {}
    for i, item in enumerate(approvals_raw):
        if not isinstance(item, dict) or not isinstance(item.get("approvalId"), str) \
                or type(item.get("approved")) is not bool:
            raise ApiError(400, "invalid_answers", f"approvals[{i}] is {_shown(item)}; expected "
                           "{\"approvalId\": string, \"approved\": boolean, \"reason\"?: string}")
        reason = item.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 2000):
            raise ApiError(400, "invalid_answers", f"approvals[{i}].reason must be a string of "
                           "at most 2000 characters")
        approvals[item["approvalId"]] = Decision(item["approved"], reason or None)
    outputs: dict[str, ToolOutput | ToolFailed] = {}
    for i, item in enumerate(outputs_raw):
        if not isinstance(item, dict) or not isinstance(item.get("toolCallId"), str) or (
            ("output" in item) == isinstance(item.get("errorText"), str)
        ):
            raise ApiError(400, "invalid_answers", f"toolOutputs[{i}] is {_shown(item)}; "
                           "expected {\"toolCallId\", \"output\"} or {\"toolCallId\", "
                           "\"errorText\": string}")
        call_id = item["toolCallId"]
        outputs[call_id] = (ToolOutput(call_id, cap_output(item["output"])) if "output" in item
                            else ToolFailed(call_id, item["errorText"]))
    return Answers(approvals, outputs)
