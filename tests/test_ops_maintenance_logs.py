"""Periodic maintenance in the log: nothing at INFO when a pass did nothing, one line
naming what it did when it did ("marked 2 turns interrupted"), and one line per
failed pass naming the cause (no traceback at INFO). Routine no-ops never read
like errors ("row_missing")."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import anyio
import pytest

from persistence import Store
from tests.fixtures_db import RoundTripProxy
from tests.fixtures_server import GatewayServer, run_gateway

pytestmark = pytest.mark.anyio

FAST = {"TURNGATE_CHECKPOINT_SECONDS": "0.05", "TURNGATE_LEASE_SECONDS": "0.3"}


def watch_ops(gw: GatewayServer, op: str) -> Callable[[int, str | None], anyio.Event]:
    """``until(n, outcome)``: an event set once ``op`` has run ``n`` more times (with
    ``outcome``, if given), seen through the store's operation observer."""
    observer = gw.ctx.store.on_operation
    waiters: list[tuple[list[int], str | None, anyio.Event]] = []

    def seen(name: str, outcome: str, seconds: float) -> None:
        if observer is not None:
            observer(name, outcome, seconds)
        if name != op:
            return
        for left, wanted, event in waiters:
            if wanted is None or wanted == outcome:
                left[0] -= 1
                if left[0] <= 0:
                    event.set()

    gw.ctx.store.on_operation = seen

    def until(n: int, outcome: str | None = None) -> anyio.Event:
        event = anyio.Event()
        waiters.append(([n], outcome, event))
        return event

    return until


def turngate_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("turngate") and r.levelno >= level]


async def _expired_turn(store: Store, owner_id: int, name: str) -> int:
    thread, _ = await store.create_thread(owner_id, None, name)
    opened = await store.open_turn(
        thread.id, owner_id, name, [{"type": "text", "text": "hi"}],
        lease_owner="a-process-that-died", lease_seconds=0.01,
    )
    return int(opened.assistant_message_id)


async def test_idle_passes_log_nothing_and_recovery_names_what_it_did(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with run_gateway(database_url, **FAST) as gw:
        until = watch_ops(gw, "recover_expired_turns")
        with anyio.fail_after(10):
            await until(5).wait()
        noise = [r.getMessage() for r in turngate_lines(caplog, logging.INFO)
                 if "recover_expired_turns" in r.getMessage() or "row_missing" in r.getMessage()]
        assert noise == [], f"idle maintenance passes logged at INFO: {noise}"

        caplog.clear()
        recovered = until(1, "ok")
        ids = [await _expired_turn(gw.store, gw.user_id, f"dead-{i}") for i in range(2)]
        with anyio.fail_after(10):
            while len(_marked(caplog)) < 2:
                await recovered.wait()
                recovered = until(1, "ok")
        lines = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
        assert all(re.fullmatch(
            r"recovered_turns: marked [12] turns? interrupted \(lease expired\), "
            r"message_ids=[\d,]+", line) for line in lines), lines
        assert sorted(_marked(caplog)) == sorted(ids), lines
        assert not [r for r in turngate_lines(caplog, logging.INFO)
                    if "db_op recover_expired_turns" in r.getMessage()]


def _marked(caplog: pytest.LogCaptureFixture) -> list[int]:
    ids: list[int] = []
    for r in caplog.records:
        match = re.search(r"marked \d+ turns? interrupted .*message_ids=([\d,]+)",
                          r.getMessage())
        if match:
            ids += [int(i) for i in match.group(1).split(",")]
    return ids


async def test_failed_pass_is_one_line_with_its_cause(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = RoundTripProxy()
    await proxy.start()
    database = pg_url.rsplit("/", 1)[1]
    try:
        async with run_gateway(proxy.url(database), TURNGATE_FINALIZE_TIMEOUT="0.5",
                               **FAST) as gw:
            until = watch_ops(gw, "recover_expired_turns")
            with anyio.fail_after(10):
                await until(1).wait()
            caplog.set_level(logging.INFO)
            caplog.clear()
            await proxy.close()  # the database goes away: every pass fails now
            with anyio.fail_after(30):
                await until(3, "failed").wait()
            records = turngate_lines(caplog, logging.WARNING)
            maintenance = [r for r in records if r.getMessage().startswith("maintenance_failed")]
            assert len(maintenance) >= 3, [r.getMessage() for r in records]
            others = [r.getMessage() for r in records if r not in maintenance]
            assert others == [], f"a failed pass logged more than one line: {others}"
            for r in maintenance:
                assert not r.exc_info, "traceback logged at INFO level"
                message = r.getMessage()
                assert "database" in message and len(message.splitlines()) == 1, message
    finally:
        await proxy.close()
