"""``/healthz`` and ``/readyz``: liveness always, readiness tracks the database,
its schema, Redis (when configured) and draining."""

from __future__ import annotations

import asyncio
import logging

import anyio
import httpx
import pytest

from persistence.migrate import _head
from tests.fixtures_db import RoundTripProxy
from tests.fixtures_server import run_gateway

pytestmark = pytest.mark.anyio


class OutageProxy(RoundTripProxy):
    """The suite's PostgreSQL proxy, which can come back on the same port after ``close``."""

    async def reopen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)


async def _ready(client: httpx.AsyncClient) -> httpx.Response:
    return await client.get("/readyz")


async def test_readyz_when_database_is_down_and_back(_pg_session_database: str,
                                                     pg_url: str) -> None:
    proxy = OutageProxy()
    await proxy.start()
    try:
        async with run_gateway(proxy.url(_pg_session_database)) as gw, httpx.AsyncClient(
            base_url=gw.url, timeout=30
        ) as client:
            r = await _ready(client)
            assert r.status_code == 200, r.text
            assert r.json()["checks"] == {"server": "ok", "database": "ok", "schema": "ok"}

            await proxy.close()  # the database goes away, open connections are cut
            for _ in range(2):  # the first probe meets the dead pooled connections
                r = await _ready(client)
                assert r.status_code == 503, r.text
                assert r.json()["checks"]["database"] == "unreachable"
            assert (await client.get("/healthz")).status_code == 200

            await proxy.reopen()
            for _ in range(150):
                r = await _ready(client)
                if r.status_code == 200:
                    break
                await anyio.sleep(0.1)
            assert r.json()["status"] == "ready"
            # And the gateway works again: a turn runs to the end.
            async with gw.client() as api:
                thread_id = await gw.new_thread(api)
                turn = await api.post(f"/v1/threads/{thread_id}/turns",
                                      json={"turn_id": "t1", "text": "back again"})
                assert turn.status_code == 200
                assert '"type":"finish"' in turn.text.replace(" ", "")
    finally:
        await proxy.close()


async def test_readyz_schema_not_current(database_url: str) -> None:
    async with run_gateway(database_url) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        assert (await _ready(client)).status_code == 200
        # No revision recorded: older than this code needs.
        await gw.store._db.execute("DELETE FROM alembic_version")
        try:
            r = await _ready(client)
            assert r.status_code == 503
            assert r.json()["checks"]["schema"] == "empty"
            assert r.json()["checks"]["database"] == "ok"
            # A revision this code does not know: a newer release migrated (rolling
            # deploy); this replica keeps serving.
            await gw.store._db.execute(
                "INSERT INTO alembic_version (version_num) VALUES ('9999_from_the_future')"
            )
            r = await _ready(client)
            assert r.status_code == 200
            assert r.json()["checks"]["schema"] == "newer"
        finally:
            await gw.store._db.execute("DELETE FROM alembic_version")
            await gw.store._db.execute(
                "INSERT INTO alembic_version (version_num) VALUES (:v)", {"v": _head()}
            )
        assert (await _ready(client)).status_code == 200


async def test_readyz_checks_redis_only_when_configured(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_gateway(pg_url, REDIS_URL="redis://127.0.0.1:6379/0") as gw, \
            httpx.AsyncClient(base_url=gw.url) as client:
        r = await _ready(client)
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["redis"] == "ok"
    # Redis must answer at start-up; lose it afterwards, through a proxy we close.
    proxy = RoundTripProxy("127.0.0.1", 6379)
    await proxy.start()
    try:
        async with run_gateway(pg_url, REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0") as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            assert (await _ready(client)).status_code == 200
            await proxy.close()
            with anyio.fail_after(10):
                while (r := await _ready(client)).status_code != 503:
                    await anyio.sleep(0.1)
            assert r.json()["checks"] == {
                "server": "ok", "database": "ok", "schema": "ok", "redis": "unreachable"
            }
            assert any(rec.name == "turngate.readyz" and rec.levelno == logging.WARNING
                       and rec.getMessage().startswith("readyz_redis_unreachable")
                       for rec in caplog.records), "the failed probe is logged"
            assert (await client.get("/healthz")).status_code == 200
    finally:
        await proxy.close()


async def test_readyz_503_while_draining(database_url: str) -> None:
    async with run_gateway(database_url) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        assert (await _ready(client)).status_code == 200
        gw.ctx.runner.draining = True
        r = await _ready(client)
        assert r.status_code == 503 and r.json()["checks"]["server"] == "draining"
        async with gw.client() as api:
            thread_id = await gw.new_thread(api)
            turn = await api.post(f"/v1/threads/{thread_id}/turns",
                                  json={"turn_id": "t1", "text": "hi"})
            assert turn.status_code == 503
            assert turn.json()["error"]["code"] == "shutting_down"
        gw.ctx.runner.draining = False


async def test_serve_refuses_an_older_schema_and_accepts_a_newer_one(pg_url: str) -> None:
    from gateway.app import prepare_database
    from gateway.ops.settings import Settings
    from persistence import Store
    from turngate.exceptions import SchemaOutdated

    settings = Settings.from_env({"DATABASE_URL": pg_url})
    async with Store(pg_url) as store:
        await store._db.execute("DELETE FROM alembic_version")
        try:
            with pytest.raises(SchemaOutdated, match="turngate migrate"):
                await prepare_database(settings)
            await store._db.execute(
                "INSERT INTO alembic_version (version_num) VALUES ('9999_from_the_future')"
            )
            await prepare_database(settings)  # a rolling deploy: no error
        finally:
            await store._db.execute("DELETE FROM alembic_version")
            await store._db.execute(
                "INSERT INTO alembic_version (version_num) VALUES (:v)", {"v": _head()}
            )


async def test_readyz_uses_the_apps_own_pool(_pg_session_database: str, pg_url: str) -> None:
    """No connection (or engine) per probe: a balancer probing every second must not
    cost the database a connection setup each time."""
    from tests.fault_proxy import FaultProxy

    proxy = FaultProxy()
    await proxy.start()
    try:
        async with run_gateway(proxy.url(_pg_session_database)) as gw, httpx.AsyncClient(
            base_url=gw.url, timeout=30
        ) as client:
            assert (await _ready(client)).status_code == 200
            opened = proxy.connections
            for _ in range(20):
                r = await _ready(client)
                assert r.status_code == 200, r.text
                assert r.json()["checks"] == {"server": "ok", "database": "ok", "schema": "ok"}
            assert proxy.connections == opened
            # The app's pool, the fixture's own store, start-up's schema check.
            assert opened <= 2 * gw.ctx.store.pool_size + 1
    finally:
        await proxy.close()


async def test_a_statement_refused_for_its_data_leaves_the_replica_ready(
    database_url: str,
) -> None:
    """Only database trouble counts against readiness: a constraint error is the
    request's fault, and counting it would let any client take a replica out."""
    from turngate.exceptions import DatabaseUnavailable

    async with run_gateway(database_url) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        assert (await _ready(client)).status_code == 200
        with pytest.raises(DatabaseUnavailable):  # users.name is unique: alice exists
            await gw.ctx.store._run(lambda c: c.execute(
                "INSERT INTO users (name, created_at) VALUES ('alice', CURRENT_TIMESTAMP)"))
        r = await _ready(client)
        assert r.status_code == 200, r.text
        assert gw.ctx.store.health.recent(60).count == 0


class CountingProxy(RoundTripProxy):
    """The suite's proxy, counting the connections it accepted."""

    accepted = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await super()._handle(reader, writer)


async def test_readyz_pings_redis_on_the_apps_own_client(pg_url: str) -> None:
    proxy = CountingProxy("127.0.0.1", 6379)
    await proxy.start()
    try:
        async with run_gateway(pg_url, REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0") as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            assert (await _ready(client)).json()["checks"]["redis"] == "ok"
            before = proxy.accepted
            for _ in range(5):
                assert (await _ready(client)).json()["checks"]["redis"] == "ok"
            # A probe opens no client of its own: the relay's pool serves it (one more
            # pooled connection at most, if a probe meets the health check's ping).
            assert proxy.accepted - before <= 1
    finally:
        await proxy.close()
