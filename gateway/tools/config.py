"""``TURNGATE_MCP_CONFIG``: the MCP servers whose tools the models may call.

The file (or inline JSON) has the ``mcpServers`` shape MCP clients already use::

    {"mcpServers": {
        "time": {"command": "mcp-server-time", "args": ["--local-timezone", "UTC"],
                 "env": {"TZ": "UTC"}},
        "docs": {"url": "http://127.0.0.1:9000/mcp", "headers": {"authorization": "Bearer x"},
                 "approval": ["delete_page"], "timeoutSeconds": 20}}}

A server is stdio (``command``, optional ``args``, ``env``, ``cwd``) or streamable
HTTP (``url``, optional ``headers``); ``type`` may say which (``"stdio"``,
``"http"`` or ``"streamable-http"``) and must agree with the keys given.
turngate's own optional keys: ``approval`` (``"never"``, the default, ``"always"``,
or a list of the server's tool names that need a person's approval),
``users`` (the names of the users whose turns are offered the server's tools;
absent, every user's), ``timeoutSeconds`` (per call, default 30) and ``disabled``
(``true`` skips the server). Any other key is an error, so a typo does not pass
silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from turngate.exceptions import ConfigError

ENV = "TURNGATE_MCP_CONFIG"
DEFAULT_TIMEOUT_SECONDS = 30.0

_STDIO_KEYS = frozenset({"command", "args", "env", "cwd"})
_HTTP_KEYS = frozenset({"url", "headers"})
_OWN_KEYS = frozenset({"type", "approval", "users", "timeoutSeconds", "disabled"})
_TYPES = {"stdio": "stdio", "http": "http", "streamable-http": "http", "streamableHttp": "http"}

Approval = Literal["always", "never"] | frozenset[str]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """One MCP server: how to reach it and turngate's rules for its tools."""

    name: str
    transport: Literal["stdio", "http"]
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    approval: Approval = "never"
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    #: The users (by name) whose turns may use this server's tools; None: every user.
    users: frozenset[str] | None = None

    def allows(self, user: str | None) -> bool:
        """Whether the turns of the user named ``user`` are offered this server's tools
        (``None``, a user not known by name, only when the server is open to all)."""
        return self.users is None or (user is not None and user in self.users)

    def needs_approval(self, tool: str) -> bool:
        """Whether a call of this server's tool ``tool`` waits for a person's approval."""
        if self.approval == "always":
            return True
        if self.approval == "never":
            return False
        return tool in self.approval


@dataclass(frozen=True, slots=True)
class McpConfig:
    """Every enabled server, in the order of the file."""

    servers: tuple[ServerConfig, ...] = ()


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{ENV}: {where}: {message}")


def _strings(where: str, key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _fail(where, f"\"{key}\" must be an object of strings, e.g. {{\"NAME\": \"value\"}}")
    return dict(value)


def _shown(value: Any) -> str:
    """``value`` as the config file spells it, cut short enough for one error line."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _users(where: str, raw: Mapping[str, Any]) -> frozenset[str] | None:
    if "users" not in raw:
        return None
    users = raw["users"]
    if not isinstance(users, list) or not all(isinstance(u, str) and u.strip() for u in users):
        raise _fail(where, f"\"users\" is {_shown(users)}: it must be a list of user names "
                           "(non-empty strings), e.g. [\"alice\", \"bob\"]")
    return frozenset(users)


def _server(name: str, raw: Any) -> ServerConfig | None:
    where = f"server {name!r}"
    if not name.strip():
        raise _fail(f"server {name!r}", "a server name must not be empty")
    if not isinstance(raw, dict):
        raise _fail(where, "must be an object with \"command\" (stdio) or \"url\" (HTTP)")
    unknown = sorted(set(raw) - _STDIO_KEYS - _HTTP_KEYS - _OWN_KEYS)
    if unknown:
        accepted = ", ".join(sorted(_STDIO_KEYS | _HTTP_KEYS | _OWN_KEYS))
        raise _fail(where, f"unknown key {unknown[0]!r}: keys must be among {accepted}")
    disabled = raw.get("disabled", False)
    if not isinstance(disabled, bool):
        raise _fail(where, "\"disabled\" must be true or false")
    has_command, has_url = "command" in raw, "url" in raw
    if has_command == has_url:
        raise _fail(where, "must have exactly one of \"command\" (stdio) and \"url\" (HTTP)")
    transport: Literal["stdio", "http"] = "stdio" if has_command else "http"
    declared = raw.get("type")
    if declared is not None:
        if declared not in _TYPES:
            raise _fail(where, f"\"type\" {declared!r} is not supported: it must be one of "
                               "\"stdio\", \"http\", \"streamable-http\"")
        if _TYPES[declared] != transport:
            raise _fail(where, f"\"type\" {declared!r} must match its "
                               f"\"{'command' if has_command else 'url'}\"")
    mixed = sorted(set(raw) & (_HTTP_KEYS if has_command else _STDIO_KEYS))
    if mixed:
        raise _fail(where, f"{mixed[0]!r} belongs to a {'HTTP' if has_command else 'stdio'} "
                           f"server: a server with \"{'command' if has_command else 'url'}\" "
                           "must not have it")

    approval_raw = raw.get("approval", "never")
    approval: Approval
    if approval_raw in ("always", "never"):
        approval = approval_raw
    elif isinstance(approval_raw, list) and all(isinstance(t, str) for t in approval_raw):
        approval = frozenset(approval_raw)
    else:
        raise _fail(where, "\"approval\" must be \"always\", \"never\" or a list of tool names")

    timeout = raw.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
        timeout > 0 and math.isfinite(timeout)
    ):
        raise _fail(where, "\"timeoutSeconds\" must be a positive number of seconds, e.g. 30")

    common: dict[str, Any] = {"approval": approval, "timeout_seconds": float(timeout),
                              "users": _users(where, raw)}
    if has_command:
        command = raw["command"]
        if not isinstance(command, str) or not command.strip():
            raise _fail(where, "\"command\" must be a non-empty string (the program to run)")
        args = raw.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise _fail(where, "\"args\" must be a list of strings")
        cwd = raw.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise _fail(where, "\"cwd\" must be a string (a directory)")
        server = ServerConfig(name, "stdio", command=command, args=tuple(args),
                              env=_strings(where, "env", raw.get("env", {})), cwd=cwd, **common)
    else:
        url = raw["url"]
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise _fail(where, "\"url\" must be in format \"http[s]://<host>[:<port>]/<path>\"")
        server = ServerConfig(name, "http", url=url,
                              headers=_strings(where, "headers", raw.get("headers", {})),
                              **common)
    return None if disabled else server


def parse_config(data: Any) -> McpConfig:
    """Validate decoded JSON; raise ``ConfigError`` naming the server and key at fault."""
    if not isinstance(data, dict) or not isinstance(data.get("mcpServers"), dict):
        raise ConfigError(f"{ENV}: must be a JSON object like "
                          "{\"mcpServers\": {\"<name>\": {\"command\": ...} | {\"url\": ...}}}")
    unknown = sorted(set(data) - {"mcpServers"})
    if unknown:
        raise ConfigError(f"{ENV}: unknown top-level key {unknown[0]!r}: the only key must be "
                          "\"mcpServers\"")
    servers = [_server(name, raw) for name, raw in data["mcpServers"].items()]
    return McpConfig(tuple(s for s in servers if s is not None))


def load_config(name: str, raw: str) -> McpConfig | None:
    """The setting's parser: inline JSON (starting with ``{``) or a JSON file path;
    unset means no servers."""
    if not raw.strip():
        return None
    text = raw
    if not raw.lstrip().startswith("{"):
        try:
            text = Path(raw).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{name}={raw!r}: must be inline JSON or the path of a readable "
                              f"JSON file ({exc.strerror})") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: must be valid JSON ({exc})") from exc
    return parse_config(data)


__all__ = ["DEFAULT_TIMEOUT_SECONDS", "McpConfig", "ServerConfig", "load_config", "parse_config"]
