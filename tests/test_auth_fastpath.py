"""A new turn with a key seen before costs one database round trip, auth intact.

The gateway remembers keys that authenticated; a new turn with such a key skips
``store.authenticate`` and ``open_turn`` re-checks the key in its own statement
(SQLite: its own transaction). Everything else still authenticates for real.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from gateway.api.auth import KeyMap
from tests.fixtures_db import RoundTripProxy
from tests.fixtures_server import GatewayServer, run_gateway
from tests.test_auth import _cli
from tests.test_bad_input import assert_json_error, client_for, snapshot
from tests.waiting import thread_released

pytestmark = pytest.mark.anyio

SLOW = "scripted:tokens=40,delay_ms=50"


def _turn(turn_id: str, model: str = "scripted:tokens=3,delay_ms=0") -> dict[str, Any]:
    return {"turn_id": turn_id, "text": "hello there", "model": model}


def _count_authenticate(gw: GatewayServer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every ``store.authenticate`` the gateway makes."""
    calls: list[str] = []
    real: Callable[[str], Awaitable[int | None]] = gw.ctx.store.authenticate

    async def counted(key: str) -> int | None:
        calls.append(key)
        return await real(key)

    monkeypatch.setattr(gw.ctx.store, "authenticate", counted)
    return calls


async def _finish(client: httpx.AsyncClient, thread: str, turn_id: str, model: str) -> None:
    r = await client.post(f"/v1/threads/{thread}/turns", json=_turn(turn_id, model))
    assert r.status_code == 200, r.text


async def test_cached_key_turn_takes_one_round_trip_on_postgres(
    _pg_session_database: str, pg_url: str, round_trip_proxy: RoundTripProxy,
) -> None:
    # No maintenance pass (checkpoints, lease renewal, the reaper) may fall inside the
    # window counted below: they run every TURNGATE_CHECKPOINT_SECONDS, so never here.
    # A turn's final write is done before its stream ends (finish goes out after it),
    # so nothing of the previous turn is in flight either.
    quiet = {"TURNGATE_CHECKPOINT_SECONDS": "3600", "TURNGATE_LEASE_SECONDS": "7200"}
    async with run_gateway(round_trip_proxy.url(_pg_session_database), **quiet) as gw, \
            gw.client() as client:
        thread = await gw.new_thread(client)  # authenticates: the key is now known
        await _finish(client, thread, "warm", "scripted:tokens=2,delay_ms=0")
        for i in range(3):
            round_trip_proxy.reset()
            async with client.stream(
                "POST", f"/v1/threads/{thread}/turns",
                json=_turn(f"t{i}", "scripted:tokens=3,delay_ms=300"),
            ) as r:
                at_first_byte = round_trip_proxy.round_trips
                assert r.status_code == 200
                await r.aread()
            assert at_first_byte == 1, f"turn {i}: {at_first_byte} round trips before 1st byte"


async def test_revoked_key_next_turn_is_401_and_nothing_written(
    gateway: GatewayServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, key = await gateway.new_user("carol")
    async with client_for(gateway, key) as carol:
        thread = await gateway.new_thread(carol)
        await _finish(carol, thread, "t1", "scripted:tokens=2,delay_ms=0")
        await thread_released(gateway, thread)
        calls = _count_authenticate(gateway, monkeypatch)
        await _finish(carol, thread, "t2", "scripted:tokens=2,delay_ms=0")
        assert calls == [], "a known key starts a turn without store.authenticate"
        await thread_released(gateway, thread)

        assert await gateway.store.revoke_api_key(key[3:11]) is True
        before = await snapshot(gateway.store)
        r = await carol.post(f"/v1/threads/{thread}/turns", json=_turn("t3"))
        assert_json_error(r, 401, "unauthorized", "revoked key, cached, turn")
        assert "revoked" in r.json()["error"]["message"]
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
        assert calls == [], "refused by open_turn's own check"
        assert await snapshot(gateway.store) == before, "nothing written for a revoked key"
        assert_json_error(await carol.get("/v1/threads"), 401, "unauthorized", "next read")
        assert_json_error(
            await carol.get(f"/v1/threads/{thread}/turns/t1/stream"), 401, "unauthorized",
            "resume",
        )
        r = await carol.post(f"/v1/threads/{thread}/turns", json=_turn("t4"))
        assert_json_error(r, 401, "unauthorized", "again")
        assert await snapshot(gateway.store) == before
    # Other keys are unaffected.
    async with gateway.client() as a:
        assert (await a.get("/v1/threads")).status_code == 200


async def test_cli_revoke_from_another_process_refuses_the_very_next_turn(
    gateway: GatewayServer, database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    _, key = await gateway.new_user("erin")
    async with client_for(gateway, key) as erin:
        thread = await gateway.new_thread(erin)
        await _finish(erin, thread, "t1", "scripted:tokens=2,delay_ms=0")
        await thread_released(gateway, thread)
        assert await _cli("keys", "revoke", key[3:11]) == 0
        before = await snapshot(gateway.store)
        r = await erin.post(f"/v1/threads/{thread}/turns", json=_turn("t2"))
        assert_json_error(r, 401, "unauthorized", "cli-revoked key, turn")
        assert await snapshot(gateway.store) == before
        assert_json_error(await erin.get("/v1/threads"), 401, "unauthorized", "next read")


async def test_wrong_secret_with_a_real_prefix_is_401_while_the_key_is_cached(
    gateway: GatewayServer,
) -> None:
    async with gateway.client() as a:
        thread = await gateway.new_thread(a)
        await _finish(a, thread, "t1", "scripted:tokens=2,delay_ms=0")
        await thread_released(gateway, thread)
    key = gateway.key
    assert gateway.ctx.keys, "the right key is cached"
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    before = await snapshot(gateway.store)
    async with client_for(gateway, forged) as f:
        r = await f.post(f"/v1/threads/{thread}/turns", json=_turn("t2"))
        assert_json_error(r, 401, "unauthorized", "forged secret, turn")
        r = await f.post(f"/v1/threads/{thread}/turns", json=_turn("t1"))
        assert_json_error(r, 401, "unauthorized", "forged secret, replay")
        assert_json_error(await f.get("/v1/threads"), 401, "unauthorized", "forged, read")
    assert await snapshot(gateway.store) == before
    async with gateway.client() as a:
        assert (await a.get("/v1/threads")).status_code == 200


async def test_revoked_key_cannot_attach_to_its_live_turn(
    gateway: GatewayServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, key = await gateway.new_user("frank")
    async with client_for(gateway, key) as frank:
        thread = await gateway.new_thread(frank)
        first = frank.stream("POST", f"/v1/threads/{thread}/turns", json=_turn("live", SLOW))
        async with first as r:
            assert r.status_code == 200
            assert gateway.ctx.relay.get(thread, "live") is not None
            # Attaching while the key is valid: the relay fast path, authenticated.
            async with frank.stream(
                "POST", f"/v1/threads/{thread}/turns", json=_turn("live", SLOW)
            ) as again:
                assert again.status_code == 200
            assert await gateway.store.revoke_api_key(key[3:11]) is True
            r2 = await frank.post(f"/v1/threads/{thread}/turns", json=_turn("live", SLOW))
            assert_json_error(r2, 401, "unauthorized", "attach after revoke")
            r3 = await frank.get(f"/v1/threads/{thread}/turns/live/stream")
            assert_json_error(r3, 401, "unauthorized", "resume after revoke")
            r4 = await frank.post(f"/v1/threads/{thread}/turns/live/cancel")
            assert_json_error(r4, 401, "unauthorized", "cancel after revoke")


async def test_cached_key_errors_before_the_open_are_401_once_revoked(
    gateway: GatewayServer,
) -> None:
    """A revoked key hears 401, not what else was wrong with its request."""
    _, key = await gateway.new_user("gina")
    async with client_for(gateway, key) as gina:
        thread = await gateway.new_thread(gina)
        await _finish(gina, thread, "t1", "scripted:tokens=2,delay_ms=0")
        await thread_released(gateway, thread)
        assert await gateway.store.revoke_api_key(key[3:11]) is True
        r = await gina.post(f"/v1/threads/{thread}/turns", json={"turn_id": "x"})
        assert_json_error(r, 401, "unauthorized", "bad body")
        r = await gina.post(
            f"/v1/threads/{thread}/turns", json=_turn("t2", "nosuchadapter:model")
        )
        assert_json_error(r, 401, "unauthorized", "unknown adapter")


async def test_key_map_is_bounded() -> None:
    m = KeyMap(size=3)
    for i in range(5):
        m.put((f"p{i}", "h"), i)
    assert len(m) == 3 and m.get(("p0", "h")) is None and m.get(("p4", "h")) == 4
