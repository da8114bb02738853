"""Operations routes: liveness, readiness, Prometheus metrics.

``/healthz`` answers as long as the process does: a load balancer or
orchestrator restarts on it, so it checks nothing outside the process.
``/readyz`` says whether this replica should get traffic: it takes turns (not
starting, not draining), the database answers, its schema is the one this code
expects, and Redis answers when ``REDIS_URL`` is set. It is 503 otherwise,
with the failing checks named in the body.

The database check is more than ``SELECT 1``: a probe on the app's own pool must
get a connection and read ``messages`` within ``PROBE_TIMEOUT`` (a held pool or
a locked table fails it), and no statement of the app may have failed for a
database reason in the last ``FAILURE_WINDOW`` seconds (a SQLite write lock held
by another process only shows there: reads still pass).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.context import AppContext, context
from gateway.replicas.relay import RedisRelay
from persistence import ProbeResult, Store, classify_revision

logger = logging.getLogger("turngate.readyz")

# A probe must answer before the balancer gives up on it (typically 1-5 s).
_REDIS_TIMEOUT = 1.0
PROBE_TIMEOUT = 2.0
# How long a failed statement keeps the replica unready. Long enough that a load
# balancer probing every few seconds sees it; short, so recovery shows soon.
FAILURE_WINDOW = 5.0


class DatabaseProbe:
    """At most one probe of a store in flight; callers wait for it a bounded time.

    The store's operations are shielded from cancellation (a statement is never cut
    half way), so a probe stuck behind a lock or a full pool cannot be abandoned
    by cancelling it: it runs in the app's task group until the store's own
    deadline ends it, and readiness answers ``timeout`` meanwhile.
    """

    def __init__(self) -> None:
        self._done: anyio.Event | None = None
        self._result = ProbeResult("timeout")

    async def check(self, store: Store, tg: anyio.abc.TaskGroup | None) -> ProbeResult:
        if self._done is None or self._done.is_set():
            done = self._done = anyio.Event()
            if tg is None:  # not serving yet (no task group): just wait for it
                await self._run(store, done)
            else:
                tg.start_soon(self._run, store, done)
        done = self._done
        with anyio.move_on_after(PROBE_TIMEOUT):
            await done.wait()
        return self._result if done.is_set() else ProbeResult("timeout")

    async def _run(self, store: Store, done: anyio.Event) -> None:
        try:
            self._result = await store.probe()
        finally:
            done.set()


async def healthz(request: Request) -> Response:
    """``GET /healthz``: the process answers."""
    return JSONResponse({"status": "ok"})


async def _database_checks(ctx: AppContext) -> tuple[dict[str, str], dict[str, Any]]:
    """The ``database`` and ``schema`` checks, and what explains a failed one."""
    probe = ctx.db_probe
    if probe is None:
        probe = ctx.db_probe = DatabaseProbe()
    result = await probe.check(ctx.store, ctx.runner.task_group)
    detail: dict[str, Any] = {}
    if result.status != "ok":
        detail["database"] = (
            f"the probe on the app's pool did not answer within {PROBE_TIMEOUT:g} s"
            if result.status == "timeout" else f"the probe failed: {result.status}"
        )
        return {"database": result.status}, detail
    checks = {"database": "ok", "schema": classify_revision(result.revision)}
    if checks["schema"] == "current":
        checks["schema"] = "ok"
    recent = ctx.store.health.recent(FAILURE_WINDOW)
    if recent.count:
        checks["database"] = recent.reason or "error"
        detail["database"] = (
            f"{recent.count} statement(s) failed in the last {FAILURE_WINDOW:g} s, the last "
            f"{recent.seconds_ago or 0:.1f} s ago ({recent.reason})"
        )
    return checks, detail


async def _redis_check(ctx: AppContext) -> str:
    """PING on the app's own Redis client (the relay's), within ``_REDIS_TIMEOUT``."""
    if not isinstance(ctx.shared, RedisRelay):
        return "not connected"  # the lifespan has not connected yet
    try:
        with anyio.fail_after(_REDIS_TIMEOUT):
            await ctx.shared.ping()
        return "ok"
    except Exception as exc:
        logger.warning("readyz_redis_unreachable error=%s", type(exc).__name__,
                       extra={"event": "readyz_redis_unreachable", "error": type(exc).__name__})
        return "unreachable"


async def readyz(request: Request) -> Response:
    """``GET /readyz``: takes turns; database reachable, schema current; Redis if configured."""
    ctx = context(request)
    checks: dict[str, str] = {}
    if ctx.runner.draining:
        checks["server"] = "draining"
    elif not ctx.ready:
        checks["server"] = "starting"
    else:
        checks["server"] = "ok"
    database, detail = await _database_checks(ctx)
    checks.update(database)
    if ctx.settings.redis_url:
        checks["redis"] = await _redis_check(ctx)
    # A newer schema (a rolling deploy's release step ran) still serves this code.
    ok = all(value == "ok" or (name, value) == ("schema", "newer")
             for name, value in checks.items())
    body: dict[str, Any] = {"status": "ready" if ok else "unavailable", "checks": checks}
    if detail:
        body["detail"] = detail
    return JSONResponse(
        body,
        status_code=200 if ok else 503,
        headers={"cache-control": "no-store"},
    )


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format."""
    ctx = context(request)
    return Response(
        ctx.metrics.render(),
        media_type=ctx.metrics.content_type,
        headers={"cache-control": "no-store"},
    )


__all__ = ["DatabaseProbe", "healthz", "metrics", "readyz"]
