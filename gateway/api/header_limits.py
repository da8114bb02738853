"""Limits on request headers, checked before any route sees the request.

The HTTP parser (httptools) has no limit of its own on the number or size of
header fields: 20,000 headers or a 16 MiB ``Authorization`` reached the routes,
which then walked, copied and parsed them. This middleware answers such a
request at once, with the JSON error body of every route and ``connection:
close`` (a client that sends that much is not worth keeping the connection of).
It cannot stop the parser from buffering what was sent; bounding that (and the
time a client may take to send its headers) belongs to the server's protocol
layer.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.auth import MAX_AUTHORIZATION_BYTES, authorization_too_long

# Browsers send 10-30 header fields; proxies add a handful. 100 leaves room for both.
# The protocol guard of `turngate serve` (gateway/ops/http_guard.py) holds heads to it too.
MAX_HEADERS = 100


class HeaderLimits:
    """ASGI middleware: 431 for too many or too large headers, 401 for a huge key."""

    def __init__(self, app: ASGIApp, max_header_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes  # TURNGATE_MAX_HEADER_BYTES

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # The app's own awaitable is handed back, not awaited here: no frame of this
        # middleware is held for as long as a request (a stream: hours) runs.
        if scope["type"] == "http":
            refusal = _refusal(scope["headers"], self.max_header_bytes)
            if refusal is not None:
                return _answer(send, *refusal)
        return self.app(scope, receive, send)


def _refusal(
    headers: list[tuple[bytes, bytes]], max_bytes: int
) -> tuple[int, str, str, list[tuple[bytes, bytes]]] | None:
    """(status, code, message, extra headers) for headers over a limit, else None."""
    if len(headers) > MAX_HEADERS:
        return (431, "too_many_headers",
                f"the request has {len(headers)} header fields; expected at most "
                f"{MAX_HEADERS}", [])
    total = 0
    largest = (0, b"")
    authorization = 0
    for name, value in headers:
        size = len(name) + len(value)
        total += size
        if size > largest[0]:
            largest = (size, name)
        if name == b"authorization":
            authorization = max(authorization, len(value))
    if total > max_bytes:
        shown = largest[1][:40].decode("latin-1")
        return (431, "headers_too_large",
                f"the request's header fields total {total} bytes (the largest, {shown!r}, "
                f"{largest[0]} bytes); expected at most {max_bytes} bytes in all", [])
    if authorization > MAX_AUTHORIZATION_BYTES:
        # Refused on its length alone: it is never split, hashed or looked up.
        error = authorization_too_long(authorization)
        extra = [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        return error.status, error.code, error.message, extra
    return None


async def _answer(
    send: Send, status: int, code: str, message: str, extra: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *extra,
        ],
    })
    await send({"type": "http.response.body", "body": body})


__all__ = ["MAX_HEADERS", "HeaderLimits"]
