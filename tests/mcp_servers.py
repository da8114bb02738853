"""MCP servers written with the ``mcp`` SDK, for the tool hub's tests.

``python -m tests.mcp_servers`` serves :data:`server` over stdio; :func:`http_server`
serves it over streamable HTTP with uvicorn on a free port of 127.0.0.1, in the
test's own event loop, and records the ``authorization`` header of each request.
Tools: ``echo`` (text back), ``add`` (structured output), ``note`` (text
content only), ``environ`` (a variable of the server's environment), ``look.up``
(a name with a dot), ``fail`` (a tool error), ``crash`` (the process exits
mid-call; stdio only), ``hang`` (never answers), ``pid`` (the server's process
id, to see a restart), ``touch`` (creates a file: a call that ran leaves a trace).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.types import Receive, Scope, Send

server = MCPServer("turngate-test")


@server.tool(description="Echo the text back")
def echo(text: str) -> str:
    return text


@server.tool(description="Add two numbers")
def add(a: int, b: int) -> dict[str, int]:
    return {"sum": a + b}


@server.tool(description="Always fails")
def fail(reason: str) -> str:
    raise ValueError(f"refused: {reason}")


@server.tool(description="Exit the server process in the middle of the call")
def crash() -> str:
    sys.stdout.flush()
    os._exit(3)


@server.tool(description="Never answer")
async def hang() -> str:
    await anyio.sleep_forever()
    return "unreachable"


@server.tool(description="A plain-text answer (no structured content)", structured_output=False)
def note(text: str) -> str:
    return f"noted: {text}"


@server.tool(description="A variable of the server's environment", structured_output=False)
def environ(name: str) -> str:
    return os.environ.get(name, "(unset)")


@server.tool(name="look.up", description="A tool whose name has a dot")
def look_up(q: str) -> str:
    return f"found {q}"


@server.tool(description="Create the file at path (a call that ran leaves it)")
def touch(path: str) -> str:
    with open(path, "a", encoding="utf-8") as f:
        f.write("touched\n")
    return f"touched {path}"


@server.tool(description="The server's process id")
def pid() -> int:
    return os.getpid()


@dataclass
class HttpServer:
    url: str
    uv: uvicorn.Server
    authorizations: list[str | None] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)

    async def stop(self) -> None:
        """Stop serving (the server goes away while the test goes on)."""
        self.uv.should_exit = True
        await self.done.wait()


@asynccontextmanager
async def http_server(port: int = 0) -> AsyncIterator[HttpServer]:
    """:data:`server` over streamable HTTP at ``<url>`` (``http://127.0.0.1:<port>/mcp``),
    on ``port`` or a free one."""
    inner = server.streamable_http_app()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(None, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    running = HttpServer(f"http://127.0.0.1:{port}/mcp", uvicorn.Server(config))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            value = headers.get(b"authorization")
            running.authorizations.append(value.decode() if value is not None else None)
        await inner(scope, receive, send)

    config.app = app

    async def serve() -> None:
        try:
            await running.uv.serve([sock])
        finally:
            running.done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        while not running.uv.started:
            await anyio.sleep(0.01)
        try:
            yield running
        finally:
            await running.stop()
    sock.close()


if __name__ == "__main__":
    anyio.run(server.run_stdio_async)
