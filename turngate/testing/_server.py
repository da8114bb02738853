"""A live gateway: the real app on uvicorn on a free loopback port, in the caller's loop."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import uvicorn
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.context import AppContext
from gateway.ops.settings import Settings
from llm_adapters.registry import AdapterFactory
from persistence import Store, migrate

#: How long ``live_server`` waits for uvicorn to start listening, in seconds.
START_TIMEOUT = 20.0
#: How long ``live_server`` waits for the server to shut down on exit, in seconds.
STOP_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LiveServer:
    """A running gateway, a user made for it, and a client that is that user.

    ``client`` is an open ``httpx.AsyncClient`` with ``base_url`` set to
    :attr:`url` and the user's key in its ``authorization`` header; it is closed
    when the server stops. ``app``, ``server`` and ``store`` are the live
    objects, for tests that look inside (``store`` is a separate connection to
    the same database).
    """

    url: str
    key: str
    client: httpx.AsyncClient
    user_id: int
    database_url: str
    app: Starlette
    server: uvicorn.Server
    store: Store

    @property
    def ctx(self) -> AppContext:
        """The app's services (settings, store, adapter registry, relay, metrics)."""
        ctx: AppContext = self.app.state.ctx
        return ctx

    def auth(self, key: str | None = None) -> dict[str, str]:
        """The ``authorization`` header for ``key`` (this server's user by default)."""
        return {"authorization": f"Bearer {key or self.key}"}

    def new_client(self, key: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        """Another client on this server (its own connections), as ``key``'s user.

        The caller closes it (``async with server.new_client() as client: ...``).
        """
        kwargs.setdefault("timeout", httpx.Timeout(30.0))
        headers = {**self.auth(key), **kwargs.pop("headers", {})}
        return httpx.AsyncClient(base_url=self.url, headers=headers, **kwargs)

    async def new_user(self, name: str) -> tuple[int, str]:
        """Create a user ``name`` and a key for it: ``(user_id, key)``."""
        user_id = await self.store.create_user(name)
        return user_id, await self.store.create_api_key(user_id)

    async def new_thread(
        self, client: httpx.AsyncClient | None = None, thread_id: str | None = None
    ) -> str:
        """Create a thread (as ``client``'s user, this server's user by default); its id."""
        body = {} if thread_id is None else {"id": thread_id}
        response = await (client or self.client).post("/v1/threads", json=body)
        if response.status_code not in (200, 201):
            raise AssertionError(
                f"POST /v1/threads answered {response.status_code} {response.text!r}; "
                "expected 201 (or 200 for a thread the user already has)"
            )
        return str(response.json()["id"])


class _Server(uvicorn.Server):
    """uvicorn's server, telling when its start-up is over (started or failed)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.startup_over = anyio.Event()
        self.stopped = anyio.Event()
        self.failure: str | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit as exc:  # uvicorn exits the process on a failed lifespan
            self.failure = f"uvicorn start-up exited with {exc.code}"
            self.should_exit = True
        finally:
            self.startup_over.set()

    async def serve_until_exit(self) -> None:
        try:
            await self.serve()
        finally:
            self.startup_over.set()
            self.stopped.set()


@asynccontextmanager
async def live_server(
    database_url: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    adapters: Mapping[str, AdapterFactory] | None = None,
    user: str = "alice",
    migrate_database: bool = False,
) -> AsyncIterator[LiveServer]:
    """Run the gateway on a free port of 127.0.0.1 in this event loop; stop it on exit.

    - ``database_url``: a database to use; by default a fresh SQLite file in a
      temporary directory, removed afterwards. SQLite migrates itself; a
      PostgreSQL database must be migrated already, or pass ``migrate_database=True``.
    - ``env``: settings, as the environment variables of the README
      (``{"TURNGATE_ON_DISCONNECT": "continue"}``). The process environment is
      not read: pass ``env=os.environ`` for that (``DATABASE_URL`` in it is
      ignored in favour of ``database_url``).
    - ``adapters``: adapter factories to register by name (as the entry point
      group ``turngate.adapters`` would), called with the settings' environment.
    - ``user``: the name of the user made for the server, whose key it yields.

    The server runs in the caller's event loop on the asyncio backend (the
    database layer is asyncio-only), so a test can look at the app's state
    directly. On exit the server shuts down as on SIGTERM: running turns are
    finalized and the lifespan closes the adapters. An exception raised in the
    block comes out as it is (not wrapped in an exception group); a server that
    cannot start raises ``RuntimeError`` saying so.
    """
    async with AsyncExitStack() as stack:
        if database_url is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="turngate-"))
            database_url = f"sqlite:///{os.path.join(directory, 'turngate.db')}"
        environ = {**(env or {}), "DATABASE_URL": database_url}
        settings = Settings.from_env(environ)
        if migrate_database:
            await migrate(database_url)
        app = create_app(settings)
        for name, factory in (adapters or {}).items():
            app.state.ctx.adapters.register(name, factory)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_config=None, lifespan="on", http="httptools",
            timeout_graceful_shutdown=5,
        )
        server = _Server(config)
        failure: str | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve_until_exit)
                try:
                    with anyio.fail_after(START_TIMEOUT):
                        await server.startup_over.wait()
                    if not server.started:
                        failure = (
                            f"the gateway on {database_url} stopped during start-up "
                            f"({server.failure or 'see its log'}); expected it to listen on "
                            "127.0.0.1"
                        )
                    else:
                        async with _session(app, server, database_url, user) as live:
                            yield live
                finally:
                    # Also when the block raised: the server shuts down, it is not torn down.
                    server.should_exit = True
                    with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_TIMEOUT):
                        await server.stopped.wait()
                    if not server.stopped.is_set():
                        tg.cancel_scope.cancel()  # past the deadline: tear it down
        except BaseExceptionGroup as group:
            # One failure (the caller's own, most often): raise it as it is.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        if failure is not None:
            raise RuntimeError(failure)


@asynccontextmanager
async def _session(
    app: Starlette, server: _Server, database_url: str, user: str
) -> AsyncIterator[LiveServer]:
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with Store(database_url) as store:
        user_id = await store.create_user(user)
        key = await store.create_api_key(user_id)
        async with httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(30.0),
        ) as client:
            yield LiveServer(url, key, client, user_id, database_url, app, server, store)
