"""Operations routes: liveness, readiness, Prometheus metrics.

``/healthz`` answers as long as the process does: a load balancer or
orchestrator restarts on it, so it checks nothing outside the process.
``/readyz`` says whether this replica should get traffic: it takes turns (not
starting, not draining), the database answers, its schema is the one this code
expects, and Redis answers when ``REDIS_URL`` is set. It is 503 otherwise,
with the failing checks named in the body.
"""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.context import AppContext, context
from persistence import schema_status

# A probe must answer before the balancer gives up on it (typically 1-5 s).
_REDIS_TIMEOUT = 1.0


async def healthz(request: Request) -> Response:
    """``GET /healthz``: the process answers."""
    return JSONResponse({"status": "ok"})


async def _schema_check(ctx: AppContext) -> str:
    try:
        return await schema_status(ctx.settings.database_url)
    except Exception:
        return "unreachable"


async def _redis_check(url: str) -> str:
    try:
        import redis.asyncio as redis_asyncio
    except ImportError:  # redis is optional at runtime
        return "client not installed"
    client = redis_asyncio.from_url(
        url, socket_connect_timeout=_REDIS_TIMEOUT, socket_timeout=_REDIS_TIMEOUT
    )
    try:
        with anyio.fail_after(_REDIS_TIMEOUT * 2):
            await client.ping()
        return "ok"
    except Exception:
        return "unreachable"
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


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
    if await ctx.store.ping():
        checks["database"] = "ok"
        schema = await _schema_check(ctx)
        checks["schema"] = "ok" if schema == "current" else schema
    else:
        checks["database"] = "unreachable"
    if ctx.settings.redis_url:
        checks["redis"] = await _redis_check(ctx.settings.redis_url)
    # A newer schema (a rolling deploy's release step ran) still serves this code.
    ok = all(value == "ok" or (name, value) == ("schema", "newer")
             for name, value in checks.items())
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks},
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


__all__ = ["healthz", "metrics", "readyz"]
