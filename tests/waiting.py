"""Waiting on a condition instead of sleeping a fixed time.

``eventually`` polls a probe until its value satisfies a predicate and returns that
value; past the deadline it fails with what the probe last returned, so a timeout
says what state the system was stuck in rather than only that it was slow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import httpx

from persistence import Store
from tests.fixtures_server import GatewayServer
from tests.sse_client import Stream, parse_sse

T = TypeVar("T")

async def eventually(
    probe: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    *,
    within: float,
    what: str,
    every: float = 0.02,
) -> T:
    """``await probe()`` until ``ok(value)``; that value. Raises ``AssertionError``
    naming ``what`` and the last value seen if ``within`` seconds pass first."""
    deadline = anyio.current_time() + within
    while True:
        last = await probe()
        if ok(last):
            return last
        if anyio.current_time() >= deadline:
            raise AssertionError(f"{what}: not within {within} s; last seen: {last!r}")
        await anyio.sleep(every)


async def until(cond: Callable[[], T], *, within: float, what: str,
                shown: Callable[[], object] | None = None, every: float = 0.01) -> T:
    """``eventually`` for a synchronous probe of in-process state; returns its
    first truthy value. ``shown`` says what to report on a timeout (default: the
    probe's last value)."""
    try:
        return await eventually(lambda: _now(cond), bool, within=within, what=what,
                                every=every)
    except AssertionError:
        if shown is None:
            raise
        raise AssertionError(f"{what}: not within {within} s; last seen: {shown()!r}") from None


async def _now(cond: Callable[[], T]) -> T:
    return cond()


async def last_assistant(client: httpx.AsyncClient, thread: str) -> dict[str, Any] | None:
    """The thread's last assistant message over the API, or None before there is one."""
    r = await client.get(f"/v1/threads/{thread}/messages")
    assert r.status_code == 200, r.text
    rows = [m for m in r.json()["messages"] if m["role"] == "assistant"]
    return rows[-1] if rows else None


def _text(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    return "".join(p.get("text", "") for p in row["content"] if p.get("type") == "text")


async def assistant_where(
    client: httpx.AsyncClient,
    thread: str,
    ok: Callable[[dict[str, Any]], bool],
    *,
    within: float,
    what: str,
) -> dict[str, Any]:
    """The thread's last assistant message once ``ok`` holds for it."""
    row = await eventually(lambda: last_assistant(client, thread),
                           lambda m: m is not None and ok(m), within=within, what=what)
    assert row is not None
    return row


async def streaming_with_text(
    client: httpx.AsyncClient, thread: str, *, within: float = 5, prefix: str = ""
) -> dict[str, Any]:
    """The thread's last assistant row once it is streaming and its stored text (a
    checkpoint) is non-empty and starts with ``prefix``."""
    return await assistant_where(
        client, thread,
        lambda m: m["status"] == "streaming" and _text(m) != "" and _text(m).startswith(prefix),
        within=within, what=f"a streaming row with a checkpoint starting {prefix!r}")


async def lease_lapsed(store: Store, message_id: int, *, within: float = 5) -> None:
    """Until the row's ``lease_expires_at`` has passed by the clock the store compares
    it with (PostgreSQL's ``now()``; on SQLite the process's UTC clock)."""
    db = store._db
    if store._is_pg:
        sql = "SELECT lease_expires_at < now() FROM messages WHERE id = :id"

        async def probe() -> Any:
            return await db.fetch_val(sql, {"id": message_id})
    else:  # ISO text in UTC, compared as text with the store's clock in the same format
        sql = "SELECT lease_expires_at FROM messages WHERE id = :id"

        async def probe() -> Any:
            expires = await db.fetch_val(sql, {"id": message_id})
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            return expires is not None and expires < now

    await eventually(probe, bool, within=within,
                     what=f"the lease of message {message_id} to lapse")


async def clock_past(store: Store, stamp: str, *, within: float = 5) -> None:
    """Until the clock the store stamps rows with is strictly past ``stamp`` (a
    timestamp the store returned), so the next write's stamp sorts after it."""
    if store._is_pg:
        value = store._ts_param(stamp)

        async def probe() -> Any:
            return await store._db.fetch_val("SELECT now() > :ts", {"ts": value})
    else:

        async def probe() -> Any:
            return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") > stamp

    await eventually(probe, bool, within=within, what=f"the store's clock to pass {stamp}",
                     every=0.001)


async def thread_released(gw: GatewayServer, thread: str, *, within: float = 5) -> None:
    """Until no turn generates on ``thread`` in this gateway (a finished turn's
    client may have its whole body before the turn lets go of the thread)."""
    await until(lambda: gw.ctx.relay.running_on_thread(thread) is None, within=within,
                what=f"the turn on thread {thread} to let go of it",
                shown=lambda: gw.ctx.relay.running_on_thread(thread))


class Reading:
    """``stream_request`` whose events another task can watch while they arrive:
    ``await reading.events_at_least(n)`` returns once the reader holds ``n`` events."""

    def __init__(self) -> None:
        self.stream: Stream | None = None

    async def run(self, client: httpx.AsyncClient, method: str, url: str, *,
                  limit: int | None = None, **kwargs: Any) -> Stream:
        async with client.stream(method, url, **kwargs) as response:
            self.stream = Stream(response.status_code, dict(response.headers))
            if response.status_code == 200 and response.headers.get(
                    "content-type", "").startswith("text/event-stream"):
                await parse_sse(response.aiter_lines(), self.stream, limit)
            else:
                self.stream.body = await response.aread()
            return self.stream

    async def events_at_least(self, n: int, *, within: float = 5) -> Stream:
        async def seen() -> int:
            return 0 if self.stream is None else len(self.stream.events)

        await eventually(seen, lambda count: count >= n, within=within, every=0.005,
                         what=f"{n} events read")
        assert self.stream is not None
        return self.stream


def metric(gw: GatewayServer, name: str, **labels: str) -> float:
    """A sample of the gateway's own metrics registry (0 when it has none yet)."""
    return gw.ctx.metrics.registry.get_sample_value(name, labels or None) or 0.0


def is_request_task(task: asyncio.Task[Any]) -> bool:
    """The server's task for one HTTP request (uvicorn's ``run_asgi``)."""
    coro = task.get_coro()
    return coro is not None and str(getattr(coro, "__qualname__", "")).endswith("run_asgi")


async def gateway_idle(gw: GatewayServer, *, within: float = 5) -> None:
    """Until the in-process gateway has no open stream, no generation and no request
    in progress: everything a finished turn started has ended."""

    async def probe() -> tuple[float, float, int, int]:
        return (metric(gw, "turngate_active_streams"),
                metric(gw, "turngate_active_generations"),
                len(gw.ctx.relay.running()),
                sum(1 for t in asyncio.all_tasks() if is_request_task(t)))

    await eventually(probe, lambda s: s == (0, 0, 0, 0), within=within, every=0.005,
                     what="no stream, generation, running turn or request "
                          "(streams, generations, running, requests)")


def until_sync(cond: Callable[[], T], *, within: float, what: str,
               shown: Callable[[], object] | None = None, every: float = 0.01) -> T:
    """``until`` for tests that run without an event loop (threads, subprocesses);
    ``shown`` says what to report on a timeout (default: the last value)."""
    deadline = time.monotonic() + within
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            seen = shown() if shown is not None else value
            raise AssertionError(f"{what}: not within {within} s; last seen: {seen!r}")
        time.sleep(every)
