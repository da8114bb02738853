"""Bearer API keys: every route but health and metrics needs one.

Every route authenticates with ``store.authenticate`` (one query). The one
exception is starting a new turn with a key this process has already seen:
``cached_key`` finds its user in the app's ``KeyMap`` (``AppContext.keys``), and
the turn's ``open_turn`` statement re-checks the key (exists, unrevoked, that
user) before writing anything, so a revoked key still fails on its very next
request.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from starlette.requests import Request

from gateway.api.errors import ApiError, database_unavailable
from persistence import Store, split_key
from turngate.exceptions import PersistenceError

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="turngate"'}
KEY_CACHE_SIZE = 10_000
# "Bearer " and a 55-character key, with room to spare: anything longer cannot be a
# key, and is refused on its length before it is split, hashed or looked up.
MAX_AUTHORIZATION_BYTES = 1024


@dataclass(frozen=True, slots=True)
class CachedKey:
    """A request's key, found in the map: its user, and what ``open_turn`` re-checks."""

    user_id: int
    prefix: str
    secret_hash: str
    key: str = field(repr=False)


class KeyMap:
    """(prefix, sha256 hex of the secret) to user id of keys that authenticated here.

    One per app (``AppContext.keys``): user ids mean something only in that app's
    database.

    A key's user never changes, so an entry can only be stale about revocation;
    whoever uses one must re-check that in the database. Least recently used out.
    """

    def __init__(self, size: int = KEY_CACHE_SIZE) -> None:
        self._size = size
        self._users: OrderedDict[tuple[str, str], int] = OrderedDict()

    def get(self, ident: tuple[str, str]) -> int | None:
        user_id = self._users.get(ident)
        if user_id is not None:
            self._users.move_to_end(ident)
        return user_id

    def put(self, ident: tuple[str, str], user_id: int) -> None:
        self._users[ident] = user_id
        self._users.move_to_end(ident)
        while len(self._users) > self._size:
            self._users.popitem(last=False)

    def discard(self, ident: tuple[str, str]) -> None:
        self._users.pop(ident, None)

    def __len__(self) -> int:
        return len(self._users)


def _ident(key: str) -> tuple[str, str] | None:
    parts = split_key(key)
    if parts is None:
        return None
    prefix, secret = parts
    return prefix, hashlib.sha256(secret.encode()).hexdigest()


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "invalid or revoked API key", _CHALLENGE)


def authorization_too_long(size: int) -> ApiError:
    """401 for an ``Authorization`` header too long to hold a key."""
    return ApiError(
        401, "unauthorized",
        f"the Authorization header has {size} bytes; expected \"Bearer <key>\" of at most "
        f"{MAX_AUTHORIZATION_BYTES} bytes",
        _CHALLENGE,
    )


def bearer_key(request: Request) -> str | None:
    """The key from ``Authorization: Bearer <key>``, if well formed."""
    header = request.headers.get("authorization", "")
    if len(header) > MAX_AUTHORIZATION_BYTES:
        raise authorization_too_long(len(header))
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


async def authenticate_key(key: str | None, store: Store, keys: KeyMap) -> int:
    """The user id of ``key`` as the database says now; 401 for a missing, unknown or
    revoked key. Remembers a good key for ``cached_key``, forgets a refused one."""
    if key is None:
        raise ApiError(
            401, "unauthorized", "missing API key: send \"Authorization: Bearer <key>\"",
            _CHALLENGE,
        )
    try:
        user_id = await store.authenticate(key)
    except PersistenceError:
        raise database_unavailable() from None
    ident = _ident(key)
    if user_id is None:
        if ident is not None:
            keys.discard(ident)
        raise unauthorized()
    if ident is not None:
        keys.put(ident, user_id)
    return user_id


async def authenticate(request: Request, store: Store, keys: KeyMap) -> int:
    """The caller's user id; 401 for a missing, unknown or revoked key."""
    return await authenticate_key(bearer_key(request), store, keys)


def cached_key(request: Request, keys: KeyMap) -> CachedKey | None:
    """The request's key if it authenticated here before, without a query.

    Only for a caller that has the database re-check the key in the statement that
    acts on it (``open_turn(key_prefix=..., key_hash=...)``), or calls
    ``authenticate_key`` before anything else is read or written.
    """
    key = bearer_key(request)
    ident = _ident(key) if key is not None else None
    if key is None or ident is None:
        return None
    user_id = keys.get(ident)
    if user_id is None:
        return None
    return CachedKey(user_id, ident[0], ident[1], key)


def forget_key(keys: KeyMap, cached: CachedKey) -> None:
    """Drop a key the database refused."""
    keys.discard((cached.prefix, cached.secret_hash))


__all__ = [
    "MAX_AUTHORIZATION_BYTES",
    "CachedKey",
    "KeyMap",
    "authenticate",
    "authenticate_key",
    "authorization_too_long",
    "bearer_key",
    "cached_key",
    "forget_key",
    "unauthorized",
]
