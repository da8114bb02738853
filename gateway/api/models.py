"""``GET /v1/models``: the models each configured adapter offers, and the default.

The OpenAI-compatible endpoint's own ``GET {OPENAI_BASE_URL}/models`` and
Anthropic's ``GET {ANTHROPIC_BASE_URL}/v1/models`` are asked when their adapter is
configured (a key or a base URL set), the scripted adapter lists its presets,
and any other registered adapter is listed by its bare name. Answers are cached
per process: a successful list for ``MODELS_TTL`` seconds, a failed one for
``FAILED_TTL`` (the adapter is then reported with its error, the rest still listed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.api.auth import authenticate
from gateway.context import AppContext, context
from llm_adapters.openai import DEFAULT_BASE_URL as OPENAI_DEFAULT_BASE_URL

MODELS_TTL = 300.0
FAILED_TTL = 30.0
FETCH_TIMEOUT = 5.0
_MAX_MODELS = 500

SCRIPTED_PRESETS: list[tuple[str, str]] = [
    ("scripted", "Echoes your message word by word"),
    ("scripted:chunk=6,delay_ms=15", "Echoes your message verbatim, 6 characters at a time"),
    ("scripted:tokens=40,delay_ms=40,reasoning=5,tools=1",
     "Demo: reasoning, a tool call and 40 words"),
    ("scripted:tokens=400,delay_ms=40", "A long reply (400 words)"),
    ("scripted:tokens=5,fail_after=3", "Fails after 3 words"),
]


@dataclass
class _Entry:
    at: float
    models: list[str]
    error: str | None


@dataclass
class ModelsCache:
    """Per-process cache of the upstream model lists, one entry per adapter."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    lock: anyio.Lock = field(default_factory=anyio.Lock)


def _configured(ctx: AppContext, adapter: str) -> bool:
    """A key, or (for ``openai``) an endpoint other than the provider's own, is set."""
    config = ctx.adapters.config(adapter)
    if adapter == "openai":
        return config is not None and bool(
            config.api_key or config.base_url.rstrip("/") != OPENAI_DEFAULT_BASE_URL
        )
    if adapter == "anthropic":
        return config is not None and bool(config.api_key)
    return True


async def _fetch(ctx: AppContext, adapter: str) -> list[str]:
    """The ids the upstream lists (``{"data": [{"id": ...}]}`` for both providers)."""
    instance: Any = ctx.adapters.get(adapter)
    if adapter == "openai":
        url = f"{instance.base_url}/models"
    else:
        url = f"{instance.base_url}/v1/models?limit=1000"
    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT) as client:
        response = await client.get(url, headers=instance._headers())
    if response.status_code != 200:
        raise ValueError(f"{adapter} model list answered HTTP {response.status_code}")
    try:
        data = response.json()["data"]
        ids = [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{adapter} model list is not {{\"data\": [{{\"id\"}}]}}") from None
    return sorted(set(ids))[:_MAX_MODELS]


async def _upstream(ctx: AppContext, cache: ModelsCache, adapter: str) -> _Entry:
    async with cache.lock:
        entry = cache.entries.get(adapter)
        now = time.monotonic()
        ttl = MODELS_TTL if entry is None or entry.error is None else FAILED_TTL
        if entry is not None and now - entry.at < ttl:
            return entry
        try:
            with anyio.fail_after(FETCH_TIMEOUT + 1):
                entry = _Entry(now, await _fetch(ctx, adapter), None)
        except (httpx.HTTPError, ValueError, TimeoutError, OSError) as exc:
            reason = str(exc) if isinstance(exc, ValueError) else (
                f"{adapter} model list could not be fetched ({type(exc).__name__})"
            )
            entry = _Entry(now, [], reason)
        cache.entries[adapter] = entry
        return entry


def _cache(ctx: AppContext) -> ModelsCache:
    if ctx.models_cache is None:
        ctx.models_cache = ModelsCache()
    return ctx.models_cache


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: ``{"default", "models": [{id, adapter, label, priced}],
    "adapters": [{name, status, error?}], "limits"}``."""
    ctx = context(request)
    await authenticate(request, ctx.store, ctx.keys)
    cache = _cache(ctx)
    models: list[dict[str, Any]] = []
    adapters: list[dict[str, Any]] = []

    def add(model_id: str, adapter: str, label: str | None = None) -> None:
        models.append({"id": model_id, "adapter": adapter, "label": label or model_id,
                       "priced": ctx.prices.price(model_id) is not None})

    for name in ctx.adapters.names:
        if name == "scripted":
            for model_id, label in SCRIPTED_PRESETS:
                add(model_id, name, label)
            adapters.append({"name": name, "status": "ok"})
        elif name in ("openai", "anthropic"):
            if not _configured(ctx, name):
                adapters.append({"name": name, "status": "unconfigured"})
                continue
            entry = await _upstream(ctx, cache, name)
            for model_id in entry.models:
                add(f"{name}:{model_id}", name)
            if entry.error is None:
                adapters.append({"name": name, "status": "ok"})
            else:
                adapters.append({"name": name, "status": "unavailable", "error": entry.error})
        else:
            add(name, name)
            adapters.append({"name": name, "status": "ok"})
    default = ctx.settings.default_model
    return JSONResponse({
        "default": default,
        "default_priced": ctx.prices.price(default) is not None,
        "models": models,
        "adapters": adapters,
        # What a turn accepts, so a client can check before sending (the chat page does).
        "limits": {
            "max_text_chars": ctx.settings.max_text_chars,
            "max_images": ctx.settings.max_images,
            "max_image_bytes": ctx.settings.max_image_bytes,
            "max_body_bytes": ctx.settings.max_body_bytes,
        },
    })


__all__ = ["SCRIPTED_PRESETS", "list_models"]
