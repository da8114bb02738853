"""Gateway CPU per 1,000 events of one long turn, for two source trees side by side.

The server's own CPU seconds (psutil, user + system, of the ``turngate serve``
process) spent on one long turn, divided by the text deltas the client read: the
gateway's cost per event, without the client's and the upstream's share of the
machine that wall-clock events/s includes.

For every database (PostgreSQL: a database per tree, ``turngate_cpu_<name>``, made
again; SQLite: a fresh file), one ``turngate serve`` per tree (``name=path``, each run
from its own ``.venv``) is started, migrated and warmed up (short turns of each kind).
Then, ``--rounds`` times, for each kind, each server in turn (the order flipped every
round, so whatever else runs on the machine weighs on every tree alike) runs, once it
is quiet, one turn of that kind:

- ``scripted``: ``scripted:tokens=N,delay_ms=0`` (the ``throughput`` long turn of
  ``run_all.py``);
- ``openai``: ``openai:fake-tN-d0`` against ``fake_llm_upstream.py`` (the ``long``
  phase of ``providers.py``);
- ``conc`` (not run by default): 100 ``openai:`` streams at once, 2,000 tokens each
  2 ms apart (``--conc``; the ``conc`` phase of ``providers.py``).

    .venv/bin/python bench/cpu_per_event.py --trees before=../before,after=. --rounds 5
    .venv/bin/python bench/cpu_per_event.py --kinds openai,conc --rounds 2

Prints one line per turn and the medians per tree, database and kind; writes
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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    free_port,
    fresh_pg_database,
    gateway_env,
    raise_nofile,
)
from bench.providers import Proc, _spawn, start_fake  # noqa: E402
from bench.sqlite_burst import _make_threads  # noqa: E402

PG_DB = "turngate_cpu"
DELTA = b'"text-delta"'
DONE = b"data: [DONE]"


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


@dataclass
class Gateway:
    name: str
    proc: Proc
    key: str
    threads: list[str]


async def start(name: str, tree: Path, db: str, upstream: int, logdir: Path,
                n_threads: int) -> Gateway:
    if db == "pg":
        pg_db = f"{PG_DB}_{name}"
        await fresh_pg_database(pg_db)
        url = f"postgresql://postgres@127.0.0.1:5432/{pg_db}"
    else:
        url = f"sqlite:///{logdir / (uuid.uuid4().hex + '.db')}"
    env = _env(tree, url, upstream)
    key = _migrate_and_key(tree, env)
    port = free_port()
    cmd = [str(tree / ".venv" / "bin" / "turngate"), "serve", "--host", "127.0.0.1",
           "--port", str(port)]
    proc = _spawn(f"{name}-{db}", cmd, env, logdir, port, b"/healthz")
    return Gateway(name, proc, key, await _make_threads(port, key, n_threads))


async def measure(gw: Gateway, model: str, streams: int, want: int) -> float:
    """Gateway CPU ms per 1,000 text deltas read of ``streams`` turns of ``model`` at
    once (a failed stream's deltas count as far as they came)."""
    await _quiet(gw.proc)
    c0 = gw.proc.cpu()
    got = await asyncio.gather(*(one_turn(gw.proc.port, gw.key, gw.threads.pop(), model)
                                 for _ in range(streams)))
    cpu = gw.proc.cpu() - c0
    bad = [g for g in got if g[0] != 200 or not g[2] or g[1] != want]
    if len(bad) == len(got):
        raise RuntimeError(f"{gw.name} {model}: every stream failed, e.g. {bad[0]}")
    if bad:  # counted, not fatal: an older tree may refuse some of a burst (a 503)
        print(f"# {gw.name} {model}: {len(bad)} of {len(got)} streams failed, e.g. {bad[0]}",
              flush=True)
    return cpu * 1e6 / sum(g[1] for g in got)


async def amain(args: argparse.Namespace, trees: list[tuple[str, Path]]) -> int:
    raise_nofile()
    kinds = args.kinds.split(",")
    dbs = args.dbs.split(",")
    streams, conc_tokens, delay = (int(x) for x in args.conc.split(":"))
    # kind -> (model, streams at once, text deltas per stream)
    models = {"scripted": (f"scripted:tokens={args.tokens},delay_ms=0", 1, args.tokens),
              "openai": (f"openai:fake-t{args.tokens}-d0", 1, args.tokens),
              "conc": (f"openai:fake-t{conc_tokens}-d{delay}", streams, conc_tokens)}
    warm = {"scripted": "scripted:tokens=200,delay_ms=0", "openai": "openai:fake-t200-d0",
            "conc": "openai:fake-t200-d0"}
    n_threads = 10 * len(kinds) + args.rounds * sum(models[k][1] for k in kinds)
    logdir = Path(tempfile.mkdtemp(prefix="tg-cpu-"))
    print(f"# logs in {logdir}", flush=True)
    fake = start_fake(logdir)
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        n: {d: {k: [] for k in kinds} for d in dbs} for n, _ in trees}
    try:
        for db in dbs:
            gws: list[Gateway] = []
            try:
                for name, tree in trees:
                    gws.append(await start(name, tree, db, fake.port, logdir, n_threads))
                for gw in gws:
                    for kind in kinds:
                        for _ in range(10):
                            st, _n, ok = await one_turn(gw.proc.port, gw.key, gw.threads.pop(),
                                                        warm[kind])
                            if st != 200 or not ok:
                                raise RuntimeError(f"{gw.name} warm-up {kind}: {st}, {ok}")
                for rnd in range(args.rounds):
                    for kind in kinds:
                        model, n_streams, want = models[kind]
                        # The trees take turns, the order flipped every round: whatever
                        # else runs on the machine weighs on each alike.
                        for gw in (gws if rnd % 2 == 0 else gws[::-1]):
                            v = await measure(gw, model, n_streams, want)
                            results[gw.name][db][kind].append(v)
                            print(f"{db:>6} {kind:>8} round {rnd:>2} {gw.name:>8}: "
                                  f"{v:6.2f} ms/1k", flush=True)
            finally:
                for gw in gws:
                    gw.proc.stop()
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
    path.write_text(json.dumps({"tokens": args.tokens, "conc": args.conc, "trees": dict(
        (n, str(p)) for n, p in trees), "results": results}, indent=1))
    print(f"# {path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", default=f"this={ROOT}")
    ap.add_argument("--dbs", default="pg,sqlite")
    ap.add_argument("--kinds", default="scripted,openai")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--conc", default="100:2000:2",
                    help="kind conc: STREAMS:TOKENS:DELAY_MS of openai: streams at once")
    ap.add_argument("--rounds", type=int, default=7, help="turns of each kind per server")
    args = ap.parse_args()
    trees = [(n, Path(p).resolve()) for n, p in (t.split("=", 1) for t in args.trees.split(","))]
    return asyncio.run(amain(args, trees))


if __name__ == "__main__":
    sys.exit(main())
