"""The running MCP servers, and the tools they offer to models.

:class:`ToolHub` is an async context manager entered with the gateway. On entry
it connects every configured server at once (stdio servers are started as child
processes) and lists their tools; a server that cannot be started or does not
answer within ``start_timeout`` is a :class:`ToolServerStartError` naming it, and
the gateway does not start. Afterwards one supervisor task per server, in the
hub's task group, watches the connection: when a stdio server exits, or a call
or a health ping finds the connection gone, it connects again (with a growing
pause, ``restart_delay`` up to ``max_restart_delay``) and lists the tools again.

:meth:`ToolHub.call` runs a tool by its model-facing name (:mod:`gateway.tools.names`)
within the server's ``timeoutSeconds`` and returns its output, or raises
:class:`ToolError` with a sentence fit for the model and the user: unknown tool,
server not running, server gone mid-call, no answer within the timeout, or the
tool's own error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import httpx2
from mcp import Client, MCPError, StdioServerParameters
from mcp.client._transport import TransportStreams
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CONNECTION_CLOSED, CallToolResult, Tool

from gateway.tools.config import McpConfig, ServerConfig
from gateway.tools.names import assign_names
from llm_adapters.base import ToolSpec
from turngate.exceptions import TurngateError

logger = logging.getLogger("turngate.tools")

START_TIMEOUT = 30.0
PING_SECONDS = 15.0
PING_TIMEOUT = 10.0
_MAX_LIST_PAGES = 100


class ToolServerStartError(TurngateError):
    """An MCP server did not start; the message names it and says why."""


class ToolError(Exception):
    """A tool call failed; the message is meant for the model and the user."""


@dataclass(frozen=True, slots=True)
class HubTool:
    """A tool offered to models: where it comes from and how it is offered."""

    name: str
    server: str
    tool: str
    description: str
    input_schema: Mapping[str, Any]

    @property
    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.input_schema)


class _WatchedReadStream:
    """The transport's read stream, setting ``closed`` when it ends (the server left)."""

    def __init__(self, inner: Any, closed: anyio.Event) -> None:
        self._inner = inner
        self._closed = closed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._closed.set()
            raise

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._closed.set()
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedReadStream:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        self._closed.set()
        result: bool | None = await self._inner.__aexit__(*exc)
        return result


@asynccontextmanager
async def _transport(server: ServerConfig, closed: anyio.Event) -> AsyncIterator[TransportStreams]:
    if server.transport == "stdio":
        params = StdioServerParameters(
            command=server.command, args=list(server.args), env=dict(server.env) or None,
            cwd=server.cwd,
        )
        async with stdio_client(params) as (read, write):
            yield _WatchedReadStream(read, closed), write
    else:
        timeout = httpx2.Timeout(30.0, read=max(300.0, server.timeout_seconds))
        async with (
            httpx2.AsyncClient(headers=dict(server.headers), timeout=timeout) as http,
            streamable_http_client(server.url, http_client=http) as (read, write),
        ):
            yield _WatchedReadStream(read, closed), write


@dataclass
class _Server:
    """The live state of one configured server."""

    config: ServerConfig
    client: Client | None = None
    tools: list[Tool] = field(default_factory=list)
    broken: anyio.Event = field(default_factory=anyio.Event)
    closed: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)
    starts: int = 0

    def usable(self) -> Client | None:
        """The connection, unless there is none or it is known to be gone."""
        if self.client is None or self.broken.is_set() or self.closed.is_set():
            return None
        return self.client

    def mark_broken(self, client: Client) -> None:
        """Have the supervisor reconnect, if ``client`` is still the current connection."""
        if self.client is client:
            self.broken.set()

    def notify(self) -> None:
        """Wake the calls waiting for the connection to change."""
        self.changed.set()
        self.changed = anyio.Event()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    if isinstance(exc, FileNotFoundError):
        return f"command not found ({exc.filename or exc})"
    if isinstance(exc, MCPError) and exc.code == CONNECTION_CLOSED:
        return "the connection closed before the server answered (did its process exit?)"
    if isinstance(exc, MCPError):
        return f"the server answered an MCP error: {exc.message}"
    if isinstance(exc, httpx2.HTTPError):
        return f"HTTP failed ({type(exc).__name__}: {exc})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _output(result: CallToolResult) -> Any:
    """What the model is given: structured content when the tool sent it, else the text
    of its content blocks (non-text blocks as their JSON)."""
    if result.structured_content is not None:
        return result.structured_content
    texts = []
    for block in result.content:
        text = getattr(block, "text", None)
        texts.append(text if isinstance(text, str)
                     else block.model_dump_json(by_alias=True, exclude_none=True))
    return "\n".join(texts)


class ToolHub:
    """Every configured MCP server, connected and supervised; see the module docstring."""

    def __init__(
        self,
        config: McpConfig,
        *,
        start_timeout: float = START_TIMEOUT,
        restart_delay: float = 0.5,
        max_restart_delay: float = 30.0,
        ping_seconds: float = PING_SECONDS,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        self.config = config
        self.start_timeout = start_timeout
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.ping_seconds = ping_seconds
        self.ping_timeout = ping_timeout
        self._servers = {s.name: _Server(s) for s in config.servers}
        self._tools: dict[str, HubTool] = {}
        #: User names by user id, for the servers' ``users`` (``turn.tools.toolbox_for``).
        self.user_names: dict[int, str] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    # -- the tools -------------------------------------------------------------------

    @property
    def tools(self) -> list[HubTool]:
        """Every tool of every server, by name; a server being restarted keeps its last list."""
        return sorted(self._tools.values(), key=lambda t: t.name)

    @property
    def specs(self) -> tuple[ToolSpec, ...]:
        """The tools in the form :class:`llm_adapters.base.AdapterRequest` takes."""
        return tuple(t.spec for t in self.tools)

    def get(self, name: str) -> HubTool | None:
        return self._tools.get(name)

    @property
    def restricted(self) -> bool:
        """Whether some server lists its ``users`` (a turn then needs its user's name)."""
        return any(s.config.users is not None for s in self._servers.values())

    def allows(self, name: str, user: str | None) -> bool:
        """Whether the tool ``name`` exists and its server's ``users`` admit ``user``."""
        tool = self._tools.get(name)
        return tool is not None and self._servers[tool.server].config.allows(user)

    def specs_for(self, user: str | None) -> tuple[ToolSpec, ...]:
        """The tools offered to the turns of the user named ``user`` (``specs`` less the
        tools of the servers whose ``users`` do not list them)."""
        return tuple(t.spec for t in self.tools if self._servers[t.server].config.allows(user))

    def needs_approval(self, name: str) -> bool:
        """Whether a call of the tool ``name`` waits for a person (its server's ``approval``);
        an unknown name does not (its call fails as unknown)."""
        tool = self._tools.get(name)
        return tool is not None and self._servers[tool.server].config.needs_approval(tool.tool)

    def starts(self, server: str) -> int:
        """How many times the server ``server`` was connected (1 until it is restarted)."""
        return self._servers[server].starts

    def _rename(self) -> None:
        pairs = {(s.config.name, t.name): t for s in self._servers.values() for t in s.tools}
        names = assign_names(pairs)
        self._tools = {
            names[key]: HubTool(names[key], key[0], key[1], tool.description or tool.title or "",
                                tool.input_schema)
            for key, tool in pairs.items()
        }

    # -- calls -----------------------------------------------------------------------

    async def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run the tool ``name`` with ``arguments``; its output, or ``ToolError`` (the
        only exception it raises, besides cancellation)."""
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self._tools)) or "none"
            raise ToolError(f"unknown tool {name!r}; the tools are: {known}")
        if arguments is not None and not isinstance(arguments, Mapping):
            raise ToolError(f"the arguments of {name!r} must be a JSON object, "
                            f"not {type(arguments).__name__}")
        server = self._servers[tool.server]
        timeout = server.config.timeout_seconds
        client: Client | None = None
        with anyio.move_on_after(timeout) as scope:
            while (client := server.usable()) is None:
                await server.changed.wait()
            try:
                result = await client.call_tool(tool.tool, dict(arguments or {}))
            except MCPError as exc:
                if exc.code == CONNECTION_CLOSED:
                    server.mark_broken(client)
                    raise ToolError(f"MCP server {tool.server!r} stopped during the call of "
                                    f"{name!r}; it is being restarted") from exc
                raise ToolError(f"tool {name!r} failed: {exc.message}") from exc
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError,
                    httpx2.HTTPError) as exc:
                server.mark_broken(client)
                raise ToolError(f"MCP server {tool.server!r} could not be reached for "
                                f"{name!r} ({_describe(exc)}); it is being restarted") from exc
            except Exception as exc:  # e.g. an answer that breaks the protocol
                raise ToolError(f"tool {name!r} failed: {_describe(exc)}") from exc
        if scope.cancelled_caught:
            if client is None:
                raise ToolError(f"MCP server {tool.server!r} is not running (it is being "
                                f"restarted); {name!r} was not called")
            raise ToolError(f"tool {name!r} did not answer within {timeout:g} s")
        if result.is_error:
            raise ToolError(f"tool {name!r} failed: {_output(result)}")
        return _output(result)

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> ToolHub:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        failures: list[str] = []

        async def start(server: _Server) -> None:
            try:
                await tg.start(self._supervise, server)
            except Exception as exc:
                failures.append(f"MCP server {server.config.name!r} did not start: "
                                f"{_describe(exc)}")

        try:
            async with anyio.create_task_group() as starting:
                for server in self._servers.values():
                    starting.start_soon(start, server)
            if failures:
                raise ToolServerStartError("; ".join(sorted(failures)))
        except BaseException:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            raise
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(exc_type, exc, tb)

    async def _supervise(
        self,
        server: _Server,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep one server connected: the first connection reports to ``task_status``
        (or raises), later ones are retried with a growing pause."""
        name = server.config.name
        delay = self.restart_delay
        first = True
        while True:
            closed = anyio.Event()
            connected = False
            try:
                # The deadline covers connecting and listing only; it is lifted once
                # the tools are known (the scope must wrap the connection's lifetime).
                with anyio.CancelScope(deadline=anyio.current_time() + self.start_timeout) as scope:
                    async with Client(_transport(server.config, closed), cache=None) as client:
                        server.tools = await _list_tools(client)
                        scope.deadline = math.inf
                        connected = True
                        server.client = client
                        server.broken = anyio.Event()
                        server.closed = closed
                        server.starts += 1
                        self._rename()
                        server.notify()
                        if first:
                            first = False
                            task_status.started()
                        else:
                            logger.info("MCP server %r restarted with %d tools", name,
                                        len(server.tools))
                        delay = self.restart_delay
                        try:
                            await self._watch(server, client, closed)
                        finally:
                            server.client = None
                            server.notify()
                if not connected:
                    raise TimeoutError(f"no answer within {self.start_timeout:g} s")
            except Exception as exc:
                if first:
                    raise
                logger.warning("MCP server %r is down (%s); next try in %g s",
                               name, _describe(exc), delay)
            else:
                logger.warning("MCP server %r stopped; restarting it in %g s", name, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, self.max_restart_delay)

    async def _watch(self, server: _Server, client: Client, closed: anyio.Event) -> None:
        """Return when the connection is gone: its stream ended, a call found it broken,
        or a health ping failed."""
        async with anyio.create_task_group() as tg:

            async def until(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            async def ping() -> None:
                while True:
                    await anyio.sleep(self.ping_seconds)
                    try:
                        with anyio.fail_after(self.ping_timeout):
                            await client.send_ping()
                    except Exception as exc:
                        logger.warning("MCP server %r did not answer a ping: %s",
                                       server.config.name, _describe(exc))
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(until, closed)
            tg.start_soon(until, server.broken)
            tg.start_soon(ping)


async def _list_tools(client: Client) -> list[Tool]:
    tools: list[Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


__all__ = ["HubTool", "ToolError", "ToolHub", "ToolServerStartError"]
