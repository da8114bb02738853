"""Which adapters exist, and how a model string picks one.

Built-ins are ``scripted``, ``openai`` and ``anthropic``; third-party packages
add adapters through the entry-point group ``turngate.adapters``, whose value is
a class (or factory) called with the environment mapping. The built-in HTTP
adapters are also given their :class:`~llm_adapters.base.ProviderConfig` when
the registry has one for them (the gateway passes its validated settings), so
they read nothing from the environment. A model string is
``"<adapter>:<model>"``; a bare ``"<adapter>"`` means that adapter's default.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

from llm_adapters.base import Adapter, ProviderConfig
from turngate.exceptions import UnknownAdapter

AdapterFactory = Callable[[Mapping[str, str]], Adapter]

ENTRY_POINT_GROUP = "turngate.adapters"

_BUILTINS = {
    "scripted": "llm_adapters.scripted:ScriptedAdapter",
    "openai": "llm_adapters.openai:OpenAIAdapter",
    "anthropic": "llm_adapters.anthropic:AnthropicAdapter",
}

logger = logging.getLogger("turngate.adapters")


def _load(target: str) -> AdapterFactory:
    module_name, _, attr = target.partition(":")
    factory: AdapterFactory = getattr(importlib.import_module(module_name), attr)
    return factory


def parse_model(model: str) -> tuple[str, str]:
    """Split ``"<adapter>:<model>"`` into its two parts (the model may be empty)."""
    adapter, _, rest = model.partition(":")
    return adapter.strip(), rest.strip()


class AdapterRegistry:
    """Adapter factories by name, and one live adapter instance per name."""

    def __init__(
        self, env: Mapping[str, str], configs: Mapping[str, ProviderConfig] | None = None
    ) -> None:
        """``env``: what adapters read their settings from; ``configs``: the endpoint
        and key of each built-in HTTP adapter, by name, passed to it instead."""
        self._env = env
        self._configs = {k: v for k, v in (configs or {}).items() if k in _BUILTINS}
        self._targets: dict[str, str | AdapterFactory] = dict(_BUILTINS)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in _BUILTINS:
                self._targets[ep.name] = ep.value
        self._instances: dict[str, Adapter] = {}

    def register(self, name: str, factory: AdapterFactory) -> None:
        """Register an adapter factory by hand (tests, embedding applications)."""
        self._targets[name] = factory
        self._instances.pop(name, None)

    def config(self, name: str) -> ProviderConfig | None:
        """The endpoint and key the built-in adapter ``name`` is given, if any."""
        return self._configs.get(name)

    @property
    def names(self) -> list[str]:
        """The names of every available adapter, sorted."""
        return sorted(self._targets)

    def get(self, name: str) -> Adapter:
        """The live adapter called ``name``; raise ``UnknownAdapter`` if none."""
        adapter = self._instances.get(name)
        if adapter is not None:
            return adapter
        target = self._targets.get(name)
        if target is None:
            raise UnknownAdapter(name, self.names)
        factory = _load(target) if isinstance(target, str) else target
        config = self._configs.get(name) if isinstance(target, str) else None
        if config is not None:
            built_in: Callable[..., Adapter] = factory
            adapter = built_in(self._env, config=config)
        else:
            adapter = factory(self._env)
        self._instances[name] = adapter
        return adapter

    async def aclose(self) -> None:
        """Close every adapter that was created."""
        instances, self._instances = list(self._instances.values()), {}
        for adapter in instances:
            try:
                await adapter.aclose()
            except Exception:  # one bad adapter must not keep the others open
                logger.exception("adapter_close_failed adapter=%s", adapter.name)


__all__ = ["ENTRY_POINT_GROUP", "AdapterFactory", "AdapterRegistry", "parse_model"]
