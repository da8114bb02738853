"""Turns started all at once on one gateway process, on SQLite and on PostgreSQL.

For each database and each burst size, a fresh ``turngate serve`` (uvicorn, one
worker) on a fresh database; the threads are made first over HTTP (setup, not
measured); then every turn of the burst is sent at once, one connection each, and
read to ``[DONE]``. Per burst it prints and stores:

- ``503``: responses ``503`` (``database_unavailable`` or any other);
- ``non_200``: every response that was not ``200``;
- ``lost``: streams that answered ``200`` but ended without ``[DONE]``;
- time to first token (request written → first ``text-delta`` read), median and p99;
- the rows afterwards: assistant rows not ``complete``, and assistant rows without
  exactly one ``token_usage`` row;
- from the server's log, how often the database was unavailable for which cause
  (``log_pool_wait``, ``log_timed_out``, ``log_writer_wait``; in the stored JSON).

Loopback only; every wait is bounded. Usage::

    .venv/bin/python bench/sqlite_burst.py                  # 100 and 1,000, both databases
    .venv/bin/python bench/sqlite_burst.py --dbs sqlite --bursts 100:2000:2
    .venv/bin/python bench/sqlite_burst.py --dbs postgresql --load 3   # a busy machine

A burst is ``N:TOKENS:DELAY_MS`` (``scripted:tokens=TOKENS,delay_ms=DELAY_MS``). The
defaults: 100 turns of 2,000 tokens 2 ms apart; 1,000 turns of 40 tokens 100 ms
apart (4 s each, so every turn also checkpoints); and 1,000 turns of 200 tokens
20 ms apart, which asks for more events per second than two cores can stream, so
the database writes compete with a saturated event loop. PostgreSQL runs in the
database ``turngate_burst`` (dropped and made again); SQLite in a file in a
temporary directory.

``--load N`` keeps N other processes spinning on the CPU while each burst runs (they
are ended when it ends), as on a machine shared with other work; ``--pool-size``
sets ``TURNGATE_DB_POOL_SIZE``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    VENV_BIN,
    TurnResult,
    fresh_pg_database,
    gateway_env,
    median,
    pct,
    raise_nofile,
    run_turn,
    start_server,
)

PG_DB = "turngate_burst"
PG_URL = f"postgresql://postgres@127.0.0.1:5432/{PG_DB}"


def _migrate_and_key(url: str) -> str:
    env = gateway_env(url)
    subprocess.run([str(VENV_BIN / "turngate"), "migrate"], cwd=str(ROOT), env=env,
                   check=True, timeout=120, capture_output=True)
    out = subprocess.run([str(VENV_BIN / "turngate"), "keys", "create", "bench"],
                         cwd=str(ROOT), env=env, check=True, timeout=60,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


async def _post_thread(port: int, key: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = b"{}"
        writer.write(
            b"POST /v1/threads HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (key.encode(), len(body), body))
        async with asyncio.timeout(30):
            data = b""
            while chunk := await reader.read(65536):
                data += chunk
    finally:
        writer.transport.abort()
    head, _, payload = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 201"):
        raise RuntimeError(f"POST /v1/threads answered {head[:40]!r}")
    return str(json.loads(payload)["id"])


async def _make_threads(port: int, key: str, n: int) -> list[str]:
    sem = asyncio.Semaphore(16)

    async def one() -> str:
        async with sem:
            return await _post_thread(port, key)

    return list(await asyncio.gather(*(one() for _ in range(n))))


_ROW_CHECKS = {
    "not_complete": "SELECT count(*) FROM messages WHERE role = 'assistant' "
                    "AND status <> 'complete'",
    "usage_not_one": "SELECT count(*) FROM messages m WHERE m.role = 'assistant' AND "
                     "(SELECT count(*) FROM token_usage u WHERE u.message_id = m.id) <> 1",
    "assistant_rows": "SELECT count(*) FROM messages WHERE role = 'assistant'",
}


async def _row_checks(db: str, sqlite_file: Path | None) -> dict[str, int]:
    if sqlite_file is not None:
        con = sqlite3.connect(sqlite_file, timeout=30)
        try:
            return {k: int(con.execute(q).fetchone()[0]) for k, q in _ROW_CHECKS.items()}
        finally:
            con.close()
    conn = await asyncpg.connect(PG_URL, timeout=10)
    try:
        return {k: int(await conn.fetchval(q)) for k, q in _ROW_CHECKS.items()}
    finally:
        await conn.close()


_SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"


@contextmanager
def cpu_load(processes: int, seconds: float = 600.0) -> Iterator[None]:
    """``processes`` other processes spinning on the CPU (each ends by itself after
    ``seconds`` at most), ended when the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(seconds=seconds)])
             for _ in range(processes)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=10)


async def burst(db: str, n: int, tokens: int, delay_ms: int, workdir: Path, *,
                load: int = 0, pool_size: int | None = None) -> dict[str, Any]:
    sqlite_file: Path | None = None
    if db == "sqlite":
        sqlite_file = workdir / f"burst-{n}.db"
        url = f"sqlite:///{sqlite_file}"
    else:
        await fresh_pg_database(PG_DB)
        url = PG_URL
    key = _migrate_and_key(url)
    extra = {} if pool_size is None else {"TURNGATE_DB_POOL_SIZE": str(pool_size)}
    server = start_server(f"turngate-{db}-{n}", workdir, db_url=url, **extra)
    try:
        threads = await _make_threads(server.port, key, n)
        model = f"scripted:tokens={tokens},delay_ms={delay_ms}"
        with cpu_load(load):
            load_avg0 = os.getloadavg()[0]
            cpu0, t0 = server.cpu(), time.perf_counter()
            results: list[TurnResult] = list(await asyncio.gather(
                *(run_turn(server.port, t, key, model, timeout=300.0) for t in threads)))
            wall = time.perf_counter() - t0
            cpu = server.cpu() - cpu0
            load_avg = os.getloadavg()[0]
    finally:
        server.stop()
    log = server.log.read_text(errors="replace")
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status or r.error)] = statuses.get(str(r.status or r.error), 0) + 1
    ttft = [(r.t_first_delta - r.t_send) * 1000 for r in results if r.t_first_delta is not None]
    out: dict[str, Any] = {
        "db": db, "turns": n, "model": model, "load_processes": load,
        "pool_size": pool_size or 10, "load_avg_1min": [load_avg0, load_avg],
        "status_503": sum(1 for r in results if r.status == 503),
        "non_200": sum(1 for r in results if r.status != 200),
        "lost": sum(1 for r in results if r.status == 200 and r.t_done is None),
        "statuses": statuses,
        "ttft_median_ms": median(ttft), "ttft_p99_ms": pct(ttft, 0.99),
        "wall_s": wall, "gateway_cpu_s": cpu,
        # Why the database was unavailable, from the server's log.
        "log_pool_wait": log.count("no pooled database connection free"),
        "log_timed_out": log.count("database operation timed out"),
        "log_writer_wait": log.count("the SQLite writer did not take this write"),
        **await _row_checks(db, sqlite_file),
    }
    print(json.dumps(out), flush=True)
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--dbs", default="sqlite,postgresql")
    ap.add_argument("--bursts", default="100:2000:2,1000:40:100,1000:200:20",
                    help="comma-separated N:TOKENS:DELAY_MS")
    ap.add_argument("--load", type=int, default=0,
                    help="processes spinning on the CPU during each burst")
    ap.add_argument("--pool-size", type=int, default=None, help="TURNGATE_DB_POOL_SIZE")
    args = ap.parse_args()
    raise_nofile()
    rows = []
    with tempfile.TemporaryDirectory(prefix="turngate-burst-") as tmp:
        print(f"# logs in {tmp}", flush=True)
        for spec in args.bursts.split(","):
            n, tokens, delay = (int(x) for x in spec.split(":"))
            for db in args.dbs.split(","):
                rows.append(await burst(db, n, tokens, delay, Path(tmp), load=args.load,
                                        pool_size=args.pool_size))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = ROOT / "bench" / "results" / f"sqlite-burst-{stamp}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "runs": rows}, indent=1))
    print("\n| database | turns at once | model | spinning | 503 | other non-200 | lost streams | "
          "TTFT median / p99 (ms) | not complete | usage rows ≠ 1 | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['db']} | {r['turns']:,} | `{r['model']}` | {r['load_processes']} | "
              f"{r['status_503']} | "
              f"{r['non_200'] - r['status_503']} | {r['lost']} | "
              f"{_fmt(r['ttft_median_ms'])} / {_fmt(r['ttft_p99_ms'])} | "
              f"{r['not_complete']} | {r['usage_not_one']} | {r['wall_s']:.1f} |")
    print(f"\nstored in {path.relative_to(ROOT)}")


if __name__ == "__main__":
    os.chdir(ROOT)
    asyncio.run(main())
