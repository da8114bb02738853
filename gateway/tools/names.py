"""The names under which MCP tools are offered to models.

Every provider accepts ``^[a-zA-Z0-9_-]{1,64}$``. A tool ``get_current_time`` of
the server ``time`` is offered as ``time__get_current_time``: the server name,
two underscores, the tool name, any other character replaced by ``_``. A name
that would be longer than 64 characters, or that two (server, tool) pairs would
share after that replacement, is cut and ends with ``_`` and 8 hex digits of a
hash of the pair instead. The names depend only on the set of pairs, not on the
order in which servers listed them, so they stay the same across restarts.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable

MAX_LENGTH = 64
VALID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
SEPARATOR = "__"
_INVALID = re.compile(r"[^a-zA-Z0-9_-]")


def sanitize(text: str) -> str:
    """``text`` with every character outside ``[a-zA-Z0-9_-]`` replaced by ``_``."""
    return _INVALID.sub("_", text)


def _hashed(server: str, tool: str, digits: int) -> str:
    digest = hashlib.sha256(f"{server}\0{tool}".encode()).hexdigest()[:digits]
    base = sanitize(f"{server}{SEPARATOR}{tool}")[: MAX_LENGTH - digits - 1]
    return f"{base}_{digest}"


def assign_names(pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """A unique, valid model-facing name for each ``(server, tool)`` pair."""
    unique = sorted(set(pairs))
    by_candidate: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for server, tool in unique:
        by_candidate[sanitize(f"{server}{SEPARATOR}{tool}")].append((server, tool))
    names: dict[tuple[str, str], str] = {}
    taken: set[str] = set()
    hashed: list[tuple[str, str]] = []
    for candidate, owners in by_candidate.items():
        if len(owners) == 1 and 0 < len(candidate) <= MAX_LENGTH:
            names[owners[0]] = candidate
            taken.add(candidate)
        else:
            hashed.extend(owners)
    for server, tool in sorted(hashed):
        digits = 8
        name = _hashed(server, tool, digits)
        while name in taken:  # a clash of hashes: take more digits until the name is free
            digits += 4
            name = _hashed(server, tool, digits)
        names[(server, tool)] = name
        taken.add(name)
    return names


__all__ = ["MAX_LENGTH", "SEPARATOR", "VALID", "assign_names", "sanitize"]
