"""Content parts: building the user turn, and judging an assistant turn empty."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

ASSISTANT_SHELL: list[dict[str, Any]] = [{"type": "text", "text": ""}]
NO_TEXT_MARKER: list[dict[str, Any]] = [{"type": "status", "text": "(no text response)"}]


def _valid_document(entry: object) -> dict[str, Any] | None:
    if not isinstance(entry, dict):
        return None
    doc_id = entry.get("id")
    title = entry.get("title")
    document_type = entry.get("document_type")
    # bool is an int subclass, but True is no document id.
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
        return None
    if not isinstance(title, str) or not isinstance(document_type, str):
        return None
    return {"id": doc_id, "title": title, "document_type": document_type}


def build_user_content(
    text: str,
    images: Sequence[str] | None = None,
    mentioned_documents: Iterable[object] | None = None,
) -> list[dict[str, Any]]:
    """Build the persisted parts of a user turn, in the order docs/API.md gives.

    A text part first, then one image part per image (data URLs, kept as given),
    then one ``mentioned-documents`` part holding the valid entries (``id`` a
    string or int, ``title`` and ``document_type`` strings; invalid entries are
    dropped, and no part is added when none is valid).
    """
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts.extend({"type": "image", "image": image} for image in images or ())
    documents = [doc for doc in map(_valid_document, mentioned_documents or ()) if doc is not None]
    if documents:
        parts.append({"type": "mentioned-documents", "documents": documents})
    return parts


def is_empty_assistant_content(content: Sequence[dict[str, Any]]) -> bool:
    """True when a finished reply has no text, no reasoning, no tool call and no error."""
    for part in content:
        kind = part.get("type")
        if kind in ("tool-call", "error"):  # a failed reply keeps its stored reason
            return False
        if kind in ("text", "reasoning") and part.get("text"):
            return False
    return True


def estimate_completion_tokens(content: Sequence[dict[str, Any]]) -> int:
    """About four characters per token: ceil(chars / 4) of the stored text."""
    chars = sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return (chars + 3) // 4
