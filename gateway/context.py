"""The per-app state: one ``AppContext`` per app, built by ``create_app`` and its
lifespan, reached from ``request.app.state`` and passed explicitly from there.

Nothing per-app lives in a module global (``tests/test_architecture.py`` checks
that no module starts a registry at import time), so apps in one process (the
tests run several) keep their state apart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from gateway.api.auth import KeyMap

if TYPE_CHECKING:
    import anyio

    from gateway.api.models import ModelsCache
    from gateway.api.ops import DatabaseProbe
    from gateway.ops.metrics import Metrics
    from gateway.ops.settings import Settings
    from gateway.replicas.limits import SharedLimits
    from gateway.streaming.relay import LocalRelay, SharedRelay
    from gateway.streaming.sse import StreamSet
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
    relay: LocalRelay  # the turns generating (or recently ended) in this process
    runner: TurnRunner  # owns the generations, their final writes and upkeep
    metrics: Metrics
    prices: PriceTable
    instance_id: str
    # Set by the lifespan: the shutdown signal, and the open SSE streams it ends.
    shutdown_event: anyio.Event | None = None
    streams: StreamSet | None = None
    ready: bool = False
    rate_windows: dict[int, deque[float]] = field(default_factory=dict)
    keys: KeyMap = field(default_factory=KeyMap)  # API keys that authenticated here
    db_probe: DatabaseProbe | None = None  # /readyz's, made by its first probe
    models_cache: ModelsCache | None = None  # /v1/models', made by its first request

    @property
    def shared(self) -> SharedRelay | None:
        """The relay between replicas (REDIS_URL), owned by the runner."""
        return self.runner.shared

    @property
    def limits(self) -> SharedLimits | None:
        """Per-user limits across replicas (REDIS_URL), owned by the runner."""
        return self.runner.limits


def context(request: Request) -> AppContext:
    """The ``AppContext`` of the app serving ``request``."""
    ctx: AppContext = request.app.state.ctx
    return ctx


__all__ = ["AppContext", "context"]
