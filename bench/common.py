"""Shared pieces of the benchmarks: servers, a raw HTTP/SSE client, a round-trip proxy,
database setup, process sampling. Loopback only; every wait here is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psutil

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def fresh_pg_database(name: str) -> None:
    """Drop (with its connections) and create the PostgreSQL database ``name``."""
    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
BENCH_DB = os.environ.get("TURNGATE_BENCH_DB", "turngate_bench")
# The same schema in a database with synchronous_commit=off: separates the gateway's
# own cost from the disk's commit flush (fdatasync) in the latency benchmarks.
NOSYNC_DB = BENCH_DB + "_nosync"
PG_PORT = 5432


def db_for(server_name: str) -> str:
    return NOSYNC_DB if server_name.endswith("-nosync") else BENCH_DB


def bench_db_url(port: int = PG_PORT, db: str = BENCH_DB) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{db}"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str  # "turngate" | "bare-sse" | "bare-plain"
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def gateway_env(db_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": db_url,
        "TURNGATE_MAX_STREAMS_PER_USER": "1000000",
        "TURNGATE_RATE_LIMIT_PER_MINUTE": "100000000",
        "TURNGATE_LOG_LEVEL": "warning",
    })
    env.update(extra)
    return env


def start_server(name: str, logdir: Path, db_url: str | None = None, **env_extra: str) -> Server:
    port = free_port()
    log = logdir / f"{name}-{port}.log"
    if name.startswith("turngate"):
        cmd = [str(VENV_BIN / "turngate"), "serve", "--host", "127.0.0.1", "--port", str(port)]
        env = gateway_env(db_url or bench_db_url(db=db_for(name)), **env_extra)
    else:
        variant = name.split("-", 1)[1]
        cmd = [sys.executable, str(ROOT / "bench" / "baseline_app.py"), "--variant", variant,
               "--port", str(port)]
        env = dict(os.environ)
    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=fh, stderr=subprocess.STDOUT)
    server = Server(name, port, proc, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at start; see {log}:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not start in 30 s; see {log}")


# --------------------------------------------------------------------------- client


@dataclass
class TurnResult:
    status: int = 0
    t_send: float = 0.0
    t_first_byte: float | None = None
    t_first_delta: float | None = None
    t_done: float | None = None
    events: int = 0
    bytes: int = 0
    error: str | None = None


def turn_request(thread_id: str, key: str, model: str, text: str = "hello there") -> bytes:
    body = json.dumps({"turn_id": uuid.uuid4().hex, "text": text, "model": model}).encode()
    return (
        b"POST /v1/threads/%s/turns HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (thread_id.encode(), key.encode(), len(body), body)
    )


_DELTA = b'"type":"text-delta"'
_DONE = b"data: [DONE]"


async def run_turn(port: int, thread_id: str, key: str, model: str, *,
                   timeout: float = 60.0) -> TurnResult:
    """One turn over a fresh connection, read to ``[DONE]``; counts ``data:`` events."""
    res = TurnResult()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout)
    except (TimeoutError, OSError) as exc:
        res.error = f"connect: {exc!r}"
        return res
    req = turn_request(thread_id, key, model)
    try:
        async with asyncio.timeout(timeout):
            res.t_send = time.perf_counter()
            writer.write(req)
            tail = b""
            while True:
                data = await reader.read(262144)
                now = time.perf_counter()
                if not data:
                    break
                if res.t_first_byte is None:
                    res.t_first_byte = now
                    res.status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else -1
                res.bytes += len(data)
                buf = tail + data
                if res.t_first_delta is None and _DELTA in buf:
                    res.t_first_delta = now
                # events: every "data: " that starts in the new bytes
                res.events += buf.count(b"data: ") - tail.count(b"data: ")
                if _DONE in buf:
                    res.t_done = now
                    break
                tail = buf[-24:]
    except TimeoutError:
        res.error = "timeout"
    except OSError as exc:
        res.error = repr(exc)
    finally:
        writer.transport.abort()
    return res


class HeldStream:
    """A turn stream that is opened, read until its first event, then held open idle."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.ok = False
        self.task: asyncio.Task[None] | None = None
        self.events = 0
        self.status = ""

    async def open(self, port: int, thread_id: str, key: str, model: str,
                   timeout: float = 60.0) -> None:
        try:
            reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), timeout)
            self.writer.write(turn_request(thread_id, key, model))
            data = await asyncio.wait_for(reader.read(65536), timeout)
            self.status = data[9:12].decode(errors="replace")
            self.ok = data.startswith(b"HTTP/1.1 200")
            self.events = data.count(b"data: ")
            if self.ok:
                self.task = asyncio.ensure_future(self._drain(reader))
        except (TimeoutError, OSError) as exc:
            self.status = type(exc).__name__
            self.ok = False

    async def _drain(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(262144):
                self.events += data.count(b"data: ")
        except (OSError, asyncio.CancelledError):
            pass

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # FIN, as a browser tab that goes away
        if self.task is not None:
            self.task.cancel()


async def gather_limited(coros: list[Any], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


async def http_get(port: int, path: str, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
        async with asyncio.timeout(timeout):
            data = b""
            while chunk := await reader.read(65536):
                data += chunk
        return data
    finally:
        writer.transport.abort()


async def metric(port: int, name: str) -> float | None:
    try:
        data = await http_get(port, "/metrics", timeout=2.0)
    except (OSError, TimeoutError):
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


# --------------------------------------------------------------------------- database


async def reset_database(db: str = BENCH_DB) -> None:
    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {db}")
        if db == NOSYNC_DB:
            await conn.execute(f"ALTER DATABASE {db} SET synchronous_commit = off")
    finally:
        await conn.close()


def migrate_and_key(db: str = BENCH_DB) -> str:
    env = gateway_env(bench_db_url(db=db))
    subprocess.run([str(VENV_BIN / "turngate"), "migrate"], cwd=str(ROOT), env=env,
                   check=True, timeout=120, capture_output=True)
    out = subprocess.run([str(VENV_BIN / "turngate"), "keys", "create", "bench"], cwd=str(ROOT),
                         env=env, check=True, timeout=60, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


class Db:
    """A small asyncpg pool on the bench database, for setup and observation."""

    def __init__(self, db: str = BENCH_DB) -> None:
        self.db = db
        self.pool: asyncpg.Pool | None = None
        self.owner_id = 0

    async def connect(self) -> None:
        self.pool = await asyncpg.create_pool(bench_db_url(db=self.db), min_size=1, max_size=2)
        self.owner_id = await self.pool.fetchval("SELECT user_id FROM api_keys ORDER BY id LIMIT 1")

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def make_threads(self, n: int) -> list[str]:
        """Fresh, empty threads owned by the bench user (setup, not measured)."""
        ids = [f"b-{uuid.uuid4().hex}" for _ in range(n)]
        assert self.pool is not None
        await self.pool.copy_records_to_table(
            "threads", records=[(i, self.owner_id) for i in ids], columns=["id", "owner_id"])
        return ids

    async def streaming_count(self) -> int:
        assert self.pool is not None
        return int(await self.pool.fetchval(
            "SELECT count(*) FROM messages WHERE status = 'streaming'"))

    async def xact_commit(self) -> int:
        assert self.pool is not None
        return int(await self.pool.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", BENCH_DB))


def postgres_procs() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["name", "username"]):
        try:
            if p.info["name"] in ("postgres", "postmaster"):
                out.append(p)
        except psutil.Error:
            pass
    return out


def cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def pg_cpu() -> float:
    """CPU seconds of every PostgreSQL process now (backends come and go: sum per call)."""
    return cpu_of(postgres_procs())


# --------------------------------------------------------------------------- proxy


class RoundTripProxy:
    """A TCP proxy in front of PostgreSQL counting request/response exchanges.

    Idea from tests/fixtures_db.py: a round trip is counted when a client
    writes after the server last wrote on that connection (pipelined messages
    in one flight count once). Runs in the caller's event loop.
    """

    def __init__(self, target_port: int = PG_PORT) -> None:
        self.target = ("127.0.0.1", target_port)
        self.round_trips = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        state = {"client_turn": False}
        await asyncio.gather(
            self._pump(reader, up_writer, state, True),
            self._pump(up_reader, writer, state, False),
            return_exceptions=True,
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    state: dict[str, bool], from_client: bool) -> None:
        try:
            while data := await reader.read(65536):
                if from_client:
                    if not state["client_turn"]:
                        self.round_trips += 1
                        state["client_turn"] = True
                else:
                    state["client_turn"] = False
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
