"""A real uvicorn server on 127.0.0.1, in the test's own event loop (``turngate.testing``).

Streaming and disconnects are tested over real HTTP (httpx.ASGITransport
buffers whole bodies). The server runs in the test's loop, so tests can look
at the app's state (relay, metrics, scripted traces) directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from gateway.context import AppContext
from persistence import Store
from turngate.testing import LiveServer, free_port, live_server


class GatewayServer:
    """A running gateway and a user with a key: ``turngate.testing.LiveServer``, with
    ``client()`` making a new client (the names the test files use)."""

    def __init__(self, live: LiveServer) -> None:
        self.live = live
        self.url = live.url
        self.app: Starlette = live.app
        self.server: uvicorn.Server = live.server
        self.store: Store = live.store
        self.user_id = live.user_id
        self.key = live.key

    @property
    def ctx(self) -> AppContext:
        return self.live.ctx

    def auth(self, key: str | None = None) -> dict[str, str]:
        return self.live.auth(key)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return self.live.new_client(**kwargs)

    async def new_user(self, name: str) -> tuple[int, str]:
        return await self.live.new_user(name)

    async def new_thread(self, client: httpx.AsyncClient, thread_id: str | None = None) -> str:
        return await self.live.new_thread(client, thread_id)


@asynccontextmanager
async def run_gateway(database_url: str, **env: str) -> AsyncIterator[GatewayServer]:
    """Start a gateway on a free port with settings from ``env``; stop it on exit.

    Its shutdown waits at most 2 s for turns still generating (the product's default
    is 10 s): a test that leaves turns running would otherwise wait that out at its
    end. Tests of the shutdown grace set ``TURNGATE_SHUTDOWN_GRACE_SECONDS`` themselves.
    """
    env.setdefault("TURNGATE_SHUTDOWN_GRACE_SECONDS", "2")
    async with live_server(database_url, env=env) as live:
        yield GatewayServer(live)


@pytest.fixture
async def gateway(database_url: str) -> AsyncIterator[GatewayServer]:
    """A running gateway on the parametrized database (SQLite and PostgreSQL)."""
    async with run_gateway(database_url) as gw:
        yield gw


__all__ = ["GatewayServer", "ServerProcess", "free_port", "gateway", "run_gateway"]


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
