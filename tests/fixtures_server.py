"""A real uvicorn server on 127.0.0.1, in the test's own event loop.

Streaming and disconnects are tested over real HTTP (httpx.ASGITransport
buffers whole bodies). The server runs in the test's loop, so tests can look
at the app's state (relay, metrics, scripted traces) directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.context import AppContext
from gateway.settings import Settings
from persistence import Store


@dataclass
class GatewayServer:
    """A running gateway and a user with a key."""

    url: str
    app: Starlette
    server: uvicorn.Server
    store: Store
    user_id: int
    key: str

    @property
    def ctx(self) -> AppContext:
        ctx: AppContext = self.app.state.ctx
        return ctx

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {key or self.key}"}

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", httpx.Timeout(30.0))
        return httpx.AsyncClient(base_url=self.url, headers=self.auth(), **kwargs)

    async def new_user(self, name: str) -> tuple[int, str]:
        user_id = await self.store.create_user(name)
        return user_id, await self.store.create_api_key(user_id)

    async def new_thread(self, client: httpx.AsyncClient, thread_id: str | None = None) -> str:
        body = {} if thread_id is None else {"id": thread_id}
        r = await client.post("/v1/threads", json=body)
        assert r.status_code in (200, 201), r.text
        return str(r.json()["id"])


@asynccontextmanager
async def run_gateway(database_url: str, **env: str) -> AsyncIterator[GatewayServer]:
    """Start a gateway on a free port with settings from ``env``; stop it on exit."""
    environ = {"DATABASE_URL": database_url, **env}
    settings = Settings.from_env(environ)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, lifespan="on", http="httptools",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    async with Store(database_url) as store:
        user_id = await store.create_user("alice")
        key = await store.create_api_key(user_id)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            with anyio.fail_after(10):
                while not server.started:
                    await anyio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            try:
                yield GatewayServer(f"http://127.0.0.1:{port}", app, server, store, user_id, key)
            finally:
                server.should_exit = True


@pytest.fixture
async def gateway(database_url: str) -> AsyncIterator[GatewayServer]:
    """A running gateway on the parametrized database (SQLite and PostgreSQL)."""
    async with run_gateway(database_url) as gw:
        yield gw


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """``turngate serve`` in its own process, for crash and signal tests."""

    def __init__(self, database_url: str, port: int | None = None, **env: str) -> None:
        import os
        import sys

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATABASE_URL": database_url, **env}
        self.bin = os.path.join(os.path.dirname(sys.executable), "turngate")
        self.proc: Any = None

    async def cli(self, *args: str) -> str:
        """Run a ``turngate`` subcommand against the same database; its stdout."""
        result = await anyio.run_process([self.bin, *args], env=self.env)
        return result.stdout.decode().strip()

    async def start(self) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [self.bin, "serve", "--port", str(self.port)], env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        async with httpx.AsyncClient() as client:
            with anyio.fail_after(20):
                while True:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"turngate serve exited with {self.proc.returncode}")
                    try:
                        if (await client.get(f"{self.url}/healthz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.1)

    def kill(self, sig: int = 9) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        with anyio.move_on_after(timeout):
            while self.proc.poll() is None:
                await anyio.sleep(0.05)
        code: int | None = self.proc.poll()
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            await self.wait(10)
