"""A third-party adapter registered through the ``turngate.adapters`` entry point.

The package lives in ``tests/third_party_adapter``. ``scripts/test.sh`` should
install it; if it is not installed, this test installs it (from a copy, so the
source tree stays clean) with the venv's pip.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from llm_adapters import AdapterRegistry, AdapterRequest, ChatMessage, Finish, TextDelta, Usage
from tests.upstream_fakes import run_adapter

PACKAGE_DIR = Path(__file__).parent / "third_party_adapter"


def ensure_installed(tmp_path: Path) -> None:
    if any(ep.name == "echo2" for ep in entry_points(group="turngate.adapters")):
        return
    source = tmp_path / "echo2-src"
    shutil.copytree(PACKAGE_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(source)],
        check=True,
        timeout=240,
    )
    importlib.invalidate_caches()
    assert any(ep.name == "echo2" for ep in entry_points(group="turngate.adapters"))


@pytest.mark.anyio
async def test_entry_point_adapter_streams(tmp_path: Path) -> None:
    ensure_installed(tmp_path)
    registry = AdapterRegistry({**os.environ, "ECHO2_PREFIX": "echo:"})
    assert "echo2" in registry.names
    assert {"scripted", "openai", "anthropic"} <= set(registry.names)
    adapter = registry.get("echo2")
    assert adapter.name == "echo2"
    assert type(adapter).__module__ == "turngate_echo2"
    assert "site-packages" in str(sys.modules["turngate_echo2"].__file__)
    request = AdapterRequest(
        "v1",
        [
            ChatMessage("user", [{"type": "text", "text": "first turn"}]),
            ChatMessage("assistant", [{"type": "text", "text": "ok"}]),
            ChatMessage("user", [{"type": "text", "text": "one two three"}]),
        ],
    )
    run = await run_adapter(adapter, request)
    assert run.error is None
    assert [e.text for e in run.of(TextDelta)] == ["echo: ", "three ", "two ", "one "]
    assert run.events[-2:] == [Usage("echo2:v1", 6, 4), Finish("stop")]
    await registry.aclose()


def test_an_adapter_that_fails_to_load_is_logged_with_its_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[object] = []

    def broken(env: object) -> Any:
        calls.append(env)
        raise RuntimeError("the package's own bug")

    registry = AdapterRegistry({})
    registry.register("broken", broken)
    caplog.set_level(logging.ERROR, logger="turngate.adapters")
    with pytest.raises(RuntimeError, match="own bug"):
        registry.get("broken")
    [record] = [r for r in caplog.records if r.name == "turngate.adapters"]
    assert record.getMessage() == "adapter_load_failed adapter=broken"
    assert record.exc_info is not None and "own bug" in str(record.exc_info[1])
    with pytest.raises(RuntimeError):
        registry.get("broken")
    assert len(calls) == 2, "tried again on the next call"
