"""The one exception tree of turngate.

It lives in this leaf module so that ``persistence`` and ``llm_adapters`` can
raise members of the same tree without importing each other or ``gateway``.

    TurngateError
    ├── ConfigError                 a setting has a bad value (names the variable)
    ├── PersistenceError
    │   ├── DatabaseUnavailable     the database cannot be reached or timed out
    │   └── SchemaOutdated          the schema is older than this code; run `turngate migrate`
    ├── RelayError                  the multi-replica relay (Redis) is unreachable
    └── AdapterError
        ├── UnknownAdapter          a model string names no registered adapter
        └── UpstreamError           the provider failed; never shown verbatim to a browser
            ├── UpstreamNotConfigured   the adapter lacks a setting (its API key): nothing sent
            ├── UpstreamConnectError
            ├── UpstreamTimeout
            ├── UpstreamStatusError     a 4xx/5xx answer (``status_code``, ``retryable``)
            └── UpstreamProtocolError   malformed stream, or an error inside the stream

Adapters convert provider errors with ``raise UpstreamTimeout(...) from exc``.
The messages of ``UpstreamError`` are for logs and must not contain secrets or
raw provider bodies; the browser only ever sees ``safe_message``.
"""

from __future__ import annotations


class TurngateError(Exception):
    """Base class of every error turngate raises on purpose."""


class ConfigError(TurngateError):
    """A configuration value is invalid; the message names the variable."""


class PersistenceError(TurngateError):
    """The database layer could not do what was asked."""


class DatabaseUnavailable(PersistenceError):
    """The database is unreachable, or the statement ran past its deadline."""


class SchemaOutdated(PersistenceError):
    """The database schema is older than this version of turngate."""


class RelayError(TurngateError):
    """The relay between replicas (Redis) is unreachable."""


class AdapterError(TurngateError):
    """Base class of LLM adapter errors."""


class UnknownAdapter(AdapterError):
    """A model string names an adapter that is not registered."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = sorted(available)
        super().__init__(
            f"unknown adapter {name!r}: model must be \"<adapter>:<model>\" "
            f"with adapter one of {', '.join(self.available)}"
        )


class UpstreamError(AdapterError):
    """The upstream provider failed.

    ``safe_message`` is what the browser may see; ``retryable`` says whether
    repeating the request (before anything was streamed) may succeed.
    """

    safe_message = "The model provider failed to answer."
    retryable = False
    #: False when the request certainly never reached the provider (no connection was
    #: made, or it was never sent): such a call costs nothing and is not estimated.
    reached_provider = True


class UpstreamNotConfigured(UpstreamError):
    """The adapter cannot call its provider as configured (a missing API key).

    Its ``safe_message`` names the missing setting, never a value.
    """

    reached_provider = False

    def __init__(self, message: str, safe_message: str) -> None:
        super().__init__(message)
        self.safe_message = safe_message


class UpstreamConnectError(UpstreamError):
    """The provider could not be reached."""

    safe_message = "The model provider could not be reached."
    retryable = True
    reached_provider = False


class UpstreamTimeout(UpstreamError):
    """The provider did not answer in time."""

    safe_message = "The model provider timed out."
    retryable = True

    def __init__(self, message: str, *, reached_provider: bool = True) -> None:
        super().__init__(message)
        self.reached_provider = reached_provider


class UpstreamStatusError(UpstreamError):
    """The provider answered with an HTTP error status."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retryable = status_code == 429 or status_code >= 500
        if status_code == 429:
            self.safe_message = "The model provider is rate limiting requests."
        elif status_code in (401, 403):
            self.safe_message = "The model provider refused the gateway's credentials."


class UpstreamProtocolError(UpstreamError):
    """The provider's stream was malformed or reported an error mid-stream."""

    safe_message = "The model provider's stream failed."
