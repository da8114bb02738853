"""JSON errors: ``{"error": {"code", "message"}}`` and nothing else, ever.

Handlers turn every exception that reaches Starlette into such a body, so a
client never sees a traceback or an internal exception's text. The AI SDK routes
(``/api/...``) answer the same error as a plain-text sentence with the code in the
``x-turngate-error-code`` header, since ``useChat`` shows the body as the message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from turngate.exceptions import PersistenceError

logger = logging.getLogger("turngate.gateway")


class ApiError(Exception):
    """An error answered to the client as a JSON body with an HTTP status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON error response every route uses."""
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


# useChat shows a failed response's body text as the chat's error message, so the
# routes it calls answer with a sentence; the code goes in a header.
AISDK_PREFIX = "/api/"
ERROR_CODE_HEADER = "x-turngate-error-code"


def sentence(message: str) -> str:
    """``message`` as a sentence a person reads: capital first letter, final stop."""
    text = message.strip()
    if not text:
        return "The request failed."
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def _respond(
    request: Request, status: int, code: str, message: str,
    headers: Mapping[str, str] | None = None,
) -> Response:
    if request.url.path.startswith(AISDK_PREFIX):
        return PlainTextResponse(
            sentence(message), status_code=status,
            headers={**(headers or {}), ERROR_CODE_HEADER: code},
        )
    return error_response(status, code, message, headers)


def not_found(what: str = "thread") -> ApiError:
    """The one 404 for missing and foreign resources alike (no existence leak)."""
    return ApiError(404, f"{what}_not_found", f"{what} not found")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _respond(request, exc.status, exc.code, exc.message, exc.headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return _respond(request, exc.status_code, code, message, exc.headers)


# How long a client is told to wait after a database failure: a pool frees up or a
# statement times out within seconds; a longer outage just gets asked again.
DATABASE_RETRY_AFTER = "2"


def database_unavailable() -> ApiError:
    """The one 503 of every route while the database cannot answer (no driver text)."""
    return ApiError(
        503, "database_unavailable",
        "the database is unavailable or busy (timed out, or no connection free); retry later",
        {"Retry-After": DATABASE_RETRY_AFTER},
    )


async def _persistence_error(request: Request, exc: Exception) -> Response:
    # A database outage, lock or exhausted pool is not a bug in the gateway: one line,
    # no traceback (the store already logged the driver's cause), and a 503 the client
    # can retry, whichever route's statement met it.
    logger.warning(
        "database_unavailable path=%s error=%s", request.url.path, str(exc)[:300],
        extra={"event": "database_unavailable", "path": request.url.path},
    )
    error = database_unavailable()
    return _respond(request, error.status, error.code, error.message, error.headers)


async def _client_disconnect(request: Request, exc: Exception) -> Response:
    # The client went away while its body was being read: its doing, not a server
    # error. Nobody reads the answer; it only ends the request.
    logger.info(
        "client_disconnected path=%s while=reading_body", request.url.path,
        extra={"event": "client_disconnected", "path": request.url.path},
    )
    return _respond(request, 400, "client_disconnected", "the client closed the connection")


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.error(
        "unhandled_error path=%s error=%s", request.url.path, type(exc).__name__, exc_info=exc
    )
    return _respond(request, 500, "internal_error", "internal error")


EXCEPTION_HANDLERS = {
    ApiError: _api_error,
    HTTPException: _http_exception,
    PersistenceError: _persistence_error,
    ClientDisconnect: _client_disconnect,
    Exception: _unexpected,
}

__all__ = [
    "DATABASE_RETRY_AFTER",
    "EXCEPTION_HANDLERS",
    "ApiError",
    "database_unavailable",
    "error_response",
    "not_found",
]
