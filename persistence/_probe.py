"""The readiness probe: one bounded round trip on the store's own pool."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from persistence._base import _StoreBase
from persistence._health import failure_reason
from persistence._sql import Conn

logger = logging.getLogger("turngate.persistence")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """``status``: ``ok`` or a ``failure_reason``; ``revision``: the schema's, if any."""

    status: str
    revision: str | None = None


class _HealthMixin(_StoreBase):
    async def probe(self) -> ProbeResult:
        """One readiness round trip on the store's own pool: a connection, a read of
        ``messages`` (which waits on a lock held on that table) and the schema revision.

        Bounded by the store's own timeouts; a caller that needs an answer sooner
        waits for it in another task. Never raises.
        """

        async def op(conn: Conn) -> ProbeResult:
            if conn.is_pg:
                exists = await conn.fetch_val("SELECT to_regclass('alembic_version') IS NOT NULL")
            else:
                exists = await conn.fetch_val(
                    "SELECT count(*) FROM sqlite_master "
                    "WHERE type = 'table' AND name = 'alembic_version'"
                )
            if not exists:
                return ProbeResult("ok")
            revision = await conn.fetch_val("SELECT version_num FROM alembic_version LIMIT 1")
            await conn.fetch_val("SELECT count(*) FROM (SELECT 1 FROM messages LIMIT 1) AS m")
            return ProbeResult("ok", None if revision is None else str(revision))

        try:
            return await self._run(op)
        except Exception as exc:
            status = failure_reason(exc) or "error"
            logger.warning("readiness probe failed (%s): %s", status, exc)
            return ProbeResult(status)


__all__ = ["ProbeResult"]
