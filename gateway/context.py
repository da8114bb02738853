"""What the routes share: the app's services, reached from ``request.app.state``."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import anyio
from starlette.requests import Request

from gateway.ops.metrics import Metrics
from gateway.ops.settings import Settings
from gateway.replicas.limits import SharedLimits
from gateway.streaming.relay import LocalRelay, SharedRelay
from gateway.turn.lifecycle import TurnRunner
from llm_adapters.pricing import PriceTable
from llm_adapters.registry import AdapterRegistry
from persistence import Store


@dataclass
class AppContext:
    """The services of one gateway app."""

    settings: Settings
    store: Store
    adapters: AdapterRegistry
    relay: LocalRelay
    runner: TurnRunner
    metrics: Metrics
    prices: PriceTable
    instance_id: str
    shutdown_event: anyio.Event | None = None
    shared: SharedRelay | None = None  # the relay between replicas (REDIS_URL)
    limits: SharedLimits | None = None  # per-user limits across replicas (REDIS_URL)
    ready: bool = False
    rate_windows: dict[int, deque[float]] = field(default_factory=dict)


def context(request: Request) -> AppContext:
    """The ``AppContext`` of the app serving ``request``."""
    ctx: AppContext = request.app.state.ctx
    return ctx


__all__ = ["AppContext", "context"]
