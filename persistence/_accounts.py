"""Users and API keys."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

from persistence._base import _StoreBase, utcnow_text
from persistence._sql import Conn

KEY_PREFIX = "tg_"
KEY_PREFIX_LEN = 8
KEY_SECRET_LEN = 43  # len(secrets.token_urlsafe(32))
_PREFIX_ALPHABET = string.ascii_letters + string.digits
_URLSAFE = frozenset(string.ascii_letters + string.digits + "-_")


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """``(prefix, secret)`` of a ``tg_<prefix>_<secret>`` key, by position (a prefix
    made before they were letters and digits may contain ``_``); None if malformed."""
    if len(key) != len(KEY_PREFIX) + KEY_PREFIX_LEN + 1 + KEY_SECRET_LEN:
        return None
    if not key.startswith(KEY_PREFIX) or key[len(KEY_PREFIX) + KEY_PREFIX_LEN] != "_":
        return None
    prefix = key[len(KEY_PREFIX) : len(KEY_PREFIX) + KEY_PREFIX_LEN]
    secret = key[len(KEY_PREFIX) + KEY_PREFIX_LEN + 1 :]
    if not (set(prefix) <= _URLSAFE and set(secret) <= _URLSAFE):
        return None
    return prefix, secret


class _AccountsMixin(_StoreBase):
    async def create_user(self, name: str) -> int:
        """Return the id of user ``name``, creating the user if needed (idempotent)."""
        if not name or not name.strip():
            raise ValueError("a user name must not be empty")
        now = utcnow_text()

        async def op(conn: Conn) -> tuple[int, str]:
            new_id = await conn.fetch_val(
                "INSERT INTO users (name, created_at) VALUES (:name, :now) "
                "ON CONFLICT (name) DO NOTHING RETURNING id",
                {"name": name, "now": self._ts_param(now)},
            )
            if new_id is not None:
                return int(new_id), "inserted"
            found = await conn.fetch_val("SELECT id FROM users WHERE name = :name", {"name": name})
            return int(found), "race_recovered"

        return await self._write("create_user", op, user_name=name)

    async def user_name(self, user_id: int) -> str | None:
        """The name of user ``user_id``, or None if there is none."""
        name = await self._run(
            lambda c: c.fetch_val("SELECT name FROM users WHERE id = :id", {"id": user_id})
        )
        return None if name is None else str(name)

    async def count_users(self) -> int:
        """How many users exist (the CLI creates a local user on an empty database)."""
        return int(await self._run(lambda c: c.fetch_val("SELECT count(*) FROM users")))

    async def create_api_key(self, user_id: int) -> str:
        """Make a new key for ``user_id``; the plaintext is returned once, only its hash kept."""
        secret = secrets.token_urlsafe(32)
        now = utcnow_text()

        async def op(conn: Conn) -> tuple[str, str]:
            # 62**8 (about 2**47) prefixes: a collision is practically impossible,
            # but cheap to survive. Letters and digits only: a prefix that starts
            # with "-" reads as an option to `turngate keys revoke <prefix>`.
            for _ in range(5):
                prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(KEY_PREFIX_LEN))
                new_id = await conn.fetch_val(
                    "INSERT INTO api_keys (user_id, prefix, secret_hash, created_at) "
                    "VALUES (:user_id, :prefix, :secret_hash, :now) "
                    "ON CONFLICT (prefix) DO NOTHING RETURNING id",
                    {
                        "user_id": user_id,
                        "prefix": prefix,
                        "secret_hash": _hash_secret(secret),
                        "now": self._ts_param(now),
                    },
                )
                if new_id is not None:
                    return f"{KEY_PREFIX}{prefix}_{secret}", "inserted"
            raise RuntimeError("could not find a free key prefix")

        return await self._write("create_api_key", op, user_id=user_id)

    async def revoke_api_key(self, prefix: str) -> bool:
        """Revoke the key with this prefix; False if there is no such active key."""
        now = utcnow_text()

        async def op(conn: Conn) -> tuple[bool, str]:
            revoked = await conn.fetch_val(
                "UPDATE api_keys SET revoked_at = :now "
                "WHERE prefix = :prefix AND revoked_at IS NULL RETURNING id",
                {"prefix": prefix, "now": self._ts_param(now)},
            )
            return revoked is not None, "ok" if revoked is not None else "row_missing"

        return await self._write("revoke_api_key", op, key_prefix=prefix)

    async def authenticate(self, key: str) -> int | None:
        """The user id of a valid, unrevoked key, else None.

        One query by prefix; the hash is compared in constant time. A malformed
        key is refused without touching the database. Raises
        ``DatabaseUnavailable`` if the database cannot answer.
        """
        parts = split_key(key)
        if parts is None:
            return None
        prefix, secret = parts
        row = await self._run(
            lambda c: c.fetch_one(
                "SELECT user_id, secret_hash, revoked_at FROM api_keys WHERE prefix = :prefix",
                {"prefix": prefix},
            )
        )
        if row is None:
            return None
        if not hmac.compare_digest(str(row["secret_hash"]), _hash_secret(secret)):
            return None
        if row["revoked_at"] is not None:
            return None
        return int(row["user_id"])
