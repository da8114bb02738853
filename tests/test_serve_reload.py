"""``turngate serve --reload``: what it watches, and that a change restarts the worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import psutil
import pytest

from gateway.ops.devserver import PROJECT_PACKAGES, reload_dirs
from turngate.testing import free_port

REPO = Path(__file__).resolve().parents[1]
TURNGATE = os.path.join(os.path.dirname(sys.executable), "turngate")


def test_watches_the_project_packages_and_installed_adapter_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An adapter package "installed" the way pip lays one out: the package, and a
    # dist-info whose entry point names it in the group turngate.adapters.
    (tmp_path / "fakeadapter").mkdir()
    (tmp_path / "fakeadapter" / "__init__.py").write_text("class Fake: ...\n")
    info = tmp_path / "fakeadapter-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeadapter\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[turngate.adapters]\nfake = fakeadapter:Fake\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = tmp_path / "frontend"
    extra.mkdir()
    dirs = reload_dirs([str(extra)])
    for package in PROJECT_PACKAGES:
        assert str((REPO / package).resolve()) in dirs, (package, dirs)
    assert str((tmp_path / "fakeadapter").resolve()) in dirs, dirs
    assert str(extra.resolve()) in dirs
    assert not any(d.endswith(("site-packages", "dist-packages")) for d in dirs), dirs
    with pytest.raises(ValueError, match="--reload-dir '/no/such/dir' is not a directory"):
        reload_dirs(["/no/such/dir"])


def _workers(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


async def _healthy(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(url + "/healthz")).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.anyio
async def test_a_change_in_a_watched_directory_restarts_the_worker(tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/turngate.db"}
    proc = subprocess.Popen(
        [TURNGATE, "serve", "--reload", "--reload-dir", str(watched), "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            with anyio.fail_after(30):
                while not (await _healthy(client, url) and _workers(proc.pid)):
                    assert proc.poll() is None, "turngate serve --reload exited"
                    await anyio.sleep(0.1)
            before = _workers(proc.pid)
            await anyio.Path(watched / "adapter_change.py").write_text("X = 1\n")
            with anyio.fail_after(30):
                while True:
                    now = _workers(proc.pid)
                    # The worker was replaced (a helper such as multiprocessing's
                    # resource tracker may outlive it).
                    if before - now and now - before and await _healthy(client, url):
                        break
                    await anyio.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        output = proc.stdout.read().decode() if proc.stdout else ""
        proc.stdout and proc.stdout.close()
    assert "first start" in output, output  # the parent printed the one-time key URL
    # Each worker logs as `serve` does: both the first and the restarted one started.
    assert output.count("started instance=") >= 2, output
