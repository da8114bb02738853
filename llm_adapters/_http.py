"""What the HTTP adapters share: one lazy ``httpx.AsyncClient``, error mapping, retry.

:meth:`HTTPAdapter._sse_events` posts a JSON body and yields the response's
server-sent events. It runs inside ``async with client.stream(...)``, so closing
the generator (``aclose()`` or cancellation) closes the upstream connection at
once. Failures become the :class:`~turngate.exceptions.UpstreamError` tree:

- no API key where the provider's own endpoint needs one -> ``UpstreamNotConfigured``
  naming the variable, before anything is sent;
- ``httpx.ConnectError`` (refused, DNS) -> ``UpstreamConnectError`` (retried once);
- any ``httpx.TimeoutException`` -> ``UpstreamTimeout`` (a connect or pool timeout
  with ``reached_provider=False``: the request was never sent);
- HTTP 4xx/5xx -> ``UpstreamStatusError`` (429 and 5xx retried once); the body
  is read (bounded) only to pick the provider's error ``type``/``code``, and the
  message never holds the body, the key or the URL;
- other transport failures mid-stream -> ``UpstreamProtocolError``.

Retries happen only before the first event was read, so nothing has been
yielded to the caller yet.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

import anyio
import httpx

from llm_adapters._sse import SSEEvent, aiter_sse
from llm_adapters.base import BaseAdapter
from turngate.exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamNotConfigured,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)

logger = logging.getLogger("turngate.adapters")

#: How much of an error body is read to find the provider's error type.
MAX_ERROR_BODY = 64 * 1024

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def safe_token(value: Any, secrets: tuple[str, ...] = ()) -> str | None:
    """``value`` as a short identifier-like string, or None if it is anything else.

    Provider error ``type``/``code`` fields pass; free text, and anything that
    contains a secret, does not.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    if not _SAFE_TOKEN.match(text):
        return None
    if any(s and (s in text or text in s) for s in secrets):
        return None
    return text


def error_summary(payload: Any, secrets: tuple[str, ...] = ()) -> str:
    """A log-safe ``type=... code=...`` summary of a provider error object."""
    if isinstance(payload, Mapping) and isinstance(payload.get("error"), Mapping):
        payload = payload["error"]
    if not isinstance(payload, Mapping):
        return ""
    parts = []
    for key in ("type", "code"):
        token = safe_token(payload.get(key), secrets)
        if token is not None:
            parts.append(f"{key}={token}")
    return " ".join(parts)


def as_int(value: Any) -> int | None:
    """A token count from JSON (int, or a float with no fraction), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def loads(data: str, provider: str) -> Any:
    """Parse one event's JSON; malformed JSON is an ``UpstreamProtocolError``."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise UpstreamProtocolError(f"{provider} stream carried malformed JSON") from exc


def _retry_after(response: httpx.Response, default: float, cap: float) -> float:
    raw = response.headers.get("retry-after", "")
    try:
        return max(0.0, min(float(raw), cap))
    except ValueError:
        return default


class HTTPAdapter(BaseAdapter):
    """Base of adapters that stream SSE over one shared ``httpx.AsyncClient``."""

    #: connect / read-between-chunks / write / pool timeouts, in seconds
    timeout = httpx.Timeout(connect=10.0, read=300.0, write=30.0, pool=30.0)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    #: seconds to wait before the single retry (a ``Retry-After`` header wins, capped)
    retry_delay = 0.5
    max_retry_delay = 5.0

    #: where the endpoint and key come from, named as each provider's own SDK reads them
    base_url_env = ""
    api_key_env = ""
    default_base_url = ""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env)
        self._client: httpx.AsyncClient | None = None
        base = (self.env.get(self.base_url_env) or "").strip() or self.default_base_url
        self.base_url = base.rstrip("/")
        self.api_key = (self.env.get(self.api_key_env) or "").strip()

    @property
    def key_required(self) -> bool:
        """An API key is needed on the provider's own endpoint; local and
        self-hosted OpenAI/Anthropic-compatible servers may need none."""
        if not self.api_key_env or not self.default_base_url:
            return False
        try:
            return httpx.URL(self.base_url).host == httpx.URL(self.default_base_url).host
        except httpx.InvalidURL:
            return False

    def check_configured(self) -> None:
        """Raise ``UpstreamNotConfigured`` if a call could only fail for want of a key."""
        if self.key_required and not self.api_key:
            raise UpstreamNotConfigured(
                f"{self.name}: {self.api_key_env} is not set",
                f"The {self.name} adapter cannot call its provider: {self.api_key_env} "
                "is not set on the gateway.",
            )

    def _secrets(self) -> tuple[str, ...]:
        return (self.api_key,) if self.api_key else ()

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(
                timeout=self.timeout, limits=self.limits, follow_redirects=False
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _status_error(self, response: httpx.Response) -> UpstreamStatusError:
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= MAX_ERROR_BODY:
                    break
        except httpx.HTTPError:
            pass
        summary = ""
        try:
            summary = error_summary(json.loads(bytes(body[:MAX_ERROR_BODY])), self._secrets())
        except ValueError:
            pass
        status = response.status_code
        message = f"{self.name} upstream answered HTTP {status}"
        error = UpstreamStatusError(f"{message} ({summary})" if summary else message, status)
        if status in (401, 403) and not self.api_key and self.api_key_env:
            error.safe_message = (
                f"The model provider refused the request: {self.api_key_env} is not set "
                "on the gateway."
            )
        return error

    async def _sse_events(
        self, url: str, headers: Mapping[str, str], body: Mapping[str, Any]
    ) -> AsyncGenerator[SSEEvent, None]:
        """POST ``body`` as JSON to ``url`` and yield the SSE events of the answer."""
        self.check_configured()
        client = self._get_client()
        payload = json.dumps(body, ensure_ascii=False).encode()
        send_headers = {
            **headers,
            "content-type": "application/json",
            "accept": "text/event-stream",
        }
        yielded = False
        for attempt in (1, 2):
            try:
                request = client.stream("POST", url, content=payload, headers=send_headers)
                async with request as resp:
                    if resp.status_code >= 400:
                        error = await self._status_error(resp)
                        if attempt == 1 and error.retryable:
                            delay = _retry_after(resp, self.retry_delay, self.max_retry_delay)
                            logger.warning(
                                "upstream_retry adapter=%s status=%s delay=%.2f",
                                self.name, resp.status_code, delay,
                            )
                            await resp.aclose()
                            await anyio.sleep(delay)
                            continue
                        logger.warning(
                            "upstream_status adapter=%s status=%s", self.name, resp.status_code
                        )
                        raise error
                    async with aclosing(aiter_sse(resp.aiter_bytes())) as events:
                        async for event in events:
                            yielded = True
                            yield event
                    return
            except httpx.ConnectError as exc:
                if attempt == 1 and not yielded:
                    logger.warning("upstream_retry adapter=%s reason=connect", self.name)
                    await anyio.sleep(self.retry_delay)
                    continue
                raise UpstreamConnectError(f"{self.name} upstream could not be reached") from exc
            except httpx.TimeoutException as exc:
                # A connect or pool timeout: the request never left this process.
                unsent = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
                raise UpstreamTimeout(
                    f"{self.name} upstream timed out ({type(exc).__name__})",
                    reached_provider=not (unsent and not yielded),
                ) from exc
            except httpx.HTTPError as exc:
                raise UpstreamProtocolError(
                    f"{self.name} upstream transport failed ({type(exc).__name__})"
                ) from exc
        raise UpstreamError(f"{self.name} upstream: retries exhausted")  # pragma: no cover


__all__ = ["HTTPAdapter", "as_int", "error_summary", "loads", "safe_token"]
