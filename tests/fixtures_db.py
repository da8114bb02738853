"""Database fixtures shared by the whole suite.

- ``database_url``: parametrized ``["sqlite", "postgresql"]``; the URL of a
  migrated, empty database. SQLite: a copy of a once-migrated file in tmp_path.
  PostgreSQL: one database per test session (``turngate_test_<pid>``), migrated
  once, truncated before each test, dropped at the end. PostgreSQL being
  unreachable is an error, never a skip.
- ``pg_url``: the same PostgreSQL database, for tests that only make sense there.
- ``store``: a connected ``Store`` on ``database_url``.
- ``user_id``, ``make_thread``: a user, and a factory for threads owned by it.
- ``round_trip_proxy`` / ``RoundTripProxy``: a counting TCP proxy in front of
  PostgreSQL; ``counting_store`` is a ``(Store, proxy)`` pair on it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from persistence import Store, migrate

PG_HOST = os.environ.get("TURNGATE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TURNGATE_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TURNGATE_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("TURNGATE_TEST_PG_ADMIN_DB", "test")
_TABLES = "users, api_keys, threads, messages, token_usage"

T = TypeVar("T")


def run_sync(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion in a private thread and loop.

    Sync fixtures use this so that they never touch the event loop of the
    test that is (or will be) running on anyio's runner.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro_fn())
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name="fixtures-db")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def pg_url_for(database: str, *, host: str = PG_HOST, port: int = PG_PORT) -> str:
    return f"postgresql://{PG_USER}@{host}:{port}/{database}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB, timeout=10
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def _pg_session_database() -> Iterator[str]:
    name = f"turngate_test_{os.getpid()}"

    async def create() -> None:
        await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await _admin(f"CREATE DATABASE {name}")
        await migrate(pg_url_for(name))

    run_sync(create)  # an unreachable PostgreSQL fails here, loudly
    yield name
    run_sync(lambda: _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def pg_url(_pg_session_database: str) -> str:
    """The session's PostgreSQL database, emptied for this test."""
    url = pg_url_for(_pg_session_database)

    async def truncate() -> None:
        conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"), timeout=10)
        try:
            await conn.execute(f"TRUNCATE {_TABLES} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()

    run_sync(truncate)
    return url


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    run_sync(lambda: migrate(f"sqlite:///{path}"))
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a migrated, empty database of each kind."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        path = tmp_path / "turngate.db"
        shutil.copyfile(template, path)  # WAL mode is in the file header
        return f"sqlite:///{path}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    async with Store(database_url) as connected:
        yield connected


@pytest.fixture
async def user_id(store: Store) -> int:
    return await store.create_user("alice")


MakeThread = Callable[..., Awaitable[str]]


@pytest.fixture
def make_thread(store: Store, user_id: int) -> MakeThread:
    """``await make_thread(owner_id=None, thread_id=None, title=None)`` → thread id."""

    async def make(
        owner_id: int | None = None, thread_id: str | None = None, title: str | None = None
    ) -> str:
        row, _ = await store.create_thread(
            owner_id if owner_id is not None else user_id, thread_id, title
        )
        return row.id

    return make


class RoundTripProxy:
    """A TCP proxy that counts request/response exchanges with PostgreSQL.

    A round trip is counted whenever the client writes after the server last
    wrote (or for its first write): pipelined messages in one flight count once.
    """

    def __init__(self, target_host: str = PG_HOST, target_port: int = PG_PORT) -> None:
        self.target = (target_host, target_port)
        self.round_trips = 0
        self._client_turn = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        # A restarted proxy listens on the same port again (an outage that ends).
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, database: str) -> str:
        return pg_url_for(database, host="127.0.0.1", port=self.port)

    def reset(self) -> None:
        self.round_trips = 0
        self._client_turn = False

    async def close(self) -> None:
        """Stop listening and cut every open connection (simulates an outage)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pump(reader, up_writer, from_client=True),
            self._pump(up_reader, writer, from_client=False),
            return_exceptions=True,
        )
        self._writers.difference_update((writer, up_writer))

    async def _before_forward(self) -> None:
        """Called with each chunk read, before it is passed on (a fault proxy stalls here)."""

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_client: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                await self._before_forward()
                if from_client:
                    if not self._client_turn:
                        self.round_trips += 1
                        self._client_turn = True
                else:
                    self._client_turn = False
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()


@pytest.fixture
async def round_trip_proxy() -> AsyncIterator[RoundTripProxy]:
    proxy = RoundTripProxy()
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def counting_store(
    pg_url: str, _pg_session_database: str, round_trip_proxy: RoundTripProxy
) -> AsyncIterator[tuple[Store, RoundTripProxy]]:
    """A connected PostgreSQL ``Store`` whose traffic goes through the counting proxy."""
    async with Store(round_trip_proxy.url(_pg_session_database)) as counted:
        yield counted, round_trip_proxy
