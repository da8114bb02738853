"""Graceful shutdown of a real ``turngate serve`` process with 50 streams open.

SIGTERM must: stop new turns (503 on a connection that is still open, or the
connection refused once uvicorn closed its listener), let running turns finish
within TURNGATE_SHUTDOWN_GRACE_SECONDS, finalize the rest as ``interrupted``
with their usage, end every stream with its finish chunk, and exit within the
grace period plus 5 s. Run on both databases.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from persistence import KEY_SECRET_LEN
from tests.fixtures_db import _admin, pg_url_for, run_sync
from tests.waiting import until_sync

ROOT = Path(__file__).resolve().parent.parent
TURNGATE = str(Path(sys.executable).parent / "turngate")
GRACE = 2.0
STREAMS = 50

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def turngate_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNGATE_")}
    env.pop("REDIS_URL", None)
    env.update({"DATABASE_URL": database_url, **extra})
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TURNGATE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of its own (not the suite's shared one), not yet migrated."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shutdown.db'}"
        return
    name = f"turngate_shutdown_{os.getpid()}"
    run_sync(lambda: _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    run_sync(lambda: _admin(f"CREATE DATABASE {name}"))
    yield pg_url_for(name)
    run_sync(lambda: _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@dataclass
class StreamResult:
    started: threading.Event = field(default_factory=threading.Event)
    status: int | None = None
    chunks: list[dict[str, object]] = field(default_factory=list)
    done_marker: bool = False
    error: str | None = None


def _stream_turn(base: str, key: str, thread_id: str, result: StreamResult) -> None:
    body = {"turn_id": f"turn-{thread_id}", "text": "tell me a long story",
            "model": "scripted:tokens=400,delay_ms=50"}
    try:
        with httpx.Client(base_url=base, timeout=httpx.Timeout(30.0)) as client, client.stream(
            "POST", f"/v1/threads/{thread_id}/turns", json=body,
            headers={"authorization": f"Bearer {key}"},
        ) as response:
            result.status = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    result.done_marker = True
                    continue
                chunk = json.loads(data)
                result.chunks.append(chunk)
                if chunk.get("type") == "text-delta":
                    result.started.set()
    except Exception as exc:  # reported by the test
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.started.set()


def _rows(database_url: str) -> tuple[dict[str, int], int]:
    """(assistant status → count, token_usage row count)."""
    sql_status = "SELECT status, count(*) FROM messages WHERE role = 'assistant' GROUP BY status"
    sql_usage = "SELECT count(*) FROM token_usage"
    if database_url.startswith("sqlite"):
        con = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        try:
            statuses = {str(s): int(n) for s, n in con.execute(sql_status)}
            usage = int(con.execute(sql_usage).fetchone()[0])
        finally:
            con.close()
        return statuses, usage

    async def query() -> tuple[dict[str, int], int]:
        con = await asyncpg.connect(database_url, timeout=10)
        try:
            statuses = {str(r[0]): int(r[1]) for r in await con.fetch(sql_status)}
            return statuses, int(await con.fetchval(sql_usage))
        finally:
            await con.close()

    return run_sync(query)


def test_sigterm_with_50_open_streams(fresh_database: str, tmp_path: Path) -> None:
    env = turngate_env(
        fresh_database,
        TURNGATE_SHUTDOWN_GRACE_SECONDS=str(GRACE),
        TURNGATE_LOG_FORMAT="json",
        TURNGATE_MAX_STREAMS_PER_USER="100",
        TURNGATE_RATE_LIMIT_PER_MINUTE="10000",
    )
    # The release step on both databases: `keys create` uses an existing database only.
    migrated = run_cli(["migrate"], env, tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    created = run_cli(["keys", "create", "alice"], env, tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [TURNGATE, "serve", "--port", str(port)], env=env, cwd=tmp_path,
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

        with httpx.Client(base_url=base, headers={"authorization": f"Bearer {key}"}) as api:
            thread_ids = []
            for _ in range(STREAMS + 1):
                r = api.post("/v1/threads", json={})
                assert r.status_code == 201, r.text
                thread_ids.append(str(r.json()["id"]))
        late_thread = thread_ids.pop()

        results = [StreamResult() for _ in range(STREAMS)]
        workers = [
            threading.Thread(target=_stream_turn, args=(base, key, tid, res), daemon=True)
            for tid, res in zip(thread_ids, results, strict=True)
        ]
        for w in workers:
            w.start()
        for res in results:
            assert res.started.wait(20), "a stream did not start"
        assert all(r.error is None and r.status == 200 for r in results), [
            (r.status, r.error) for r in results if r.error or r.status != 200
        ]
        # A keep-alive connection opened before the signal, to ask for a turn after it.
        late_client = httpx.Client(base_url=base, headers={"authorization": f"Bearer {key}"},
                                   timeout=5)
        assert late_client.get("/readyz").status_code == 200

        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        until_sync(lambda: "shutdown_started" in log_path.read_text(), within=5,
                   what="the server to log shutdown_started",
                   shown=lambda: log_path.read_text()[-2000:])

        # After the signal no new turn starts: 503 while a connection is still open,
        # or the connection is refused once the listener is closed.
        late_body = {"turn_id": "late", "text": "hi", "model": "scripted:tokens=3"}
        for client in (late_client, httpx.Client(base_url=base, timeout=5,
                                                 headers={"authorization": f"Bearer {key}"})):
            try:
                late = client.post(f"/v1/threads/{late_thread}/turns", json=late_body)
            except httpx.TransportError:
                pass
            else:
                assert late.status_code == 503, late.text
                assert late.json()["error"]["code"] == "shutting_down"
            finally:
                client.close()

        try:
            code = proc.wait(timeout=GRACE + 5 - (time.monotonic() - sent))
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running {GRACE + 5}s after SIGTERM:\n"
                        + log_path.read_text()[-3000:])
        elapsed = time.monotonic() - sent
        # uvicorn re-raises the signal it caught once it has shut down cleanly.
        assert code in (0, -signal.SIGTERM), log_path.read_text()[-3000:]
        print(f"exited {elapsed:.2f}s after SIGTERM")
        assert elapsed <= GRACE + 5
        for w in workers:
            w.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    statuses, usage_rows = _rows(fresh_database)
    assert sum(statuses.values()) == STREAMS, statuses
    assert set(statuses) <= {"complete", "interrupted"}, statuses
    assert usage_rows == STREAMS

    # Every client got the end of its stream: a finish chunk (aborted for an
    # interrupted turn) with usage, then [DONE] -- not a cut connection.
    for res in results:
        assert res.error is None, res.error
        types = [c.get("type") for c in res.chunks]
        assert types[0] == "start" and types[-1] == "finish", types[-5:]
        assert res.done_marker

    # The log: one JSON object per line, each turn's start and end, no secrets.
    text = log_path.read_text()
    assert key not in text and key[-KEY_SECRET_LEN:] not in text
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    names = [e.get("event") for e in events]
    assert names.count("turn_start") == STREAMS
    ends = [e for e in events if e.get("event") == "turn_end"]
    assert len(ends) == STREAMS
    assert {e["status"] for e in ends} <= {"complete", "interrupted"}
    assert "shutdown_started" in names
    assert "tell me a long story" not in text
