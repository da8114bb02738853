"""Gateway CPU per 1,000 events of one long turn, for two source trees side by side.

The deterministic part of the throughput figures: the server's own CPU seconds (psutil,
user + system, of the ``turngate serve`` process) spent on one long turn, divided by
the text deltas the client read. Wall-clock events/s moves with whatever else runs on
the machine; the CPU a turn costs the gateway moves far less.

For every round, for every tree (``name=path``, each with its own ``.venv``; the order
alternates every round) and every database (PostgreSQL: database ``turngate_cpu``,
made again for each server; SQLite: a fresh file), one ``turngate serve`` is started
from that tree, migrated, warmed up (short turns of each kind), and then measures, on
a quiet server, one turn of each kind:

- ``scripted``: ``scripted:tokens=N,delay_ms=0`` (the ``throughput`` long turn of
  ``run_all.py``);
- ``openai``: ``openai:fake-tN-d0`` against ``fake_llm_upstream.py`` (the ``long``
  phase of ``providers.py``).

    .venv/bin/python bench/cpu_per_event.py --trees before=/work/wt/before,after=. --rounds 5

Prints one line per measurement and the medians per tree, database and kind; writes
``bench/results/cpu-per-event-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PG_ADMIN, ROOT, gateway_env, raise_nofile  # noqa: E402
from bench.providers import Proc, _spawn, free_port, start_fake  # noqa: E402
from bench.sqlite_burst import _make_threads  # noqa: E402

PG_DB = "turngate_cpu"
PG_URL = f"postgresql://postgres@127.0.0.1:5432/{PG_DB}"
DELTA = b'"text-delta"'
DONE = b"data: [DONE]"


async def _fresh_pg() -> None:
    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {PG_DB}")
    finally:
        await conn.close()


def _env(tree: Path, db_url: str, upstream: int) -> dict[str, str]:
    env = gateway_env(
        db_url,
        OPENAI_BASE_URL=f"http://127.0.0.1:{upstream}/v1", OPENAI_API_KEY="fake-key",
        ANTHROPIC_BASE_URL=f"http://127.0.0.1:{upstream}", ANTHROPIC_API_KEY="fake-key",
    )
    env.pop("PYTHONPATH", None)
    env["VIRTUAL_ENV"] = str(tree / ".venv")
    return env


def _migrate_and_key(tree: Path, env: dict[str, str]) -> str:
    exe = str(tree / ".venv" / "bin" / "turngate")
    subprocess.run([exe, "migrate"], cwd=str(tree), env=env, check=True, timeout=120,
                   capture_output=True)
    out = subprocess.run([exe, "keys", "create", "bench"], cwd=str(tree), env=env, check=True,
                         timeout=60, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


async def one_turn(port: int, key: str, thread: str, model: str,
                   timeout: float = 300.0) -> tuple[int, int, bool]:
    """(HTTP status, text deltas read, ended with [DONE]) of one turn."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"turn_id": uuid.uuid4().hex, "text": "hello there",
                       "model": model}).encode()
    status, deltas, done = 0, 0, False
    try:
        async with asyncio.timeout(timeout):
            writer.write(
                b"POST /v1/threads/%s/turns HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
                b"Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (thread.encode(), key.encode(), len(body), body))
            tail = b""
            while data := await reader.read(262144):
                if not status:
                    status = int(data[9:12])
                buf = tail + data
                deltas += buf.count(DELTA) - tail.count(DELTA)
                if DONE in buf:
                    done = True
                    break
                tail = buf[-32:]
    finally:
        writer.transport.abort()
    return status, deltas, done


async def _quiet(proc: Proc, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        c0 = proc.cpu()
        await asyncio.sleep(0.5)
        if proc.cpu() - c0 < 0.01:
            return


async def measure(tree: Path, db: str, upstream: int, logdir: Path, kinds: list[str],
                  tokens: int, repeat: int) -> dict[str, list[float]]:
    if db == "pg":
        await _fresh_pg()
        url = PG_URL
    else:
        url = f"sqlite:///{logdir / (uuid.uuid4().hex + '.db')}"
    env = _env(tree, url, upstream)
    key = _migrate_and_key(tree, env)
    port = free_port()
    cmd = [str(tree / ".venv" / "bin" / "turngate"), "serve", "--host", "127.0.0.1",
           "--port", str(port)]
    proc = _spawn(f"{tree.name}-{db}", cmd, env, logdir, port, b"/healthz")
    models = {"scripted": f"scripted:tokens={tokens},delay_ms=0",
              "openai": f"openai:fake-t{tokens}-d0"}
    warm = {"scripted": "scripted:tokens=200,delay_ms=0", "openai": "openai:fake-t200-d0"}
    out: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        threads = await _make_threads(port, key, 20 * len(kinds) + repeat * len(kinds))
        for kind in kinds:
            for _ in range(10):
                st, _n, ok = await one_turn(port, key, threads.pop(), warm[kind])
                if st != 200 or not ok:
                    raise RuntimeError(f"warm-up {kind}: status {st}, done {ok}")
        for _ in range(repeat):
            for kind in kinds:
                await _quiet(proc)
                c0 = proc.cpu()
                st, n, ok = await one_turn(port, key, threads.pop(), models[kind])
                cpu = proc.cpu() - c0
                if st != 200 or not ok or n != tokens:
                    raise RuntimeError(f"{kind}: status {st}, deltas {n}, done {ok}")
                out[kind].append(cpu * 1e6 / n)  # ms per 1,000 events
    finally:
        proc.stop()
    return out


async def amain(args: argparse.Namespace, trees: list[tuple[str, Path]]) -> int:
    raise_nofile()
    kinds = args.kinds.split(",")
    dbs = args.dbs.split(",")
    logdir = Path(tempfile.mkdtemp(prefix="tg-cpu-"))
    print(f"# logs in {logdir}", flush=True)
    fake = start_fake(logdir)
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        n: {d: {k: [] for k in kinds} for d in dbs} for n, _ in trees}
    try:
        for rnd in range(args.rounds):
            order = trees if rnd % 2 == 0 else list(reversed(trees))
            for name, tree in order:
                for db in dbs:
                    got = await measure(tree, db, fake.port, logdir, kinds, args.tokens,
                                        args.repeat)
                    for kind, vals in got.items():
                        results[name][db][kind].extend(vals)
                        print(f"round {rnd} {name:>8} {db:>6} {kind:>8}: "
                              + " ".join(f"{v:.2f}" for v in vals) + " ms/1k", flush=True)
    finally:
        fake.stop()
    print("\nmedians, gateway CPU ms per 1,000 events:")
    for db in dbs:
        for kind in kinds:
            row = [f"{name}={statistics.median(results[name][db][kind]):.2f}"
                   for name, _ in trees if results[name][db][kind]]
            print(f"  {db:>6} {kind:>8}: " + "  ".join(row))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = ROOT / "bench" / "results" / f"cpu-per-event-{stamp}.json"
    path.write_text(json.dumps({"tokens": args.tokens, "trees": dict(
        (n, str(p)) for n, p in trees), "results": results}, indent=1))
    print(f"# {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", default=f"this={ROOT}")
    ap.add_argument("--dbs", default="pg,sqlite")
    ap.add_argument("--kinds", default="scripted,openai")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2, help="turns of each kind per server")
    args = ap.parse_args()
    trees = [(n, Path(p).resolve()) for n, p in (t.split("=", 1) for t in args.trees.split(","))]
    return asyncio.run(amain(args, trees))


if __name__ == "__main__":
    sys.exit(main())
