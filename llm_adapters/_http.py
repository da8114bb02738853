"""What the HTTP adapters share: one lazy ``httpx.AsyncClient``, error mapping, retry.

:meth:`HTTPAdapter._sse_batches` posts a JSON body and yields the response's
server-sent events, those of one network read together. It sends on the aiohttp
session under the client's transport (the same connection pool) and releases the
answer in its ``finally``, so closing the generator (``aclose()`` or cancellation)
before the last event closes the upstream connection at once; an answer read to its
last event is read to its end, so its connection is reused. Failures become the
:class:`~turngate.exceptions.UpstreamError` tree (classified as the httpx exception
that says what happened, see ``_httpx_error``):

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
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import aiohttp
import anyio
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from llm_adapters._sse import SSEDecoder, SSEEvent
from llm_adapters.base import BaseAdapter, ProviderConfig
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
#: After the last event, how long and how much of the rest of an answer is read so
#: that its connection can be reused.
DRAIN_SECONDS = 0.25
DRAIN_BYTES = 64 * 1024

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
        return orjson.loads(data)
    except ValueError as exc:
        raise UpstreamProtocolError(f"{provider} stream carried malformed JSON") from exc


def dumps(body: Mapping[str, Any]) -> bytes:
    """A request body as UTF-8 JSON (orjson; ``json`` for what orjson refuses, such as
    integers beyond 64 bits)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, ensure_ascii=False).encode()


def _retry_after(response: aiohttp.ClientResponse, default: float, cap: float) -> float:
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

    def __init__(
        self, env: Mapping[str, str] | None = None, config: ProviderConfig | None = None
    ) -> None:
        """``config``: the endpoint and key to use (the gateway passes its validated
        settings); without it they are read from ``env`` as the provider's SDK reads them."""
        super().__init__(env)
        self._client: httpx.AsyncClient | None = None
        self._transport: httpx.AsyncBaseTransport | None = None
        if config is None:
            config = ProviderConfig(
                (self.env.get(self.base_url_env) or "").strip(),
                (self.env.get(self.api_key_env) or "").strip(),
            )
        self.base_url = (config.base_url.strip() or self.default_base_url).rstrip("/")
        self.api_key = config.api_key.strip()
        self._key_required = self._needs_key()

    def _needs_key(self) -> bool:
        if not self.api_key_env or not self.default_base_url:
            return False
        try:
            return httpx.URL(self.base_url).host == httpx.URL(self.default_base_url).host
        except httpx.InvalidURL:
            return False

    @property
    def key_required(self) -> bool:
        """An API key is needed on the provider's own endpoint; local and
        self-hosted OpenAI/Anthropic-compatible servers may need none."""
        return self._key_required

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
        """The adapter's client (its pool of upstream connections), made on first use."""
        if self._client is None or self._client.is_closed:
            # httpx's API on aiohttp's connections: aiohttp parses HTTP in C and hands
            # over what one network read brought, where httpx's own transport runs h11
            # and several async generators for every HTTP chunk (BENCHMARKS.md).
            self._transport = AiohttpTransport(limits=self.limits)
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=self.timeout,
                limits=self.limits,
                follow_redirects=False,
            )
        return self._client

    def _get_session(self) -> aiohttp.ClientSession:
        """The aiohttp session under the client's transport (its connection pool).

        A streamed turn is sent on it directly: it needs none of httpx's layers (auth
        flows, redirects, cookies, URL merging), and an idle stream then holds only
        aiohttp's response, not httpx's request and response around it (4–5 KiB
        each stream, BENCHMARKS.md).
        """
        self._get_client()
        transport = self._transport
        assert isinstance(transport, AiohttpTransport)
        if not isinstance(transport.client, aiohttp.ClientSession):
            transport.client = transport.get_client()
        return transport.client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _status_error(self, response: aiohttp.ClientResponse) -> UpstreamStatusError:
        body = bytearray()
        try:
            while len(body) < MAX_ERROR_BODY:
                chunk = await response.content.readany()
                if not chunk:
                    break
                body += chunk
        except (aiohttp.ClientError, TimeoutError):
            pass
        summary = ""
        try:
            summary = error_summary(json.loads(bytes(body[:MAX_ERROR_BODY])), self._secrets())
        except ValueError:
            pass
        status = response.status
        message = f"{self.name} upstream answered HTTP {status}"
        error = UpstreamStatusError(f"{message} ({summary})" if summary else message, status)
        if status in (401, 403) and not self.api_key and self.api_key_env:
            error.safe_message = (
                f"The model provider refused the request: {self.api_key_env} is not set "
                "on the gateway."
            )
        return error

    async def _sse_batches(
        self,
        url: str,
        headers: Mapping[str, str],
        body: Mapping[str, Any],
        last: Callable[[SSEEvent], bool] = lambda event: False,
    ) -> AsyncGenerator[list[SSEEvent], None]:
        """POST ``body`` as JSON to ``url`` and yield the SSE events of the answer, the
        events of each network read together.

        Once an event for which ``last`` is true arrives, what follows of the answer
        is read (``DRAIN_SECONDS``, ``DRAIN_BYTES`` at most) before that batch is
        yielded, so that the connection, read to its end, goes back to the pool for
        the next turn instead of being closed.
        """
        self.check_configured()
        session = self._get_session()
        # Only the encoded body is kept, and only until the answer's head is in: an idle
        # stream should not hold its whole request (with the history) for hours.
        payload: bytes | None = _exact(dumps(body))
        del body
        send_headers = {
            **headers,
            "content-type": "application/json",
            "accept": "text/event-stream",
        }
        t = self.timeout
        timeout = aiohttp.ClientTimeout(sock_connect=t.connect, sock_read=t.read, connect=t.pool)
        yielded = False
        for attempt in (1, 2):
            try:
                resp = await session.request(
                    "POST", url, data=payload, headers=send_headers, timeout=timeout,
                    allow_redirects=False, compress=False,
                )
                try:
                    if resp.status >= 400:
                        error = await self._status_error(resp)
                        if attempt == 1 and error.retryable:
                            delay = _retry_after(resp, self.retry_delay, self.max_retry_delay)
                            logger.warning(
                                "upstream_retry adapter=%s status=%s delay=%.2f",
                                self.name, resp.status, delay,
                            )
                            resp.release()
                            await anyio.sleep(delay)
                            continue
                        logger.warning(
                            "upstream_status adapter=%s status=%s", self.name, resp.status
                        )
                        raise error
                    payload = None  # no retry once the answer is here
                    decoder = SSEDecoder()
                    content = resp.content
                    while chunk := await content.readany():
                        events = decoder.feed(chunk)
                        chunk = b""  # not held while the stream waits for its next read
                        if not events:
                            continue
                        for i, event in enumerate(events):
                            if last(event):
                                if i:  # what came before it, without waiting
                                    yielded = True
                                    yield events[:i]
                                await _drain(content)
                                yielded = True
                                yield [event]
                                return
                        yielded = True
                        yield events
                        # Not held while the stream waits for its next read.
                        del events, event
                    events = decoder.flush()
                    if events:
                        yield events
                    return
                finally:
                    # Back to the pool if the answer was read to its end, else closed.
                    resp.release()
                    await resp.wait_for_close()
            except UpstreamError:
                raise
            except Exception as exc:
                http_error = _httpx_error(exc)
                if http_error is None:
                    raise
                if isinstance(http_error, httpx.ConnectError):
                    if attempt == 1 and not yielded and payload is not None:
                        logger.warning("upstream_retry adapter=%s reason=connect", self.name)
                        await anyio.sleep(self.retry_delay)
                        continue
                    raise UpstreamConnectError(
                        f"{self.name} upstream could not be reached"
                    ) from http_error
                if isinstance(http_error, httpx.TimeoutException):
                    # A connect or pool timeout: the request never left this process.
                    unsent = isinstance(http_error, httpx.ConnectTimeout | httpx.PoolTimeout)
                    raise UpstreamTimeout(
                        f"{self.name} upstream timed out ({type(http_error).__name__})",
                        reached_provider=not (unsent and not yielded),
                    ) from http_error
                raise UpstreamProtocolError(
                    f"{self.name} upstream transport failed ({type(http_error).__name__})"
                ) from http_error
        raise UpstreamError(f"{self.name} upstream: retries exhausted")  # pragma: no cover


async def _drain(content: aiohttp.StreamReader) -> None:
    """Read what is left of an answer whose last event has arrived, within bounds; a
    failure here changes nothing (the events are complete), the connection is then
    closed instead of reused."""
    size = 0
    with anyio.move_on_after(DRAIN_SECONDS):
        try:
            while chunk := await content.readany():
                size += len(chunk)
                if size > DRAIN_BYTES:
                    return
        except (aiohttp.ClientError, TimeoutError):
            return


def _exact(data: bytes) -> bytes:
    """``data`` in a buffer of its own size (orjson's result keeps the buffer it grew
    in: about 4 KiB, even for a short body)."""
    return bytes(memoryview(data))


def _httpx_error(exc: BaseException) -> httpx.HTTPError | None:
    """What happened to the request, as the httpx exception that says it, or None for
    an exception that is no transport failure.

    The aiohttp transport maps aiohttp's exceptions coarsely (a refused connection
    comes out as ``ConnectTimeout``) and lets a plain ``TimeoutError`` through, so
    the aiohttp exception underneath decides.
    """
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) else exc
    text = str(cause) or type(cause).__name__
    mapped: httpx.HTTPError
    if isinstance(cause, aiohttp.ClientConnectorError):
        mapped = httpx.ConnectError(text)
    elif isinstance(cause, aiohttp.ConnectionTimeoutError):
        mapped = httpx.ConnectTimeout(text)
    elif isinstance(cause, aiohttp.SocketTimeoutError):
        mapped = httpx.ReadTimeout(text)
    elif isinstance(cause, TimeoutError):  # aiohttp's wait for a pooled connection
        mapped = httpx.PoolTimeout(text)
    elif isinstance(exc, httpx.HTTPError):
        return exc
    elif isinstance(cause, aiohttp.ClientError):
        mapped = httpx.RemoteProtocolError(text)
    else:
        return None
    mapped.__cause__ = cause
    return mapped


__all__ = ["HTTPAdapter", "as_int", "error_summary", "loads", "safe_token"]
