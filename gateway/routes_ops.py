"""Operations routes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.context import context


async def healthz(request: Request) -> Response:
    """``GET /healthz``: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """``GET /readyz``: the database is reachable and the server takes turns."""
    ctx = context(request)
    checks: dict[str, str] = {}
    ok = True
    if ctx.runner.draining:
        checks["server"] = "draining"
        ok = False
    if await ctx.store.ping():
        checks["database"] = "ok"
    else:
        checks["database"] = "unreachable"
        ok = False
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks},
        status_code=200 if ok else 503,
    )


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format."""
    ctx = context(request)
    return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)


__all__ = ["healthz", "metrics", "readyz"]
