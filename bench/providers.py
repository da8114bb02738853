"""turngate's provider adapters side by side with the LiteLLM proxy and a direct client.

All behind one fake upstream (``bench/fake_llm_upstream.py``, its own process), in
one run on this machine:

- ``direct``: the client talks to the fake upstream itself (the floor);
- ``turngate-pg`` / ``turngate-sqlite``: ``turngate serve`` (one worker) with the
  ``openai:`` adapter pointed at the fake, on PostgreSQL (database
  ``turngate_providers_<pid>``, made for the run and dropped after it) and on SQLite
  (a file in a temporary directory);
- ``litellm``: the LiteLLM proxy, installed by this script into its own virtualenv
  (``bench/.litellm-venv``, not a project dependency), one worker, no database,
  least logging: its cheapest setup;
- with ``--before REF``: also ``turngate-pg-before``, the gateway at git ``REF``
  (exported to ``bench/.before-<REF>`` and run from the same virtualenv through
  ``PYTHONPATH``), so a change is measured against its parent in the same run.

Measured (each server a separate process; the client is this process, raw sockets,
one connection per stream, ``Connection: close``):

1. ``idle``, first, on fresh servers after a warm-up: 1,000 streams (quick: 300)
   whose upstream sends one token then holds; each is read to its first token and
   held. Time to open them all (100 opens at a time); the CPU per stream opened of
   every process on the way, which share the cores (the server, its PostgreSQL
   backends, the fake upstream, this client); RSS growth per stream; the server's
   CPU (cores) 2 to 6 s after the last opened, and in a full run again 20 to 24 s
   after (settled).
2. ``ttft``: 200 (quick: 60) sequential 3-token streams; request written → first
   token read. Added TTFT = the server's median (p99) − direct's median. The same
   through the ``anthropic:`` adapter (Anthropic-shaped fake stream).
3. ``long``: one stream of 20,000 tokens (quick: 5,000) written at once; tokens/s
   (tokens / (last byte − request)) and the server's CPU per 1,000 tokens.
4. ``conc``: 100 concurrent streams × 2,000 tokens 2 ms apart (quick: 100 × 300);
   aggregate tokens/s and CPU per 1,000 tokens.

2.–4. run ``--rounds`` times (3; quick 1), the server order rotated every round;
the table gives medians. Failed streams are counted over every phase (a non-200
answer, or a stream that ended without its last event).

    .venv/bin/python bench/providers.py            # ~10 min on 2 cores
    .venv/bin/python bench/providers.py --quick    # ~3 min
    .venv/bin/python bench/providers.py --quick --before main --servers direct,turngate-pg
    .venv/bin/python bench/providers.py --only idle --servers turngate-pg --before main

Results: ``bench/results/providers-<stamp>[-quick].json`` and a Markdown table on
stdout. Needs PostgreSQL on 127.0.0.1:5432 (trust, user ``postgres``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    PG_ADMIN,
    ROOT,
    VENV_BIN,
    cpu_of,
    free_port,
    gateway_env,
    median,
    pct,
    raise_nofile,
)
from bench.sqlite_burst import _make_threads  # noqa: E402

# One database per run (dropped at its end): two runs at once must not drop each other's.
PG_DB = f"turngate_providers_{os.getpid()}"
PG_URL = f"postgresql://postgres@127.0.0.1:5432/{PG_DB}"
LITELLM_VENV = ROOT / "bench" / ".litellm-venv"
TOKEN = b"Zq"
LITELLM_KEY = "sk-bench-" + uuid.uuid4().hex

# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def _procs(self) -> list[psutil.Process]:
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.Error:
            return []

    def cpu(self) -> float:
        return cpu_of(self._procs())

    def rss(self) -> int:
        total = 0
        for p in self._procs():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _spawn(name: str, cmd: list[str], env: dict[str, str], logdir: Path, port: int,
           health: bytes, timeout: float = 90.0) -> Proc:
    log = logdir / f"{name}-{port}.log"
    fh = open(log, "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=fh, stderr=subprocess.STDOUT)
    p = Proc(name, port, proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at start; see {log}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % health)
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return p
        except OSError:
            pass
        time.sleep(0.2)
    p.stop()
    raise RuntimeError(f"{name} did not start in {timeout:.0f} s; see {log}")


def start_fake(logdir: Path) -> Proc:
    port = free_port()
    return _spawn("fake-upstream", [sys.executable, str(ROOT / "bench" / "fake_llm_upstream.py"),
                                    "--port", str(port)], dict(os.environ), logdir, port,
                  b"/healthz")


def start_turngate(name: str, db_url: str, upstream: int, logdir: Path,
                   pythonpath: Path | None = None) -> Proc:
    port = free_port()
    env = gateway_env(
        db_url,
        OPENAI_BASE_URL=f"http://127.0.0.1:{upstream}/v1", OPENAI_API_KEY="fake-key",
        ANTHROPIC_BASE_URL=f"http://127.0.0.1:{upstream}", ANTHROPIC_API_KEY="fake-key",
    )
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [str(VENV_BIN / "turngate"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    return _spawn(name, cmd, env, logdir, port, b"/healthz")


def ensure_litellm() -> Path:
    """The LiteLLM proxy's virtualenv, made and filled on first use."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print("# installing litellm[proxy] into bench/.litellm-venv", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
                       check=True, timeout=1800)
    return exe


def litellm_version() -> str:
    out = subprocess.run([str(LITELLM_VENV / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def start_litellm(upstream: int, models: list[str], logdir: Path) -> Proc:
    exe = ensure_litellm()
    port = free_port()
    cfg = logdir / "litellm.yaml"
    lines = ["model_list:"]
    for m in models:
        lines += [f"  - model_name: {m}", "    litellm_params:", f"      model: openai/{m}",
                  f"      api_base: http://127.0.0.1:{upstream}/v1", "      api_key: fake-key"]
    lines += ["litellm_settings:", "  drop_params: true", "  set_verbose: false",
              "  turn_off_message_logging: true", "  request_timeout: 900",
              "general_settings:", "  disable_spend_logs: true"]
    cfg.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    # The proxy refuses to start without a master key; with no database it is checked
    # in memory on each request.
    env.update({"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
                "DISABLE_ADMIN_UI": "True", "LITELLM_MASTER_KEY": LITELLM_KEY})
    cmd = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
           "--num_workers", "1"]
    return _spawn("litellm", cmd, env, logdir, port, b"/health/liveliness", timeout=180)


# --------------------------------------------------------------------------- client


@dataclass
class Result:
    status: int = 0
    t_send: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.t_done is not None


@dataclass
class Target:
    """How to ask one server for one stream."""

    name: str
    port: int
    request: Callable[[str, str], bytes]  # (model, thread id) -> request bytes
    done: bytes
    threads: list[str] = field(default_factory=list)
    proc: Proc | None = None
    db: str = ""  # its PostgreSQL database, whose backends' CPU the idle phase counts

    def thread(self) -> str:
        return self.threads.pop() if self.threads else ""


def _post(path: bytes, body: dict[str, Any], extra: bytes = b"") -> bytes:
    raw = json.dumps(body).encode()
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Accept: text/event-stream\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (path, extra, len(raw), raw))


def openai_request(model: str, _thread: str, extra: bytes = b"") -> bytes:
    return _post(b"/v1/chat/completions", {
        "model": model, "stream": True, "messages": [{"role": "user", "content": "hello there"}]},
        extra)


def litellm_request(model: str, thread: str) -> bytes:
    return openai_request(model, thread, b"Authorization: Bearer %s\r\n" % LITELLM_KEY.encode())


def anthropic_request(model: str, _thread: str) -> bytes:
    return _post(b"/v1/messages", {
        "model": model, "stream": True, "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hello there"}]})


def turngate_request(key: str) -> Callable[[str, str], bytes]:
    auth = b"Authorization: Bearer %s\r\n" % key.encode()

    def build(model: str, thread: str) -> bytes:
        return _post(b"/v1/threads/%s/turns" % thread.encode(),
                     {"turn_id": uuid.uuid4().hex, "text": "hello there", "model": model}, auth)

    return build


async def run_stream(target: Target, model: str, *, hold: asyncio.Event | None = None,
                     opened: Callable[[Result], None] | None = None,
                     timeout: float = 120.0) -> Result:
    """One stream over a fresh connection, read to its last event (or held after the
    first token until ``hold`` is set)."""
    res = Result()
    thread = target.thread()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", target.port), timeout)
    except (TimeoutError, OSError) as exc:
        res.error = f"connect: {exc!r}"
        if opened is not None:
            opened(res)
        return res
    try:
        async with asyncio.timeout(timeout) as deadline:
            res.t_send = time.perf_counter()
            writer.write(target.request(model, thread))
            tail = b""
            while True:
                data = await reader.read(262144)
                now = time.perf_counter()
                if not data:
                    break
                if not res.status:
                    res.status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else -1
                buf = tail + data
                count = buf.count(TOKEN) - tail.count(TOKEN)
                if count and res.t_first is None:
                    res.t_first = now
                    if hold is not None:
                        deadline.reschedule(None)
                        if opened is not None:
                            opened(res)
                        await hold.wait()
                        break
                res.tokens += count
                if target.done in buf:
                    res.t_done = now
                    break
                tail = buf[-24:]
    except TimeoutError:
        res.error = "timeout"
    except OSError as exc:
        res.error = repr(exc)
    finally:
        writer.transport.abort()
    if hold is not None and res.t_first is None and opened is not None:
        opened(res)
    return res


# --------------------------------------------------------------------------- phases


def fake_model(tokens: int, delay_ms: int | None) -> str:
    return f"fake-t{tokens}-hold" if delay_ms is None else f"fake-t{tokens}-d{delay_ms}"


def model_for(target: Target, fake: str, kind: str = "openai") -> str:
    return f"{kind}:{fake}" if target.name.startswith("turngate") else fake


async def _quiet(proc: Proc | None, limit: float = 20.0) -> None:
    """Wait (bounded) until the server's CPU use drops under 5 % for 0.5 s."""
    if proc is None:
        return
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        c0 = proc.cpu()
        await asyncio.sleep(0.5)
        if proc.cpu() - c0 < 0.025:
            return


async def _backends(db: str) -> list[psutil.Process]:
    """The PostgreSQL backends connected to ``db`` (the gateway's pool)."""
    if not db:
        return []
    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", db)
    finally:
        await conn.close()
    out = []
    for row in rows:
        try:
            out.append(psutil.Process(row["pid"]))
        except psutil.Error:
            pass
    return out


async def phase_idle(target: Target, n: int, settle: bool,
                     upstream: Proc | None = None) -> dict[str, Any]:
    proc = target.proc
    model = model_for(target, fake_model(1, None))
    for _ in range(20):  # warm-up: the code paths, the pools, the first connections
        await run_stream(target, model_for(target, fake_model(3, 0)))
    await _quiet(proc)
    rss0 = proc.rss() if proc else 0
    hold = asyncio.Event()
    sem = asyncio.Semaphore(100)
    opened: list[Result] = []
    all_open = asyncio.Event()

    def on_open(res: Result) -> None:
        opened.append(res)
        sem.release()
        if len(opened) == n:
            all_open.set()

    async def one() -> Result:
        await sem.acquire()
        return await run_stream(target, model, hold=hold, opened=on_open)

    # Every process on the opens' path shares the two cores, so the time to open them
    # follows the CPU of all of them: the gateway, its database backends, the fake
    # upstream and this client.
    backends = await _backends(target.db)
    cpu0 = proc.cpu() if proc else 0.0
    db0, up0, me0 = (cpu_of(backends), upstream.cpu() if upstream else 0.0,
                     time.process_time())
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    try:
        await asyncio.wait_for(all_open.wait(), 300)
    except TimeoutError:
        pass
    open_s = time.perf_counter() - t0
    per_ms = 1000 / max(n, 1)
    cpu_all = {
        "open_client_cpu_ms_per_stream": (time.process_time() - me0) * per_ms,
        "open_upstream_cpu_ms_per_stream":
            (upstream.cpu() - up0) * per_ms if upstream else None,
        "open_db_cpu_ms_per_stream": (cpu_of(backends) - db0) * per_ms if backends else None,
    }
    ok = sum(1 for r in opened if r.t_first is not None and r.status == 200)
    out: dict[str, Any] = {"streams": n, "held": ok, "open_s": open_s}
    if proc is not None:
        # The server's CPU for the opens: less noisy than their wall-clock time.
        out["open_cpu_ms_per_stream"] = (proc.cpu() - cpu0) * per_ms
    out.update(cpu_all)
    out["open_all_cpu_ms_per_stream"] = sum(
        v for v in (out.get("open_cpu_ms_per_stream"), *cpu_all.values()) if v is not None)
    ttfts = sorted((r.t_first - r.t_send) * 1000 for r in opened if r.t_first is not None)
    if ttfts:
        out["open_ttft_median_ms"] = median(ttfts)
        out["open_ttft_p99_ms"] = pct(ttfts, 0.99)
    await asyncio.sleep(0.5)
    if proc is not None:
        out["kib_per_stream"] = (proc.rss() - rss0) / 1024 / max(ok, 1)
        await asyncio.sleep(1.5)
        c0 = proc.cpu()
        await asyncio.sleep(4.0)
        out["idle_cpu_s"] = proc.cpu() - c0
        out["idle_cores"] = out["idle_cpu_s"] / 4.0
        if settle:
            await asyncio.sleep(14.0)
            c0 = proc.cpu()
            await asyncio.sleep(4.0)
            out["idle_cpu_s_settled"] = proc.cpu() - c0
            out["idle_cores_settled"] = out["idle_cpu_s_settled"] / 4.0
    hold.set()
    await asyncio.gather(*tasks)
    out["failed"] = n - ok
    await _quiet(proc)
    return out


async def phase_ttft(target: Target, n: int, kind: str = "openai") -> dict[str, Any]:
    model = model_for(target, fake_model(3, 0), kind)
    results = []
    for _ in range(n):
        results.append(await run_stream(target, model))
    ttft = [(r.t_first - r.t_send) * 1000 for r in results if r.ok and r.t_first is not None]
    return {"n": n, "ttft_median_ms": median(ttft), "ttft_p99_ms": pct(ttft, 0.99),
            "failed": sum(1 for r in results if not r.ok)}


async def phase_long(target: Target, tokens: int) -> dict[str, Any]:
    proc = target.proc
    await _quiet(proc)
    c0 = proc.cpu() if proc else 0.0
    r = await run_stream(target, model_for(target, fake_model(tokens, 0)), timeout=600)
    cpu = (proc.cpu() - c0) if proc else 0.0
    out: dict[str, Any] = {"tokens": r.tokens, "failed": int(not r.ok or r.tokens != tokens)}
    if r.t_done is not None:
        out["tokens_per_s"] = r.tokens / (r.t_done - r.t_send)
    if proc is not None and r.tokens:
        out["cpu_ms_per_1k"] = cpu * 1000 / r.tokens * 1000
    return out


async def phase_conc(target: Target, streams: int, tokens: int, delay_ms: int) -> dict[str, Any]:
    proc = target.proc
    await _quiet(proc)
    model = model_for(target, fake_model(tokens, delay_ms))
    c0 = proc.cpu() if proc else 0.0
    results = await asyncio.gather(*(run_stream(target, model, timeout=600)
                                     for _ in range(streams)))
    cpu = (proc.cpu() - c0) if proc else 0.0
    got = sum(r.tokens for r in results)
    ends = [r.t_done for r in results if r.t_done is not None]
    out: dict[str, Any] = {"streams": streams, "tokens": got,
                           "failed": sum(1 for r in results if not r.ok or r.tokens != tokens)}
    if ends:
        out["tokens_per_s"] = got / (max(ends) - min(r.t_send for r in results))
    if proc is not None and got:
        out["cpu_ms_per_1k"] = cpu * 1000 / got * 1000
    return out


# --------------------------------------------------------------------------- setup


async def drop_pg(*names: str) -> None:
    try:
        conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    except (OSError, asyncpg.PostgresError):
        return
    try:
        for name in names:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


def _migrate_and_key(url: str, pythonpath: Path | None = None) -> str:
    env = gateway_env(url)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    subprocess.run([str(VENV_BIN / "turngate"), "migrate"], cwd=str(ROOT), env=env,
                   check=True, timeout=120, capture_output=True)
    out = subprocess.run([str(VENV_BIN / "turngate"), "keys", "create", "bench"], cwd=str(ROOT),
                         env=env, check=True, timeout=60, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


async def db_rtt_ms() -> float | None:
    conn = await asyncpg.connect(PG_URL, timeout=10)
    try:
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            await conn.fetchval("SELECT 1")
            times.append((time.perf_counter() - t0) * 1000)
        return median(times)
    finally:
        await conn.close()


async def db_durable_write_ms() -> float | None:
    """One autocommit INSERT into a logged table: a round trip that waits for the commit's
    flush, as the turn's open statement does (``SELECT 1`` waits for none)."""
    conn = await asyncpg.connect(PG_URL, timeout=10)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_durable_probe (x int)")
        times = []
        for _ in range(100):
            t0 = time.perf_counter()
            await conn.execute("INSERT INTO bench_durable_probe VALUES (1)")
            times.append((time.perf_counter() - t0) * 1000)
        await conn.execute("DROP TABLE bench_durable_probe")
        return median(times)
    finally:
        await conn.close()


def export_ref(ref: str) -> Path:
    """The tree at git ``ref``, exported (once) to ``bench/.before-<ref>``."""
    dest = ROOT / "bench" / f".before-{ref.replace('/', '_')}"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=str(ROOT), check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


# --------------------------------------------------------------------------- main


SIZES = {
    "full": {"idle": 1000, "ttft": 200, "long": 20000, "conc": (100, 2000, 2), "rounds": 3},
    "quick": {"idle": 300, "ttft": 60, "long": 5000, "conc": (100, 300, 2), "rounds": 1},
}


PHASES = ("idle", "ttft", "long", "conc")


def _fmt(v: Any, spec: str = ",.1f") -> str:
    return "–" if v is None else format(v, spec)


def _med(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return median(values) if values else None


def _open_cpu(idle: dict[str, Any]) -> str:
    if idle.get("open_all_cpu_ms_per_stream") is None:
        return "–"
    parts = [_fmt(idle.get(f"open_{k}cpu_ms_per_stream"), ".2f")
             for k in ("", "db_", "upstream_", "client_")]
    return f"{idle['open_all_cpu_ms_per_stream']:.2f} ({' / '.join(parts)})"


def summarize(res: dict[str, Any]) -> str:
    names = [n for n in res["servers"]]
    per = res["results"]
    direct = per.get("direct", {})
    d_ttft = _med(direct.get("ttft", []), "ttft_median_ms")
    d_ttft_a = _med(direct.get("ttft_anthropic", []), "ttft_median_ms")

    def added(name: str, phase: str, key: str, base: float | None) -> float | None:
        v = _med(per[name].get(phase, []), key)
        return None if v is None or base is None or name == "direct" else v - base

    rows: list[tuple[str, Callable[[str], str]]] = [
        ("added time to first token (openai:), median / p99 ms",
         lambda n: "–" if n == "direct" else
         f"{_fmt(added(n, 'ttft', 'ttft_median_ms', d_ttft), '.2f')} / "
         f"{_fmt(added(n, 'ttft', 'ttft_p99_ms', d_ttft), '.2f')}"),
        ("added time to first token (anthropic:), median / p99 ms",
         lambda n: "–" if n == "direct" or not per[n].get("ttft_anthropic") else
         f"{_fmt(added(n, 'ttft_anthropic', 'ttft_median_ms', d_ttft_a), '.2f')} / "
         f"{_fmt(added(n, 'ttft_anthropic', 'ttft_p99_ms', d_ttft_a), '.2f')}"),
        ("time to first token (direct: the floor), median ms",
         lambda n: _fmt(_med(per[n].get("ttft", []), "ttft_median_ms"), ".2f")),
        ("one long stream, tokens/s",
         lambda n: _fmt(_med(per[n].get("long", []), "tokens_per_s"), ",.0f")),
        ("gateway CPU per 1,000 tokens, long stream, ms",
         lambda n: _fmt(_med(per[n].get("long", []), "cpu_ms_per_1k"))),
        (f"{res['sizes']['conc'][0]} concurrent streams × {res['sizes']['conc'][1]:,} "
         f"({res['sizes']['conc'][2]} ms apart), tokens/s",
         lambda n: _fmt(_med(per[n].get("conc", []), "tokens_per_s"), ",.0f")),
        ("gateway CPU per 1,000 tokens, concurrent, ms",
         lambda n: _fmt(_med(per[n].get("conc", []), "cpu_ms_per_1k"))),
        ("failed streams, of all",
         lambda n: f"{per[n]['failed']} of {per[n]['streams']}"),
        (f"memory growth per idle open stream ({res['sizes']['idle']:,} held), KiB",
         lambda n: _fmt(per[n].get("idle", {}).get("kib_per_stream"))),
        (f"time to open {res['sizes']['idle']:,} streams, s",
         lambda n: _fmt(per[n].get("idle", {}).get("open_s"), ".2f")),
        ("CPU per stream opened: all processes (gateway / database / fake upstream / "
         "client), ms",
         lambda n: _open_cpu(per[n].get("idle", {}))),
        ("CPU while they sit idle (2–6 s after; settled 20–24 s), cores",
         lambda n: "–" if n == "direct" else
         f"{_fmt(per[n].get('idle', {}).get('idle_cores'), '.3f')}"
         + (f" ({_fmt(per[n]['idle']['idle_cores_settled'], '.3f')})"
            if per[n].get("idle", {}).get("idle_cores_settled") is not None else "")),
    ]
    out = ["| figure | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for label, cell in rows:
        out.append(f"| {label} | " + " | ".join(cell(n) for n in names) + " |")
    return "\n".join(out)


async def amain(args: argparse.Namespace) -> None:
    raise_nofile()
    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.idle:
        sizes["idle"] = args.idle
    rounds = args.rounds or sizes["rounds"]
    wanted = args.servers.split(",")
    before = export_ref(args.before) if args.before else None
    if before is not None and "turngate-pg-before" not in wanted:
        wanted.append("turngate-pg-before")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = ("-quick" if args.quick else "") + (f"-{args.only}" if args.only else "")
    path = ROOT / "bench" / "results" / f"providers-{stamp}{suffix}.json"
    conc = sizes["conc"]
    models = sorted({fake_model(1, None), fake_model(3, 0), fake_model(sizes["long"], 0),
                     fake_model(conc[1], conc[2])})
    res: dict[str, Any] = {"command": " ".join(sys.argv), "sizes": sizes, "rounds": rounds,
                           "servers": wanted, "before": args.before, "results": {}}
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="turngate-providers-") as tmp:
        logdir = Path(tmp)
        print(f"# logs in {tmp}", flush=True)
        try:
            fake = start_fake(logdir)
            procs.append(fake)
            targets: dict[str, Target] = {}
            n_threads = sizes["idle"] + 20 + rounds * (2 * sizes["ttft"] + 1 + conc[0]) + 10
            for name in wanted:
                if name == "direct":
                    targets[name] = Target(name, fake.port, openai_request, b"data: [DONE]")
                elif name == "litellm":
                    p = start_litellm(fake.port, models, logdir)
                    procs.append(p)
                    res["litellm_version"] = litellm_version()
                    targets[name] = Target(name, p.port, litellm_request, b"data: [DONE]",
                                           proc=p)
                elif name.startswith("turngate"):
                    tree = before if name.endswith("-before") else None
                    if "sqlite" in name:
                        url = f"sqlite:///{logdir / (name + '.db')}"
                    else:
                        db = PG_DB if tree is None else PG_DB + "_before"
                        conn = await asyncpg.connect(PG_ADMIN, timeout=10)
                        try:
                            await conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
                            await conn.execute(f"CREATE DATABASE {db}")
                        finally:
                            await conn.close()
                        url = f"postgresql://postgres@127.0.0.1:5432/{db}"
                    key = _migrate_and_key(url, tree)
                    p = start_turngate(name, url, fake.port, logdir, tree)
                    procs.append(p)
                    t = Target(name, p.port, turngate_request(key), b"data: [DONE]", proc=p,
                               db="" if "sqlite" in name else url.rsplit("/", 1)[1])
                    t.threads = await _make_threads(p.port, key, n_threads)
                    targets[name] = t
                else:
                    raise SystemExit(f"unknown server {name!r}")
            res["db_rtt_ms"] = await db_rtt_ms() if any(
                "pg" in n for n in wanted) else None
            res["db_durable_write_ms"] = await db_durable_write_ms() if any(
                "pg" in n for n in wanted) else None
            anthropic_target = {
                "direct": Target("direct", fake.port, anthropic_request, b"message_stop")}
            per: dict[str, dict[str, Any]] = {
                n: {"ttft": [], "ttft_anthropic": [], "long": [], "conc": [], "failed": 0,
                    "streams": 0} for n in wanted}
            res["results"] = per

            def count(name: str, phase: dict[str, Any], streams: int) -> None:
                per[name]["failed"] += int(phase.get("failed", 0))
                per[name]["streams"] += streams

            def save() -> None:
                path.write_text(json.dumps(res, indent=1))

            for name, t in targets.items():
                if "idle" not in args.phases:
                    break
                settle = not args.quick or args.phases == {"idle"}
                out = await phase_idle(t, sizes["idle"], settle=settle, upstream=fake)
                per[name]["idle"] = out
                count(name, out, sizes["idle"] + 20)
                print(f"{name} idle {json.dumps(out)}", flush=True)
                save()
            order = list(targets)
            for rnd in range(rounds):
                rot = order[rnd % len(order):] + order[:rnd % len(order)]
                for name in rot:
                    t = targets[name]
                    out = lo = co = {}
                    if "ttft" in args.phases:
                        out = await phase_ttft(t, sizes["ttft"])
                        per[name]["ttft"].append(out)
                        count(name, out, sizes["ttft"])
                        at = anthropic_target.get(
                            name, t if name.startswith("turngate") else None)
                        if at is not None:
                            out_a = await phase_ttft(at, sizes["ttft"], "anthropic")
                            per[name]["ttft_anthropic"].append(out_a)
                            count(name, out_a, sizes["ttft"])
                    if "long" in args.phases:
                        lo = await phase_long(t, sizes["long"])
                        per[name]["long"].append(lo)
                        count(name, lo, 1)
                    if "conc" in args.phases:
                        co = await phase_conc(t, *conc)
                        per[name]["conc"].append(co)
                        count(name, co, conc[0])
                    print(f"round {rnd + 1} {name} ttft {json.dumps(out)} long {json.dumps(lo)} "
                          f"conc {json.dumps(co)}", flush=True)
                    save()
        finally:
            for p in reversed(procs):
                p.stop()
            await drop_pg(PG_DB, PG_DB + "_before")
        table = summarize(res)
        res["table"] = table
        path.write_text(json.dumps(res, indent=1))
        print(f"\nDB round trip (SELECT 1) {res.get('db_rtt_ms')} ms, durable INSERT "
              f"{res.get('db_durable_write_ms')} ms; "
              f"litellm {res.get('litellm_version')}\n")
        print(table)
        print(f"\nstored in {path.relative_to(ROOT)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one round")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--servers", default="direct,turngate-pg,turngate-sqlite,litellm")
    ap.add_argument("--before", default="", help="also run the gateway at this git ref")
    ap.add_argument("--table", default="", help="print the table of a stored result and exit")
    ap.add_argument("--idle", type=int, default=0,
                    help="streams held open in the idle phase (default 1,000; quick 300)")
    ap.add_argument("--only", default="",
                    help="run only these phases, comma-separated, of idle,ttft,long,conc "
                         "(e.g. --only idle,ttft for the open and first-token figures)")
    args = ap.parse_args()
    phases = {p for p in args.only.split(",") if p} or set(PHASES)
    if not phases <= set(PHASES):
        ap.error(f"--only takes phases of {','.join(PHASES)}")
    args.phases = phases
    if args.table:
        print(summarize(json.loads(Path(args.table).read_text())))
        return
    os.chdir(ROOT)
    try:
        import uvloop
        uvloop.run(amain(args))
    except ImportError:
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
