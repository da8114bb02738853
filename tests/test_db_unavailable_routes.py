"""Every route while the database cannot answer: ``503`` with ``Retry-After`` and the
JSON error body, never a 500, nothing written, no traceback; and back to normal after.

Real faults only: PostgreSQL behind a proxy the test cuts or stalls, a table lock
taken in the test's own database that holds the gateway's whole pool, and on
SQLite a write lock held by another connection (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from gateway.api.ops import FAILURE_WINDOW, PROBE_TIMEOUT
from persistence import Store
from tests.fault_proxy import FaultProxy
from tests.fixtures_server import GatewayServer, run_gateway
from tests.test_bad_input import assert_json_error, snapshot

pytestmark = pytest.mark.anyio

# Short statement, connect and pool-wait timeouts keep each refused request short; a
# small pool spares the shared server's connection slots (other suites run beside).
FAST = {"TURNGATE_FINALIZE_TIMEOUT": "1", "TURNGATE_DB_POOL_SIZE": "4"}


def assert_unavailable(response: httpx.Response, where: str) -> None:
    """503, a Retry-After in seconds, and exactly the error body (JSON; a sentence on the
    AI SDK routes); no driver text."""
    retry = response.headers.get("retry-after", "")
    assert retry.isdigit() and int(retry) >= 1, f"{where}: Retry-After {retry!r}"
    assert_json_error(response, 503, "database_unavailable", where)


def route_failures(records: list[logging.LogRecord]) -> list[str]:
    """Log records of request handling that report a server error or carry a traceback.

    The turn runner's own maintenance logs (``turngate.turns``) are another item's.
    """
    return [
        f"{r.name} {r.levelname} {r.getMessage()[:200]}"
        for r in records
        if (r.name.startswith("uvicorn") or r.name in ("turngate.gateway", "turngate.persistence"))
        and (r.exc_info is not None or r.levelno >= logging.ERROR)
    ]


async def hit_every_route(
    gw: GatewayServer, thread_id: str, done_turn: str, fresh_key: str, *,
    concurrently: bool = False,
) -> dict[str, httpx.Response]:
    """One request to each API route (and the turn route with a key not seen yet),
    one after the other or all at once."""
    t = thread_id
    calls: list[tuple[str, str, str, dict[str, Any]]] = [
        ("list threads", "GET", "/v1/threads", {}),
        ("create thread", "POST", "/v1/threads", {"json": {"title": "during"}}),
        ("list messages", "GET", f"/v1/threads/{t}/messages", {}),
        ("append", "POST", f"/v1/threads/{t}/messages",
         {"json": {"role": "user", "content": "hi", "turn_id": "legacy-during"}}),
        ("start turn (cached key)", "POST", f"/v1/threads/{t}/turns",
         {"json": {"turn_id": "during", "text": "hello"}}),
        ("start turn (new key)", "POST", f"/v1/threads/{t}/turns",
         {"json": {"turn_id": "during-2", "text": "hello"}, "headers": gw.auth(fresh_key)}),
        ("resume", "GET", f"/v1/threads/{t}/turns/{done_turn}/stream", {}),
        ("cancel", "POST", f"/v1/threads/{t}/turns/{done_turn}/cancel", {}),
        ("usage", "GET", "/v1/usage", {}),
        ("ai sdk chat", "POST", "/api/chat",
         {"json": {"id": t, "messages": [
             {"id": "chat-during", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}}),
        ("ai sdk resume", "GET", f"/api/chat/{t}/stream", {}),
    ]
    answers: dict[str, httpx.Response] = {}
    async with gw.client(timeout=httpx.Timeout(60.0)) as client:

        async def call(name: str, method: str, path: str, kwargs: dict[str, Any]) -> None:
            answers[name] = await client.request(method, path, **kwargs)

        if not concurrently:
            for args in calls:
                await call(*args)
        else:
            async with anyio.create_task_group() as tg:
                for args in calls:
                    tg.start_soon(call, *args)
    return answers


async def prepare(gw: GatewayServer) -> tuple[str, str, str]:
    """A thread with one finished turn, and a second user's key never used yet."""
    _, fresh_key = await gw.new_user("bob")
    async with gw.client() as client:
        thread_id = await gw.new_thread(client)
        r = await client.post(f"/v1/threads/{thread_id}/turns",
                              json={"turn_id": "done", "text": "one two"})
        assert r.status_code == 200 and "[DONE]" in r.text, r.text
    return thread_id, "done", fresh_key


async def wait_ready(client: httpx.AsyncClient, within: float) -> httpx.Response:
    with anyio.fail_after(within):
        while (r := await client.get("/readyz")).status_code != 200:
            await anyio.sleep(0.1)
    return r


async def test_every_route_503_while_postgres_is_cut_then_works_again(
    _pg_session_database: str, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy = FaultProxy()
    await proxy.start()
    try:
        async with run_gateway(proxy.url(_pg_session_database), **FAST) as gw, \
                Store(pg_url, pool_size=1) as direct, \
                httpx.AsyncClient(base_url=gw.url, timeout=30) as ops:
            thread_id, done, fresh_key = await prepare(gw)
            before = await snapshot(direct)

            await proxy.cut()
            answers = await hit_every_route(gw, thread_id, done, fresh_key)
            for name, response in answers.items():
                assert_unavailable(response, name)
            ready = await ops.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["checks"]["database"] == "unreachable", ready.text
            assert (await ops.get("/healthz")).status_code == 200
            assert await snapshot(direct) == before
            assert route_failures(caplog.records) == []

            await proxy.restore()
            await wait_ready(ops, within=FAILURE_WINDOW + 10)
            async with gw.client() as client:
                r = await client.post(f"/v1/threads/{thread_id}/turns",
                                      json={"turn_id": "after", "text": "back again"})
                assert r.status_code == 200 and "[DONE]" in r.text, r.text
                assert (await client.get(f"/v1/threads/{thread_id}/messages")).status_code == 200
    finally:
        await proxy.close()


async def test_every_route_503_while_postgres_stalls_and_readyz_answers_in_time(
    _pg_session_database: str, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy = FaultProxy()
    await proxy.start()
    # No SSL negotiation: a connect that times out during it leaves asyncpg's
    # TLS-upgrade future failing later, unretrieved, which the test runner reports
    # as an error of the test (the local server speaks no SSL anyway).
    url = proxy.url(_pg_session_database) + "?ssl=disable"
    try:
        async with run_gateway(url, **FAST) as gw, \
                Store(pg_url, pool_size=1) as direct, \
                httpx.AsyncClient(base_url=gw.url, timeout=30) as ops:
            thread_id, done, fresh_key = await prepare(gw)
            before = await snapshot(direct)

            proxy.stall()
            # The balancer's probe gets its answer within the probe's bound, not the
            # store's statement deadline.
            started = time.monotonic()
            ready = await ops.get("/readyz")
            assert time.monotonic() - started < PROBE_TIMEOUT + 1.5
            assert ready.status_code == 503, ready.text
            assert ready.json()["checks"]["database"] != "ok", ready.text
            answers = await hit_every_route(gw, thread_id, done, fresh_key, concurrently=True)
            for name, response in answers.items():
                assert_unavailable(response, name)
            assert await snapshot(direct) == before
            assert route_failures(caplog.records) == []

            proxy.flow()
            await wait_ready(ops, within=FAILURE_WINDOW + 20)
            async with gw.client() as client:
                r = await client.post(f"/v1/threads/{thread_id}/turns",
                                      json={"turn_id": "after", "text": "back again"})
                assert r.status_code == 200 and "[DONE]" in r.text, r.text
    finally:
        proxy.flow()
        await proxy.close()


async def _lock_tables(url: str) -> asyncpg.Connection:
    """A connection of the test's own holding ACCESS EXCLUSIVE locks until it rolls back.

    Not ``api_keys``: requests authenticate, then meet the lock (or the exhausted
    pool) in the route's own statement, which answered 500 before.
    """
    conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"), timeout=10)
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE threads, messages IN ACCESS EXCLUSIVE MODE")
    return conn


async def _waiting_on_locks(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ))


async def test_exhausted_pool_and_locked_tables_answer_503_and_readyz_sees_them(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # Two pooled connections and 2 s statements: two stuck requests hold the whole
    # pool, so the next ones wait for a connection and give up (pool exhausted).
    async with run_gateway(pg_url, TURNGATE_DB_POOL_SIZE="2",
                           TURNGATE_FINALIZE_TIMEOUT="2") as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=30) as ops:
        thread_id, done, fresh_key = await prepare(gw)
        assert (await ops.get("/readyz")).status_code == 200
        before = await snapshot(gw.store)
        locker = await _lock_tables(pg_url)
        try:
            async with gw.client(timeout=httpx.Timeout(60.0)) as client, \
                    anyio.create_task_group() as tg:
                stuck: list[httpx.Response] = []

                async def read_messages() -> None:
                    stuck.append(await client.get(f"/v1/threads/{thread_id}/messages"))

                for _ in range(2):
                    tg.start_soon(read_messages)
                with anyio.fail_after(10):  # both pooled connections wait on the lock
                    while await _waiting_on_locks(locker) < 2:
                        await anyio.sleep(0.02)
                started = time.monotonic()
                ready = await ops.get("/readyz")
                assert time.monotonic() - started < PROBE_TIMEOUT + 1.5
                assert ready.status_code == 503, ready.text
                assert ready.json()["checks"]["database"] != "ok", ready.text
                answers = await hit_every_route(gw, thread_id, done, fresh_key,
                                                concurrently=True)
            for response in stuck:
                assert_unavailable(response, "stuck read")
            for name, response in answers.items():
                assert_unavailable(response, name)
            reasons = {r.getMessage() for r in caplog.records
                       if "no pooled database connection free" in r.getMessage()}
            assert reasons, "expected some requests to find the pool exhausted"
            ready = await ops.get("/readyz")
            assert ready.status_code == 503, ready.text
        finally:
            await locker.execute("ROLLBACK")
            await locker.close()
        assert await snapshot(gw.store) == before
        assert route_failures(caplog.records) == []
        ready = await wait_ready(ops, within=FAILURE_WINDOW + 10)
        assert ready.json()["checks"]["database"] == "ok"
        async with gw.client() as client:
            assert (await client.get(f"/v1/threads/{thread_id}/messages")).status_code == 200


async def test_sqlite_write_lock_held_elsewhere_writes_503_reads_work(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from persistence import migrate

    caplog.set_level(logging.INFO)
    path = tmp_path / "locked.db"
    url = f"sqlite:///{path}"
    await migrate(url)
    async with run_gateway(url, **FAST) as gw, \
            httpx.AsyncClient(base_url=gw.url, timeout=30) as ops:
        thread_id, done, _ = await prepare(gw)
        before = await snapshot(gw.store)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
            async with gw.client() as client:
                writes = {
                    "create thread": await client.post("/v1/threads", json={"title": "x"}),
                    "append": await client.post(
                        f"/v1/threads/{thread_id}/messages",
                        json={"role": "user", "content": "hi", "turn_id": "legacy"}),
                    "start turn": await client.post(
                        f"/v1/threads/{thread_id}/turns",
                        json={"turn_id": "during", "text": "hello"}),
                }
                for name, response in writes.items():
                    assert_unavailable(response, name)
                # WAL: readers do not wait for the writer.
                assert (await client.get(f"/v1/threads/{thread_id}/messages")).status_code == 200
            ready = await ops.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["checks"]["database"] == "locked", ready.text
            assert "failed in the last" in ready.json()["detail"]["database"]
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await snapshot(gw.store) == before
        assert route_failures(caplog.records) == []
        await wait_ready(ops, within=FAILURE_WINDOW + 10)
        async with gw.client() as client:
            assert (await client.post("/v1/threads", json={"title": "x"})).status_code == 201
