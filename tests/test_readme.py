"""The README's "Using it" block, run as a script in a fresh shell, against a real
``turngate serve`` started as the README says (in the same folder, default
database), ends with a streamed reply."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from tests.fixtures_server import free_port
from tests.test_cli_startup import TURNGATE, clean_env

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- readme-script: using-it"
README_URL = "http://127.0.0.1:8000"


def using_it_block() -> str:
    """The first ```sh block after the marker comment in README.md."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    at = readme.find(MARKER)
    assert at >= 0, f"README.md lost its marker {MARKER!r} before the 'Using it' script"
    match = re.compile(r"```sh\n(.*?)```", re.S).search(readme, at)
    assert match, "no ```sh block after the 'Using it' marker in README.md"
    return match.group(1)


def test_block_has_no_placeholders_a_shell_would_misread() -> None:
    block = using_it_block()
    assert not re.search(r"<[a-z][a-z _-]*>", block), f"a <placeholder> in:\n{block}"
    assert "KEY=..." not in block and "curl -N " not in block, block
    assert README_URL in block, f"the block no longer talks to {README_URL}:\n{block}"


def _venv_in(folder: Path) -> None:
    """``.venv`` in ``folder`` as the README's start command makes it: this test's own
    environment (its ``bin/activate`` if it is a venv, else one that puts it on PATH)."""
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "activate").exists():
        (folder / ".venv").symlink_to(bin_dir.parent, target_is_directory=True)
        return
    (folder / ".venv" / "bin").mkdir(parents=True)
    (folder / ".venv" / "bin" / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    (folder / ".venv" / "bin" / "turngate").symlink_to(TURNGATE)


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's commands use curl")
async def test_using_it_block_runs_as_a_script(tmp_path: Path) -> None:
    block = using_it_block()
    port = free_port()
    script = block.replace(README_URL, f"http://127.0.0.1:{port}")
    _venv_in(tmp_path)
    env = clean_env()
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if Path(p) != Path(sys.executable).parent)

    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = await anyio.open_process([TURNGATE, "serve", "--port", str(port)],
                                          cwd=tmp_path, env=env, stdout=out, stderr=out)
    try:
        async with httpx.AsyncClient() as client:
            with anyio.fail_after(20):
                while True:
                    assert server.returncode is None, log.read_text()
                    try:
                        if (await client.get(f"http://127.0.0.1:{port}/healthz")).is_success:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.05)
        with anyio.fail_after(60):
            result = await anyio.run_process(["bash", "-e", "-o", "pipefail", "-c", script],
                                             cwd=tmp_path, env=env, check=False)
    finally:
        server.terminate()
        with anyio.fail_after(20):
            await server.wait()
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"script failed ({result.returncode}):\n{err}\n{out}"
    # The key came from the server's own database, named on stderr.
    assert f"in SQLite file {tmp_path / 'turngate.db'}" in err, err

    data = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert out.lstrip().startswith(("id:", "data:", ":")), f"not an SSE stream:\n{out[:300]}"
    assert data and data[-1] == "[DONE]", f"the output does not end with [DONE]:\n{out[-300:]}"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["delta"] for c in chunks if c["type"] == "text-delta")
    deltas = [c for c in chunks if c["type"] == "text-delta"]
    assert len(deltas) == 20 and text.strip(), f"expected 20 streamed text deltas: {chunks}"
    finish = [c for c in chunks if c["type"] == "finish"]
    assert finish and finish[-1].get("finishReason") == "stop", chunks[-3:]
