"""A third-party adapter registered through the ``turngate.adapters`` entry point.

The package lives in ``tests/third_party_adapter``. ``scripts/test.sh`` should
install it; if it is not installed, this test installs it (from a copy, so the
source tree stays clean) with the venv's pip.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

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
