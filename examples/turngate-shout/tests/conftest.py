import pytest


@pytest.fixture
def anyio_backend() -> str:
    # turngate's database layer is asyncio-only.
    return "asyncio"
