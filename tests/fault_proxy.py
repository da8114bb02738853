"""A TCP proxy in front of PostgreSQL that a test cuts or stalls: real faults on the
gateway's own connections, without touching the shared server."""

from __future__ import annotations

import asyncio

from tests.fixtures_db import PG_HOST, PG_PORT, RoundTripProxy


class FaultProxy(RoundTripProxy):
    """``RoundTripProxy`` that can also fail like a database does.

    - ``cut()``: stop listening and reset every open connection (a server that died);
      ``restore()`` listens on the same port again.
    - ``stall()``: connections stay open but no byte moves either way, new ones
      included (a hung server or a black-holed network); ``flow()`` ends it.
    ``connections`` counts the connections the proxy accepted.
    """

    def __init__(self, target_host: str = PG_HOST, target_port: int = PG_PORT) -> None:
        super().__init__(target_host, target_port)
        self.connections = 0
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def cut(self) -> None:
        await self.close()

    async def restore(self) -> None:
        await self.start()

    def stall(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await super()._handle(reader, writer)

    async def _before_forward(self) -> None:
        # Held here while stalled: read, but never passed on.
        await self._flowing.wait()


__all__ = ["FaultProxy"]
