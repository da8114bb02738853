"""Shared test configuration.

Fixtures live in plugin modules, one per area, so that they can grow
independently: ``tests/fixtures_db.py`` (databases), ``tests/fixtures_server.py``
(a real uvicorn server on 127.0.0.1).
"""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures_db", "tests.fixtures_server"]


@pytest.fixture
def anyio_backend() -> str:
    # `databases` is asyncio-only (it uses asyncio.current_task).
    return "asyncio"
