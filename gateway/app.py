"""The Starlette application and its lifespan."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.api import aisdk, models, ops, threads, turns
from gateway.api.errors import EXCEPTION_HANDLERS
from gateway.api.header_limits import HeaderLimits
from gateway.context import AppContext
from gateway.ops.metrics import Metrics
from gateway.ops.settings import Settings
from gateway.replicas.limits import SharedLimits
from gateway.replicas.relay import RedisRelay, connect_shared
from gateway.streaming.relay import LocalRelay
from gateway.streaming.responses import end_streams_at_shutdown
from gateway.streaming.sse import StreamSet
from gateway.turn.lifecycle import TurnRunner
from gateway.turn.titles import Titler
from gateway.turn.upkeep import maintain
from llm_adapters.base import ProviderConfig
from llm_adapters.pricing import PriceTable
from llm_adapters.registry import AdapterRegistry
from persistence import Store, migrate, schema_status
from turngate.exceptions import SchemaOutdated

logger = logging.getLogger("turngate.gateway")

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")


async def _favicon(request: Request) -> Response:
    return RedirectResponse("/favicon.svg", status_code=301)


def _routes() -> list[BaseRoute]:
    routes: list[BaseRoute] = [
        # First: the router tries the routes in order, and a turn's first token waits
        # for its route to be found (no other pattern matches its path).
        Route("/v1/threads/{thread_id}/turns", turns.start_turn, methods=["POST"]),
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
        Route("/v1/threads", threads.create_thread, methods=["POST"]),
        Route("/v1/threads", threads.list_threads, methods=["GET"]),
        Route("/v1/threads/{thread_id}", threads.rename_thread, methods=["PATCH"]),
        Route("/v1/threads/{thread_id}", threads.delete_thread, methods=["DELETE"]),
        Route("/v1/models", models.list_models, methods=["GET"]),
        Route("/v1/threads/{thread_id}/messages", threads.list_messages, methods=["GET"]),
        Route("/v1/threads/{thread_id}/messages", threads.append_message, methods=["POST"]),
        Route("/v1/threads/{thread_id}/turns/{turn_id}/stream", turns.resume_turn,
              methods=["GET"]),
        Route("/v1/threads/{thread_id}/turns/{turn_id}/regenerate", turns.regenerate_turn,
              methods=["POST"]),
        Route("/v1/threads/{thread_id}/turns/{turn_id}/cancel", turns.cancel_turn,
              methods=["POST"]),
        Route("/v1/threads/{thread_id}/turns/{turn_id}/continue", turns.continue_turn,
              methods=["POST"]),
        Route("/v1/usage", threads.list_usage, methods=["GET"]),
    ]
    routes.extend(aisdk.ROUTES)
    if os.path.isdir(STATIC_DIR):
        # Browsers ask for /favicon.ico whatever the page links; the icon is an SVG.
        routes.append(Route("/favicon.ico", _favicon, methods=["GET", "HEAD"]))
        routes.append(Mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static"))
    return routes


async def prepare_database(settings: Settings) -> None:
    """SQLite migrates itself; PostgreSQL must already be migrated (``turngate migrate``)."""
    if settings.database_url.startswith("sqlite"):
        await migrate(settings.database_url)
        return
    status = await schema_status(settings.database_url)
    if status == "newer":
        # A newer release migrated already (rolling deploy): migrations only add,
        # so this code keeps working until it is replaced.
        logger.warning("schema_newer: the database was migrated by a newer turngate",
                       extra={"event": "schema_newer"})
        return
    if status != "current":
        raise SchemaOutdated(
            f"the database schema is {status}; run `turngate migrate` before `turngate serve`"
        )


def provider_configs(settings: Settings) -> dict[str, ProviderConfig]:
    """The endpoint and key of each built-in HTTP adapter, from the validated settings."""
    return {
        "openai": ProviderConfig(settings.openai_base_url, settings.openai_api_key or ""),
        "anthropic": ProviderConfig(
            settings.anthropic_base_url, settings.anthropic_api_key or ""
        ),
    }


def create_app(
    settings: Settings | None = None, *, migrate_sqlite: bool = True, prepared: bool = False
) -> Starlette:
    """Build the gateway app (settings from the environment unless given).

    ``prepared``: the caller already ran ``prepare_database`` (``turngate serve`` does,
    before uvicorn starts, so that its failures are one line); the lifespan skips it.
    """
    settings = settings or Settings.from_env()
    instance_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    metrics = Metrics()
    store = Store(
        settings.database_url, statement_timeout=settings.finalize_timeout,
        pool_size=settings.db_pool_size,
    )
    store.on_operation = metrics.observe_db
    relay = LocalRelay(retention_seconds=settings.relay_retention_seconds)
    prices = PriceTable(settings.prices)
    runner = TurnRunner(settings, store, relay, prices, metrics, instance_id)
    ctx = AppContext(
        settings=settings,
        store=store,
        adapters=AdapterRegistry(settings.environ, provider_configs(settings)),
        relay=relay,
        runner=runner,
        metrics=metrics,
        prices=prices,
        instance_id=instance_id,
    )
    runner.titles = Titler(store, ctx.adapters, prices.cost_micros, settings.title_model)

    async def _drain_on_signal(event: anyio.Event) -> None:
        # The shutdown event is set as soon as SIGTERM arrives (by `turngate serve`'s
        # server, or by the stream set's exit watcher), while uvicorn still waits for open
        # connections: stop taking turns now and give running ones the grace period,
        # so their streams end with a finish chunk and the connections close by
        # themselves. The lifespan shutdown below then finds nothing left to drain.
        await event.wait()
        ctx.ready = False
        logger.info("shutdown_started grace=%gs running=%d",
                    settings.shutdown_grace_seconds, len(runner.relay.running()),
                    extra={"event": "shutdown_started",
                           "grace_seconds": settings.shutdown_grace_seconds,
                           "running": len(runner.relay.running())})
        with anyio.CancelScope(shield=True):
            await runner.drain(settings.shutdown_grace_seconds)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not prepared and (migrate_sqlite or not settings.database_url.startswith("sqlite")):
            await prepare_database(settings)
        await store.connect()
        ctx.shutdown_event = anyio.Event()
        ctx.streams = StreamSet(settings.ping_seconds, settings.send_timeout)
        shared: RedisRelay | None = None
        try:
            # With REDIS_URL: Redis must answer now (RelayError stops start-up).
            shared = await connect_shared(settings)
            runner.shared = shared
            if shared is not None:
                runner.limits = SharedLimits(shared, hold_seconds=settings.lease_seconds)
            async with AsyncExitStack() as tools:
                if settings.mcp_config is not None and settings.mcp_config.servers:
                    # The MCP servers start with the gateway; one that does not start
                    # stops start-up (ToolServerStartError names it).
                    from gateway.tools.servers import ToolHub

                    runner.tools = await tools.enter_async_context(
                        ToolHub(settings.mcp_config)
                    )
                async with anyio.create_task_group() as tg:
                    runner.task_group = tg
                    tg.start_soon(runner.own_generations)
                    tg.start_soon(runner.batcher.run)
                    if shared is not None:
                        tg.start_soon(shared.run, relay)
                    await store.recover_expired_turns()
                    tg.start_soon(maintain, runner)
                    tg.start_soon(_drain_on_signal, ctx.shutdown_event)
                    # One timer for the pings and send timeouts of every open stream.
                    tg.start_soon(ctx.streams.run)
                    # Streams still open after the drain's deadline are ended before uvicorn's.
                    tg.start_soon(
                        end_streams_at_shutdown, ctx.shutdown_event, ctx.streams,
                        settings.shutdown_grace_seconds + settings.finalize_timeout + 1,
                    )
                    ctx.ready = True
                    logger.info("started instance=%s", instance_id,
                                extra={"event": "started", "instance": instance_id})
                    try:
                        yield
                    finally:
                        ctx.ready = False
                        ctx.shutdown_event.set()
                        with anyio.CancelScope(shield=True):
                            await runner.drain(settings.shutdown_grace_seconds)
                        tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if shared is not None:
                    await shared.aclose()
                await ctx.adapters.aclose()
                with anyio.move_on_after(10):
                    await store.disconnect()

    # Header limits first: an oversized request is answered before anything reads it.
    middleware: list[Middleware] = [
        Middleware(HeaderLimits, max_header_bytes=settings.max_header_bytes)
    ]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
                allow_headers=["authorization", "content-type", "last-event-id"],
                expose_headers=["x-vercel-ai-ui-message-stream", "retry-after"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=_routes(),
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    return app


__all__ = ["create_app", "prepare_database"]
