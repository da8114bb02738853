"""Bearer API keys: every route but health and metrics needs one."""

from __future__ import annotations

from starlette.requests import Request

from gateway.errors import ApiError
from persistence import Store
from turngate.exceptions import PersistenceError

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="turngate"'}


def bearer_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer <key>``, if well formed."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


async def authenticate(request: Request, store: Store) -> int:
    """The caller's user id; 401 for a missing, unknown or revoked key."""
    key = bearer_key(request)
    if key is None:
        raise ApiError(
            401, "unauthorized", "missing API key: send \"Authorization: Bearer <key>\"",
            _CHALLENGE,
        )
    try:
        user_id = await store.authenticate(key)
    except PersistenceError:
        raise ApiError(
            503, "database_unavailable", "the database is unavailable; retry later",
            {"Retry-After": "2"},
        ) from None
    if user_id is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", _CHALLENGE)
    return user_id


__all__ = ["authenticate", "bearer_key"]
