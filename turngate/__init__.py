"""turngate: a chat-turn gateway between browser chat frontends and LLM providers.

This top-level package holds only what every part shares: the version and the
exception tree. The application lives in ``gateway``, the database layer in
``persistence`` and the provider adapters in ``llm_adapters``.
"""

from turngate.exceptions import (
    AdapterError,
    ConfigError,
    DatabaseUnavailable,
    PersistenceError,
    RelayError,
    SchemaOutdated,
    TurngateError,
    UnknownAdapter,
    UpstreamConnectError,
    UpstreamError,
    UpstreamNotConfigured,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "ConfigError",
    "DatabaseUnavailable",
    "PersistenceError",
    "RelayError",
    "SchemaOutdated",
    "TurngateError",
    "UnknownAdapter",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamNotConfigured",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "__version__",
]
