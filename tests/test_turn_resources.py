"""Resources per turn: nothing leaks over many turns; database round trips; outages."""

from __future__ import annotations

import asyncio
import os
import uuid

import anyio
import asyncpg
import httpx
import pytest

from tests.fixtures_db import PG_HOST, PG_PORT, PG_USER, RoundTripProxy
from tests.fixtures_server import run_gateway
from tests.sse_client import stream_request, validate_ui_stream
from tests.tracing import trace_turns
from tests.waiting import gateway_idle

pytestmark = pytest.mark.anyio


async def _pg_backends(database: str) -> int:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="test")
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database))
    finally:
        await conn.close()


async def _idle_in_transaction(database: str) -> int:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="test")
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
            "AND state LIKE 'idle in transaction%'", database))
    finally:
        await conn.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_thousand_turns_leak_nothing(database_url: str) -> None:
    database = database_url.rsplit("/", 1)[-1]
    is_pg = database_url.startswith("postgres")
    async with run_gateway(database_url, TURNGATE_RATE_LIMIT_PER_MINUTE="100000") as gateway, \
            gateway.client() as client:
        thread = await gateway.new_thread(client)

        async def turn(i: int) -> None:
            s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                     json={"turn_id": f"t{i}", "text": "hi",
                                           "model": "scripted:tokens=3"})
            assert s.status == 200 and s.text == "w1 w2 w3 "

        for i in range(20):  # warm-up: pools, prepared statements, caches
            await turn(i)
        await gateway_idle(gateway)
        tasks_before = len(asyncio.all_tasks())
        fds_before = _open_fds()
        pg_before = await _pg_backends(database) if is_pg else 0
        for i in range(20, 1020):
            await turn(i)
        await gateway_idle(gateway)
        gateway.ctx.relay.retention_seconds = 0
        gateway.ctx.relay.sweep()
        assert len(asyncio.all_tasks()) <= tasks_before
        assert not gateway.ctx.relay.running()
        assert len(gateway.ctx.relay) == 0
        assert _open_fds() <= fds_before + 5
        if is_pg:
            assert await _pg_backends(database) <= max(pg_before, 10)
            assert await _idle_in_transaction(database) == 0
        usage = (await client.get("/v1/usage", params={"thread_id": thread,
                                                        "limit": 200})).json()["usage"]
        assert len(usage) == 200


async def test_round_trips_of_a_short_turn_on_postgresql(
    pg_url: str, _pg_session_database: str
) -> None:
    proxy = RoundTripProxy()
    await proxy.start()
    try:
        async with run_gateway(proxy.url(_pg_session_database)) as gw:
            async with gw.client() as client:
                thread = await gw.new_thread(client)
                for i in range(3):  # warm the pool and the statement caches
                    await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                         json={"turn_id": f"w{i}", "text": "hi",
                                               "model": "scripted:tokens=3"})
                await gateway_idle(gw)  # nothing of the warm-up turns is counted
                proxy.reset()
                s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                         json={"turn_id": "counted", "text": "hi",
                                               "model": "scripted:tokens=3"})
                validate_ui_stream(s)
                trips = proxy.round_trips
        # authenticate + open turn + history + finalize
        assert trips <= 4, f"{trips} round trips for one short turn"
    finally:
        await proxy.close()


async def test_database_down_before_first_byte_is_503(
    pg_url: str, _pg_session_database: str
) -> None:
    proxy = RoundTripProxy()
    await proxy.start()
    try:
        async with run_gateway(proxy.url(_pg_session_database)) as gw:
            traces = trace_turns(gw)
            async with gw.client() as client:
                thread = await gw.new_thread(client)
                started = gw.ctx.metrics.registry.get_sample_value(
                    "turngate_generations_started_total")
                await proxy.close()
                trace = uuid.uuid4().hex
                r = await client.post(f"/v1/threads/{thread}/turns",
                                      json={"turn_id": "t1", "text": "hi",
                                            "model": f"scripted:tokens=3,trace={trace}"})
                assert r.status_code == 503
                assert r.json()["error"]["code"] == "database_unavailable"
                assert "Traceback" not in r.text
                assert trace not in traces, "the adapter was called"
                assert gw.ctx.metrics.registry.get_sample_value(
                    "turngate_generations_started_total") == started
                await proxy.start()
                with anyio.fail_after(10):
                    while True:
                        s = await stream_request(
                            client, "POST", f"/v1/threads/{thread}/turns",
                            json={"turn_id": "t1", "text": "hi", "model": "scripted:tokens=3"})
                        if s.status == 200:
                            break
                        await anyio.sleep(0.2)
                validate_ui_stream(s)
                msgs = (await client.get(f"/v1/threads/{thread}/messages")).json()["messages"]
                assert len(msgs) == 2
    finally:
        await proxy.close()


async def test_turngate_serve_works_on_the_embedded_default(tmp_path: object) -> None:
    """`turngate serve` with no configuration: SQLite, scripted, a first-start key."""
    import subprocess
    import sys

    from tests.fixtures_server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TURNGATE_", "DATABASE_URL", "REDIS_URL"))}
    binary = os.path.join(os.path.dirname(sys.executable), "turngate")
    proc = subprocess.Popen([binary, "serve", "--port", str(port)], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        with anyio.fail_after(20):
            while "#key=" not in line:
                line = await anyio.to_thread.run_sync(proc.stdout.readline)  # type: ignore[union-attr]
                assert line or proc.poll() is None, "serve exited"
        url = line.strip()
        assert url.startswith(f"http://127.0.0.1:{port}/#key=tg_")
        key = url.split("#key=")[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     headers={"authorization": f"Bearer {key}"}) as client:
            with anyio.fail_after(20):
                while True:
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.1)
            thread = (await client.post("/v1/threads", json={})).json()["id"]
            s = await stream_request(client, "POST", f"/v1/threads/{thread}/turns",
                                     json={"turn_id": "a", "text": "echo these words"})
            validate_ui_stream(s)
            assert s.text == "echo these words "
        assert (tmp_path / "turngate.db").exists()  # type: ignore[operator]
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
