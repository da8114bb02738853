"""What one idle ``openai:`` stream holds in the gateway, by tracemalloc (quicker than
``providers.py --only idle`` and says where the memory is).

``turngate serve`` runs under tracemalloc (traceback depth 12) beside the bench's fake
upstream; streams whose upstream sends one token and then holds are opened and read to
that token. A snapshot is taken with ``--n1`` streams held and another with ``--n2``
(each a few seconds after the last opened, once their first checkpoints are written);
the difference over ``n2 - n1`` is the memory per idle stream, printed in all and by
the package that allocated it.

    .venv/bin/python bench/idle_memory.py                      # SQLite, 50 then 250
    .venv/bin/python bench/idle_memory.py --db pg --top 30     # PostgreSQL, 30 sites
    .venv/bin/python bench/idle_memory.py --tree /path/to/other/checkout

``--tree``: run the gateway from another checkout (through ``PYTHONPATH``), to compare.
Needs PostgreSQL on 127.0.0.1:5432 for ``--db pg``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import signal
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

THIS = Path(__file__).resolve()
ROOT = THIS.parent.parent
DEPTH = 12
#: Where an allocation is counted: the first of these found in its file name.
PACKAGES = ("aiohttp", "uvicorn", "anyio", "starlette", "llm_adapters", "gateway/streaming",
            "gateway/turn", "gateway/api", "gateway/ops", "asyncio/locks", "weakref", "asyncio")


def _serve(argv: list[str]) -> None:
    """In the server process: trace, and dump a snapshot at each SIGUSR1. (The gateway
    is imported as the path finds it: from ``--tree`` through ``PYTHONPATH``.)"""
    tracemalloc.start(DEPTH)
    out, taken = os.environ["IDLE_MEMORY_SNAPSHOT"], [0]

    def dump(_sig: int, _frame: Any) -> None:
        gc.collect()
        path = f"{out}.{taken[0]}"
        tracemalloc.take_snapshot().dump(path)
        Path(path + ".done").touch()
        taken[0] += 1

    signal.signal(signal.SIGUSR1, dump)
    from gateway.ops.cli import main

    sys.exit(main(argv))


async def _snapshots(args: argparse.Namespace, tmp: Path) -> list[tracemalloc.Snapshot]:
    sys.path.insert(0, str(ROOT))
    from bench import providers as P
    from bench.common import VENV_BIN, free_port, fresh_pg_database, gateway_env
    from bench.sqlite_burst import _make_threads

    fake = P.start_fake(tmp)
    db = f"turngate_idle_memory_{os.getpid()}"
    try:
        if args.db == "pg":
            await fresh_pg_database(db)
            url = f"postgresql://postgres@127.0.0.1:5432/{db}"
        else:
            url = f"sqlite:///{tmp / 'idle.db'}"
        tree = Path(args.tree) if args.tree else ROOT
        key = P._migrate_and_key(url, tree if args.tree else None)
        port = free_port()
        env = gateway_env(url, OPENAI_BASE_URL=f"http://127.0.0.1:{fake.port}/v1",
                          OPENAI_API_KEY="fake-key", IDLE_MEMORY_SNAPSHOT=str(tmp / "snap"))
        if args.tree:
            env["PYTHONPATH"] = str(tree)
        cmd = [str(VENV_BIN / "python"), str(THIS), "--serve", "serve",
               "--host", "127.0.0.1", "--port", str(port)]
        server = P._spawn("turngate", cmd, env, tmp, port, b"/healthz", timeout=120)
        try:
            target = P.Target("turngate", port, P.turngate_request(key), b"data: [DONE]",
                              proc=server)
            target.threads = await _make_threads(port, key, args.n2 + 30)
            for _ in range(20):  # warm-up: code paths, pools, the first connections
                await P.run_stream(target, "openai:fake-t3-d0")
            hold = asyncio.Event()
            tasks: list[asyncio.Future[Any]] = []
            snaps = []
            for k, n in enumerate((args.n1, args.n2)):
                opened: list[Any] = []
                all_open = asyncio.Event()
                want = n - len(tasks)

                def on_open(res: Any, opened: list[Any] = opened,
                            all_open: asyncio.Event = all_open, want: int = want) -> None:
                    opened.append(res)
                    if len(opened) == want:
                        all_open.set()

                tasks += [asyncio.ensure_future(P.run_stream(
                    target, "openai:fake-t1-hold", hold=hold, opened=on_open))
                    for _ in range(want)]
                await asyncio.wait_for(all_open.wait(), 120)
                failed = [r for r in opened if r.t_first is None]
                if failed:
                    raise SystemExit(f"{len(failed)} streams did not open: {failed[:3]}")
                await asyncio.sleep(4.0)  # their first checkpoints are written
                server.proc.send_signal(signal.SIGUSR1)
                done = str(tmp / f"snap.{k}.done")
                for _ in range(600):  # a snapshot of the server takes a few seconds
                    if await asyncio.to_thread(os.path.exists, done):
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise SystemExit("the server wrote no snapshot within 60 s")
                snaps.append(tracemalloc.Snapshot.load(str(tmp / f"snap.{k}")))
            hold.set()
            await asyncio.gather(*tasks)
            return snaps
        finally:
            server.stop()
    finally:
        fake.stop()
        if args.db == "pg":
            await P.drop_pg(db)


def _report(snaps: list[tracemalloc.Snapshot], args: argparse.Namespace) -> None:
    drop = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = (s.filter_traces(drop) for s in snaps)
    n = args.n2 - args.n1
    total = sum(t.size for t in after.traces) - sum(t.size for t in before.traces)
    print(f"traced memory per idle stream: {total / n / 1024:.2f} KiB "
          f"({args.db}, {args.n1} then {args.n2} streams held)")
    by_package: collections.Counter[str] = collections.Counter()
    for stat in after.compare_to(before, "filename"):
        name = stat.traceback[0].filename
        package = next((p for p in PACKAGES if p in name), Path(name).name)
        by_package[package] += stat.size_diff
    for package, size in by_package.most_common():
        if abs(size) / n >= 50:
            print(f"  {size / n / 1024:6.2f} KiB  {package}")
    site = Path(tracemalloc.__file__).parent / "site-packages"
    site = next((Path(p) for p in sys.path if p.endswith("site-packages")), site)
    print(f"largest allocation sites (per stream; newest frames first, {site} left out):")
    for stat in after.compare_to(before, "traceback")[: args.top]:
        frames = list(stat.traceback)[::-1][:6]
        shown = " <- ".join(
            f"{f.filename.replace(str(site) + '/', '').replace(str(ROOT) + '/', '')}:{f.lineno}"
            for f in frames)
        print(f"  {stat.size_diff / n:6.0f} B  {shown}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        _serve(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=("sqlite", "pg"), default="sqlite")
    ap.add_argument("--n1", type=int, default=50, help="streams held at the first snapshot")
    ap.add_argument("--n2", type=int, default=250, help="streams held at the second")
    ap.add_argument("--top", type=int, default=15, help="allocation sites to list")
    ap.add_argument("--tree", default="", help="run the gateway from this checkout")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.common import raise_nofile

    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="turngate-idle-memory-") as tmp:
        snaps = asyncio.run(_snapshots(args, Path(tmp)))
    _report(snaps, args)


if __name__ == "__main__":
    main()
