"""LLM adapters: the adapter contract, its events, the registry and the built-ins.

This package knows nothing of ``gateway`` or ``persistence``.
"""

from llm_adapters.base import Adapter, AdapterRequest, BaseAdapter, ChatMessage, ProviderConfig
from llm_adapters.events import (
    AdapterEvent,
    Finish,
    FinishReason,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolResult,
    Usage,
)
from llm_adapters.registry import ENTRY_POINT_GROUP, AdapterFactory, AdapterRegistry, parse_model

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "AdapterEvent",
    "AdapterFactory",
    "AdapterRegistry",
    "AdapterRequest",
    "BaseAdapter",
    "ChatMessage",
    "Finish",
    "FinishReason",
    "ProviderConfig",
    "ReasoningDelta",
    "TextDelta",
    "ToolCallDelta",
    "ToolCallEnd",
    "ToolCallStart",
    "ToolResult",
    "Usage",
    "parse_model",
]
