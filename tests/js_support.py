"""Running the Node scripts of tests/js from pytest (the AI SDK client, the browser).

The npm packages are pinned in tests/js/package-lock.json; scripts/test.sh runs
``npm ci`` there, and ``node_modules`` is installed here too if it is missing.
Without Node (or Chromium for the browser tests) a test is skipped on a
developer's machine and FAILS under ``CI=true``: CI must never pass by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

JS_DIR = Path(__file__).parent / "js"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


def missing(what: str) -> None:
    """Fail under CI, skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is required under CI=true (scripts/test.sh installs it)")
    pytest.skip(f"{what} is not available")


def require_node() -> str:
    node = shutil.which("node")
    if node is None:
        missing("Node.js (node)")
    assert node is not None
    if not (JS_DIR / "node_modules" / "ai" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            missing("npm")
        assert npm is not None
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS_DIR, check=True, timeout=300,
        )
    return node


def require_chromium() -> str:
    if not os.path.exists(CHROMIUM):
        missing(f"Chromium ({CHROMIUM})")
    return CHROMIUM


async def run_node(script: str, *args: str, limit: float = 45) -> dict[str, Any]:
    """Run ``node tests/js/<script> args...`` off the loop; its last stdout line, as JSON."""
    node = require_node()
    with anyio.fail_after(limit):
        result = await anyio.run_process(
            [node, str(JS_DIR / script), *args], cwd=JS_DIR, check=False
        )
    out = result.stdout.decode()
    err = result.stderr.decode()
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"{script} printed nothing (exit {result.returncode}); stderr:\n{err}"
    data: dict[str, Any] = json.loads(lines[-1])
    assert "fatal" not in data, f"{script} failed: {data['fatal']}\nstderr:\n{err}"
    assert result.returncode == 0, f"{script} exited {result.returncode}; stderr:\n{err}"
    return data
