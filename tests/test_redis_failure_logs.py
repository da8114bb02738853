"""Every Redis failure the relay absorbs is logged: one error when Redis goes away,
debug lines while it stays away, and a warning for a cancel request it cannot read."""

from __future__ import annotations

import logging
import uuid

import anyio
import pytest

from gateway.replicas.relay import RedisRelay
from gateway.streaming.relay import LocalRelay
from tests.fixtures_db import RoundTripProxy
from tests.test_replicas import REDIS_DB, REDIS_HOST, REDIS_PORT

pytestmark = pytest.mark.anyio


def _redis_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage().split()[0]) for r in caplog.records
            if r.name == "turngate.redis"]


async def test_an_outage_is_one_error_line_then_debug_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="turngate.redis")
    proxy = RoundTripProxy(REDIS_HOST, REDIS_PORT)
    await proxy.start()
    relay = RedisRelay(f"redis://{REDIS_HOST}:{proxy.port}/{REDIS_DB}",
                       prefix=f"test-{uuid.uuid4().hex}")
    try:
        await relay.connect()
        assert relay.available
        await proxy.close()  # Redis is away: every call below fails
        assert await relay.remote_readers("th", "t1") == 0
        assert not relay.available
        assert await relay.remote_readers("th", "t1") == 0
        await relay.reader_joined("th", "t1")
    finally:
        await relay.aclose()
        await proxy.close()
    assert _redis_lines(caplog) == [
        (logging.ERROR, "redis_unavailable"),
        (logging.DEBUG, "redis_still_unavailable"),
        (logging.DEBUG, "redis_still_unavailable"),
    ]


async def test_a_cancel_request_it_cannot_read_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="turngate.redis")
    relay = RedisRelay(f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
                       prefix=f"test-{uuid.uuid4().hex}")
    await relay.connect()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay.run, LocalRelay())
            with anyio.fail_after(10):
                # Published until the listener has subscribed and read one.
                while (logging.WARNING, "redis_cancel_malformed") not in _redis_lines(caplog):
                    await relay.client.publish(relay.cancel_channel, b"not json")
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    finally:
        await relay.aclose()
    assert (logging.ERROR, "redis_unavailable") not in _redis_lines(caplog)
