"""Run every turngate benchmark against the bare baselines, alternated, in one run.

    .venv/bin/python bench/run_all.py            # full (~8-10 min on 2 cores)
    .venv/bin/python bench/run_all.py --quick    # smaller loads (~3 min)
    .venv/bin/python bench/run_all.py --only throughput,ttfb

Benchmarks: throughput, ttfb, roundtrips, memory, departed, turns. Each load
is bounded in count and time. Results: bench/results/run-<stamp>.json and a
markdown summary printed at the end (also bench/results/run-<stamp>.md).
Needs PostgreSQL on 127.0.0.1:5432 (trust, user postgres); the database
``turngate_bench`` is dropped and recreated.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH_DB,
    NOSYNC_DB,
    ROOT,
    Db,
    HeldStream,
    RoundTripProxy,
    Server,
    bench_db_url,
    db_for,
    gather_limited,
    median,
    metric,
    migrate_and_key,
    pct,
    pg_cpu,
    raise_nofile,
    reset_database,
    run_turn,
    start_server,
)

RESULTS = ROOT / "bench" / "results"
BARES = ("bare-sse", "bare-plain")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Ctx:
    def __init__(
        self, args: argparse.Namespace, keys: dict[str, str], dbs: dict[str, Db], logdir: Path
    ) -> None:
        self.args = args
        self.quick = args.quick
        self.keys = keys
        self.dbs = dbs
        self.db = dbs[BENCH_DB]
        self.logdir = logdir
        self.servers: dict[str, Server] = {}

    def key_for(self, server: Server) -> str:
        return self.keys[db_for(server.name)]

    async def threads(self, server: Server, n: int) -> list[str]:
        if server.name.startswith("turngate"):
            return await self.dbs[db_for(server.name)].make_threads(n)
        return [f"x-{uuid.uuid4().hex}" for _ in range(n)]

    def start_all(self) -> None:
        for name in ("bare-sse", "bare-plain", "turngate", "turngate-nosync"):
            self.servers[name] = start_server(name, self.logdir)

    def stop_all(self) -> None:
        for s in self.servers.values():
            s.stop()
        self.servers.clear()


def order(
    round_no: int, names: tuple[str, ...] = ("bare-sse", "bare-plain", "turngate")
) -> list[str]:
    names = list(names)
    k = round_no % len(names)
    return names[k:] + names[:k]


async def warm(ctx: Ctx, s: Server, n: int = 10) -> None:
    threads = await ctx.threads(s, n)
    for t in threads:
        r = await run_turn(s.port, t, ctx.key_for(s), "scripted:tokens=5,delay_ms=0")
        if r.status != 200 or r.t_done is None:
            raise RuntimeError(f"warm-up turn on {s.name} failed: {r}")


def ratios(per_server: dict[str, float | None], higher_is_better: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tg = per_server.get("turngate")
    for bare in BARES:
        b = per_server.get(bare)
        if tg is not None and b:
            out[f"turngate/{bare}"] = round(tg / b, 3)
    return out


# --------------------------------------------------------------------------- (1) throughput


async def bench_throughput(ctx: Ctx) -> dict[str, Any]:
    rounds = 2 if ctx.quick else 3
    long_tokens = 20000
    levels = {10: 1000, 100: 100} if ctx.quick else {10: 2000, 100: 300, 1000: 50}
    raw: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds):
        for name in order(r):
            s = ctx.servers[name]
            per = raw.setdefault(name, {})
            (t,) = await ctx.threads(s, 1)
            res = await run_turn(
                s.port, t, ctx.key_for(s), f"scripted:tokens={long_tokens},delay_ms=0", timeout=120
            )
            if res.status != 200 or res.t_done is None:
                raise RuntimeError(f"long turn failed on {name}: {res}")
            rate = res.events / (res.t_done - res.t_send)
            per.setdefault("long", []).append(rate)
            log(f"throughput r{r} {name} long: {res.events} events, {rate:,.0f} ev/s")
            for n, tokens in levels.items():
                threads = await ctx.threads(s, n)
                t0 = time.perf_counter()
                results = await asyncio.gather(
                    *(
                        run_turn(
                            s.port,
                            th,
                            ctx.key_for(s),
                            f"scripted:tokens={tokens},delay_ms=0",
                            timeout=120,
                        )
                        for th in threads
                    )
                )
                bad = [x for x in results if x.status != 200 or x.t_done is None]
                end = max(x.t_done or t0 for x in results)
                events = sum(x.events for x in results)
                agg = events / (end - t0)
                per.setdefault(f"c{n}", []).append(agg)
                per.setdefault(f"c{n}_failed", []).append(len(bad))
                log(
                    f"throughput r{r} {name} c{n}x{tokens}: {events} events in "
                    f"{end - t0:.2f}s = {agg:,.0f} ev/s, failed {len(bad)}"
                )
    summary: dict[str, Any] = {
        "rounds": rounds,
        "long_tokens": long_tokens,
        "levels": {str(k): v for k, v in levels.items()},
        "raw": raw,
        "median": {},
        "ratio": {},
    }
    for key in ["long"] + [f"c{n}" for n in levels]:
        med = {name: median(raw[name][key]) for name in raw}
        summary["median"][key] = med
        summary["ratio"][key] = ratios(med)
    return summary


# --------------------------------------------------------------------------- (2) ttfb


async def db_round_trip_ms(n: int = 200) -> dict[str, float | None]:
    conn = await asyncpg.connect(bench_db_url())
    try:
        xs = []
        for _ in range(n):
            t = time.perf_counter()
            await conn.fetchval("SELECT 1")
            xs.append((time.perf_counter() - t) * 1000)
    finally:
        await conn.close()
    return {"median_ms": median(xs), "p90_ms": pct(xs, 0.9)}


async def durable_insert_ms(n: int = 100) -> dict[str, float | None]:
    """An autocommit INSERT on each bench database: the commit flush dominates on this disk."""
    out: dict[str, float | None] = {}
    for db in (BENCH_DB, NOSYNC_DB):
        conn = await asyncpg.connect(bench_db_url(db=db))
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS bench_probe (x int)")
            xs = []
            for _ in range(n):
                t = time.perf_counter()
                await conn.execute("INSERT INTO bench_probe VALUES (1)")
                xs.append((time.perf_counter() - t) * 1000)
            await conn.execute("DROP TABLE bench_probe")
        finally:
            await conn.close()
        out[db] = median(xs)
    return out


async def bench_ttfb(ctx: Ctx) -> dict[str, Any]:
    rounds = 3 if ctx.quick else 5
    per_round = 40 if ctx.quick else 100
    raw: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds):
        for name in order(r, ("bare-sse", "bare-plain", "turngate", "turngate-nosync")):
            s = ctx.servers[name]
            threads = await ctx.threads(s, per_round)
            fb, fd = [], []
            for t in threads:
                res = await run_turn(s.port, t, ctx.key_for(s), "scripted:tokens=3,delay_ms=0")
                if res.status != 200 or res.t_first_delta is None or res.t_first_byte is None:
                    raise RuntimeError(f"ttfb turn failed on {name}: {res}")
                fb.append((res.t_first_byte - res.t_send) * 1000)
                fd.append((res.t_first_delta - res.t_send) * 1000)
            per = raw.setdefault(name, {})
            per.setdefault("first_byte_ms", []).extend(fb)
            per.setdefault("first_delta_ms", []).extend(fd)
            log(
                f"ttfb r{r} {name}: first byte {median(fb):.2f} ms, first delta {median(fd):.2f} ms"
            )
    rtt = await db_round_trip_ms()
    summary: dict[str, Any] = {
        "rounds": rounds,
        "turns_per_round": per_round,
        "db_round_trip_raw_asyncpg": rtt,
        "median": {},
        "p90": {},
    }
    for name, per in raw.items():
        summary["median"][name] = {k: median(v) for k, v in per.items()}
        summary["p90"][name] = {k: pct(v, 0.9) for k, v in per.items()}
    tg = summary["median"]["turngate"]["first_delta_ms"]
    bare = summary["median"]["bare-sse"]["first_delta_ms"]
    budget = bare + (rtt["median_ms"] or 0) + 1.0
    summary["target"] = {
        "turngate_first_delta_ms": tg,
        "budget_ms": budget,
        "met": tg <= budget,
        "excess_ms": tg - budget,
    }
    nosync = summary["median"].get("turngate-nosync", {}).get("first_delta_ms")
    if nosync is not None:
        summary["target_nosync"] = {
            "turngate_first_delta_ms": nosync,
            "budget_ms": budget,
            "met": nosync <= budget,
            "excess_ms": nosync - budget,
        }
    return summary


# --------------------------------------------------------------------------- (3) round trips


async def bench_roundtrips(ctx: Ctx) -> dict[str, Any]:
    proxy = RoundTripProxy()
    await proxy.start()
    # Checkpoints/lease renewal/recovery are periodic, not per turn: push them out of
    # the window, and count them separately below with a long turn.
    # (in a thread: the proxy serves the server's start-up queries in this loop)
    s = await asyncio.to_thread(
        start_server,
        "turngate",
        ctx.logdir,
        db_url=bench_db_url(proxy.port),
        TURNGATE_CHECKPOINT_SECONDS="60",
        TURNGATE_LEASE_SECONDS="120",
    )
    try:
        await warm(ctx, s, 5)
        n = 20 if ctx.quick else 50
        threads = await ctx.threads(s, n)
        counts = []
        for t in threads:
            await asyncio.sleep(0.02)
            proxy.round_trips = 0
            res = await run_turn(s.port, t, ctx.key_for(s), "scripted:tokens=5,delay_ms=0")
            if res.status != 200 or res.t_done is None:
                raise RuntimeError(f"round-trip turn failed: {res}")
            await asyncio.sleep(0.05)  # anything after [DONE] (nothing expected)
            counts.append(proxy.round_trips)
        # a second turn on an existing thread (history read has rows)
        (t2,) = await ctx.threads(s, 1)
        await run_turn(s.port, t2, ctx.key_for(s), "scripted:tokens=5,delay_ms=0")
        await asyncio.sleep(0.05)
        proxy.round_trips = 0
        await run_turn(s.port, t2, ctx.key_for(s), "scripted:tokens=5,delay_ms=0")
        await asyncio.sleep(0.05)
        second = proxy.round_trips
        # idle background rate
        proxy.round_trips = 0
        await asyncio.sleep(1.0)
        idle = proxy.round_trips
    finally:
        await asyncio.to_thread(s.stop)
    # checkpoints of a long turn at the default 2 s interval
    s = await asyncio.to_thread(
        start_server, "turngate", ctx.logdir, db_url=bench_db_url(proxy.port)
    )
    try:
        await warm(ctx, s, 2)
        (t,) = await ctx.threads(s, 1)
        proxy.round_trips = 0
        res = await run_turn(
            s.port, t, ctx.key_for(s), "scripted:tokens=100,delay_ms=50", timeout=30
        )
        await asyncio.sleep(0.05)
        long_rt = proxy.round_trips
        long_s = (res.t_done or 0) - res.t_send
    finally:
        await asyncio.to_thread(s.stop)
        await proxy.close()
    return {
        "method": "TCP proxy counting client->server flights per connection (pipelined "
        "messages in one flight count once)",
        "short_turn": {
            "model": "scripted:tokens=5,delay_ms=0",
            "n": len(counts),
            "median": median(counts),
            "min": min(counts),
            "max": max(counts),
        },
        "second_turn_same_thread": second,
        "idle_round_trips_per_s_with_checkpoint_60s": idle,
        "long_turn_5s_default_checkpoint": {"round_trips": long_rt, "seconds": long_s},
        "target": {"max": 4, "met": median(counts) <= 4},
    }


# --------------------------------------------------------------------------- (4) memory


async def bench_memory(ctx: Ctx) -> dict[str, Any]:
    steps = [500, 1000] if ctx.quick else [1000, 5000]
    model = "scripted:tokens=1,delay_ms=600000"
    out: dict[str, Any] = {"model": model, "servers": {}}
    for name in ("bare-sse", "bare-plain", "turngate"):
        s = start_server(name, ctx.logdir)
        held: list[HeldStream] = []
        try:
            await warm(ctx, s, 20)
            # warm the idle path too (a few held streams, then closed)
            warm_held = [HeldStream() for _ in range(20)]
            wt = await ctx.threads(s, 20)
            await asyncio.gather(
                *(
                    h.open(s.port, t, ctx.key_for(s), model)
                    for h, t in zip(warm_held, wt, strict=False)
                )
            )
            for h in warm_held:
                h.close()
            await asyncio.sleep(2.0)
            rss0 = s.rss()
            cpu0 = s.cpu()
            res: dict[str, Any] = {"rss0_mib": rss0 / 2**20, "steps": []}
            for target in steps:
                add = target - len(held)
                threads = await ctx.threads(s, add)
                new = [HeldStream() for _ in range(add)]
                t0 = time.perf_counter()
                await gather_limited(
                    [
                        h.open(s.port, t, ctx.key_for(s), model, timeout=60)
                        for h, t in zip(new, threads, strict=False)
                    ],
                    200,
                )
                opened_s = time.perf_counter() - t0
                held.extend(new)
                await asyncio.sleep(2.5)
                gc.collect()
                rss = s.rss()
                ok = sum(h.ok for h in held)
                statuses: dict[str, int] = {}
                for h in held:
                    statuses[h.status] = statuses.get(h.status, 0) + 1
                alive = sum(1 for h in held if h.ok and h.task is not None and not h.task.done())
                c0, w0 = s.cpu(), time.perf_counter()
                await asyncio.sleep(2.0)
                idle_cpu = (s.cpu() - c0) / (time.perf_counter() - w0)
                step = {
                    "streams": target,
                    "ok": ok,
                    "open_statuses": statuses,
                    "alive": alive,
                    "open_seconds": opened_s,
                    "rss_mib": rss / 2**20,
                    "kib_per_stream": (rss - rss0) / 1024 / max(ok, 1),
                    "idle_cpu_fraction_while_held": idle_cpu,
                }
                res["steps"].append(step)
                log(
                    f"memory {name} {target}: ok {ok} alive {alive}, "
                    f"{step['kib_per_stream']:.1f} KiB/stream, idle CPU {idle_cpu:.0%}"
                )
            res["cpu_s_total"] = s.cpu() - cpu0
            out["servers"][name] = res
        finally:
            for h in held:
                h.close()
            await asyncio.sleep(0.5)
            s.stop()
    tg = out["servers"]["turngate"]["steps"]
    out["target"] = {
        "max_kib": 45,
        "kib_per_stream": [x["kib_per_stream"] for x in tg],
        "held": [x["alive"] for x in tg],
        "met": all(x["kib_per_stream"] <= 45 and x["alive"] == x["streams"] for x in tg),
    }
    return out


# --------------------------------------------------------------------------- (5) departed


async def bench_departed(ctx: Ctx) -> dict[str, Any]:
    n = 300 if ctx.quick else 1000
    # 5 deltas/s per stream: 1,000 streams stay below this machine's event capacity
    # before the close (at 50 ms both servers were already saturated and backlogged).
    delay_ms = 200
    model = f"scripted:tokens=100000,delay_ms={delay_ms}"
    out: dict[str, Any] = {"streams": n, "model": model, "servers": {}}
    for name in ("bare-sse", "turngate"):
        s = start_server(name, ctx.logdir)
        held: list[HeldStream] = []
        try:
            await warm(ctx, s, 5)
            threads = await ctx.threads(s, n)
            held = [HeldStream() for _ in range(n)]
            await gather_limited(
                [
                    h.open(s.port, t, ctx.key_for(s), model, timeout=60)
                    for h, t in zip(held, threads, strict=False)
                ],
                200,
            )
            ok = sum(h.ok for h in held)
            statuses: dict[str, int] = {}
            for h in held:
                statuses[h.status] = statuses.get(h.status, 0) + 1
            await asyncio.sleep(2.0)
            c0, w0 = s.cpu(), time.perf_counter()
            ev0 = sum(h.events for h in held)
            await asyncio.sleep(1.0)
            busy_cpu = (s.cpu() - c0) / (time.perf_counter() - w0)
            ev_rate = (sum(h.events for h in held) - ev0) / (time.perf_counter() - w0)
            # all clients leave at once
            cpu_close = s.cpu()
            t_close = time.perf_counter()
            for h in held:
                h.close()
            samples: list[tuple[float, float]] = []
            gen_zero = rows_zero = quiet_at = None
            last_cpu, last_t = cpu_close, t_close
            quiet_since: float | None = None
            deadline = t_close + 20
            while time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
                now, cpu = time.perf_counter(), s.cpu()
                samples.append((now - t_close, cpu - cpu_close))
                rate = (cpu - last_cpu) / (now - last_t)
                if quiet_at is None:
                    if rate < 0.05:
                        if quiet_since is None:
                            quiet_since = last_t
                        if now - quiet_since >= 0.2:
                            quiet_at = quiet_since - t_close
                    else:
                        quiet_since = None
                last_cpu, last_t = cpu, now
                if name == "turngate":
                    if gen_zero is None:
                        g = await metric(s.port, "turngate_active_generations")
                        if g == 0:
                            gen_zero = time.perf_counter() - t_close
                    if rows_zero is None and await ctx.db.streaming_count() == 0:
                        rows_zero = time.perf_counter() - t_close
                done = quiet_at is not None and (
                    name != "turngate" or (gen_zero is not None and rows_zero is not None)
                )
                if done:
                    break
            cpu_after = None
            if quiet_at is not None:
                cpu_after = next((c for t, c in samples if t >= quiet_at), samples[-1][1])
            res = {
                "ok": ok,
                "open_statuses": statuses,
                "busy_cpu_fraction": busy_cpu,
                "events_per_s_before": ev_rate,
                "cpu_quiet_after_s": quiet_at,
                "cpu_s_burned_after_close": cpu_after,
                "active_generations_zero_after_s": gen_zero,
                "rows_finalized_after_s": rows_zero,
            }
            if name == "turngate":
                res["finalized_total"] = await metric(s.port, "turngate_turns_finalized_total")
            out["servers"][name] = res
            log(f"departed {name}: {res}")
        finally:
            for h in held:
                h.close()
            s.stop()
    tg = out["servers"]["turngate"]
    stop = tg["active_generations_zero_after_s"]
    out["target"] = {
        "generation_stops_within_s": 1,
        "rows_within_s": 5,
        "met": bool(
            stop is not None
            and stop <= 1
            and tg["rows_finalized_after_s"] is not None
            and tg["rows_finalized_after_s"] <= 5
        ),
    }
    return out


# --------------------------------------------------------------------------- (6) turns/s


async def bench_turns(ctx: Ctx) -> dict[str, Any]:
    rounds = 2
    total = 600 if ctx.quick else 2000
    conc = 32
    model = "scripted:tokens=5,delay_ms=0"
    raw: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        for name in order(r, ("bare-sse", "turngate", "turngate-nosync")):
            s = ctx.servers[name]
            threads = await ctx.threads(s, total)
            pg0, cpu0 = pg_cpu(), s.cpu()
            t0 = time.perf_counter()
            results = await gather_limited(
                [run_turn(s.port, t, ctx.key_for(s), model, timeout=60) for t in threads], conc
            )
            wall = time.perf_counter() - t0
            pg_used, srv_used = pg_cpu() - pg0, s.cpu() - cpu0
            bad = sum(1 for x in results if x.status != 200 or x.t_done is None)
            lat = [((x.t_done or 0) - x.t_send) * 1000 for x in results if x.t_done]
            row = {
                "turns": total,
                "failed": bad,
                "wall_s": wall,
                "turns_per_s": total / wall,
                "latency_median_ms": median(lat),
                "latency_p90_ms": pct(lat, 0.9),
                "server_cpu_s": srv_used,
                "postgres_cpu_s": pg_used,
                "postgres_cpu_ms_per_turn": pg_used * 1000 / total,
                "postgres_cores": pg_used / wall,
            }
            raw.setdefault(name, []).append(row)
            log(
                f"turns r{r} {name}: {row['turns_per_s']:.0f} turns/s, "
                f"median {row['latency_median_ms']:.1f} ms, failed {bad}, "
                f"postgres {pg_used:.2f} CPU-s, server {srv_used:.2f} CPU-s"
            )
    med = {name: median([x["turns_per_s"] for x in rows]) for name, rows in raw.items()}
    return {
        "rounds": rounds,
        "concurrency": conc,
        "model": model,
        "raw": raw,
        "median_turns_per_s": med,
        "ratio": {
            f"{n}/bare-sse": round(med[n] / med["bare-sse"], 3)
            for n in med
            if n.startswith("turngate")
        },
    }


# --------------------------------------------------------------------------- main


BENCHES = {
    "throughput": bench_throughput,
    "ttfb": bench_ttfb,
    "roundtrips": bench_roundtrips,
    "memory": bench_memory,
    "departed": bench_departed,
    "turns": bench_turns,
}
SHARED = {"throughput", "ttfb", "turns"}  # use the three long-running servers


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in (
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "sse-starlette",
        "databases",
        "asyncpg",
        "anyio",
    ):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "?"
    return out


async def amain(args: argparse.Namespace) -> int:
    nofile = raise_nofile()
    wanted = [b.strip() for b in args.only.split(",")] if args.only else list(BENCHES)
    unknown = set(wanted) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    # the shared-server benchmarks first, then those that start their own servers
    selected = [b for b in BENCHES if b in wanted and b in SHARED] + [
        b for b in BENCHES if b in wanted and b not in SHARED
    ]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"run-{stamp}{'-quick' if args.quick else ''}.json"
    logdir = Path(tempfile.mkdtemp(prefix="turngate-bench-"))
    log(f"logs in {logdir}; nofile {nofile}")
    keys: dict[str, str] = {}
    dbs: dict[str, Db] = {}
    for name in (BENCH_DB, NOSYNC_DB):
        await reset_database(name)
        keys[name] = migrate_and_key(name)
        dbs[name] = Db(name)
        await dbs[name].connect()
    db = dbs[BENCH_DB]
    pg_version = await db.pool.fetchval("SHOW server_version")  # type: ignore[union-attr]
    sync_commit = await db.pool.fetchval("SHOW synchronous_commit")  # type: ignore[union-attr]
    ctx = Ctx(args, keys, dbs, logdir)
    report: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/run_all.py"] + sys.argv[1:]),
        "quick": args.quick,
        "machine": {
            "cpus": psutil.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(),
            "postgresql": pg_version,
            "synchronous_commit": sync_commit,
            "durable_insert_ms": await durable_insert_ms(),
        },
        "versions": versions(),
        "results": {},
    }
    t_all = time.perf_counter()
    try:
        if SHARED & set(selected):
            ctx.start_all()
            for s in ctx.servers.values():
                await warm(ctx, s, 20)
        for name in selected:
            if name not in SHARED and ctx.servers:
                ctx.stop_all()  # the other benchmarks start their own servers
            log(f"== {name}")
            t = time.perf_counter()
            report["results"][name] = await BENCHES[name](ctx)
            report["results"][name]["elapsed_s"] = time.perf_counter() - t
            out_path.write_text(json.dumps(report, indent=2, default=str))
    finally:
        ctx.stop_all()
        for d in dbs.values():
            await d.close()
    report["elapsed_s"] = time.perf_counter() - t_all
    out_path.write_text(json.dumps(report, indent=2, default=str))
    log(f"wrote {out_path} in {report['elapsed_s']:.0f}s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller loads, fewer rounds")
    parser.add_argument("--only", default="", help="comma-separated: " + ",".join(BENCHES))
    args = parser.parse_args()
    try:
        import uvloop

        return uvloop.run(amain(args))
    except ImportError:
        return asyncio.run(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
