"""Print the figures table (markdown) of a run.

``python bench/summarize.py [results/run-*.json]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def main() -> None:
    paths = sys.argv[1:] or [str(max((Path(__file__).parent / "results").glob("run-*.json")))]
    d = json.loads(Path(paths[0]).read_text())
    r = d["results"]
    print(f"Run {paths[0]} — {d['date']} — `{d['command']}` — {d.get('elapsed_s', 0):.0f} s\n")
    print(
        "| figure | bare-sse | bare-plain | turngate | turngate-nosync "
        "| turngate/bare-sse | target |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    if "throughput" in r:
        t = r["throughput"]
        for key in t["median"]:
            m = t["median"][key]
            label = (
                "one long turn (20,000 deltas), events/s"
                if key == "long"
                else (
                    f"{key[1:]} concurrent turns × {t['levels'][key[1:]]} deltas, "
                    "aggregate events/s"
                )
            )
            fails = {n: sum(t["raw"][n].get(f"{key}_failed", [0])) for n in t["raw"]}
            tg = f(m.get("turngate"), 0) + (
                f" ({fails['turngate']} failed)" if fails.get("turngate") else ""
            )
            print(
                f"| {label} | {f(m.get('bare-sse'), 0)} | {f(m.get('bare-plain'), 0)} | {tg} | "
                f"| {f(t['ratio'][key].get('turngate/bare-sse'), 2)}× | "
                f"{'≥ 1.0×' if key == 'long' else ''} |"
            )
    if "ttfb" in r:
        t = r["ttfb"]
        m = t["median"]
        for k, label in (
            ("first_byte_ms", "time to first byte, ms (median)"),
            ("first_delta_ms", "time to first text delta, ms (median)"),
        ):
            tg, b = m["turngate"][k], m["bare-sse"][k]
            tgt = f"≤ {t['target']['budget_ms']:.2f} ms" if k == "first_delta_ms" else ""
            print(
                f"| {label} | {f(b, 2)} | {f(m['bare-plain'][k], 2)} | {f(tg, 2)} | "
                f"{f(m.get('turngate-nosync', {}).get(k), 2)} | +{tg - b:.2f} ms | {tgt} |"
            )
        print(
            f"| DB round trip (raw asyncpg SELECT 1), ms | | | "
            f"{f(t['db_round_trip_raw_asyncpg']['median_ms'], 2)} | | | |"
        )
    if "roundtrips" in r:
        t = r["roundtrips"]
        print(
            f"| DB round trips per short turn (wire) | 0 | 0 | {f(t['short_turn']['median'], 0)} "
            f"(min {t['short_turn']['min']}, max {t['short_turn']['max']}) | | | ≤ 4 |"
        )
        lt = t["long_turn_5s_default_checkpoint"]
        print(
            f"| DB round trips, one {lt['seconds']:.1f} s turn (2 s checkpoints) | | | "
            f"{lt['round_trips']} | | | |"
        )
    if "memory" in r:
        t = r["memory"]["servers"]
        steps = [s["streams"] for s in t["turngate"]["steps"]]
        for i, n in enumerate(steps):
            vals = {name: t[name]["steps"][i] for name in t}
            tg = vals["turngate"]
            print(
                f"| KiB per idle open stream at {n:,} (held) | "
                f"{f(vals['bare-sse']['kib_per_stream'])} ({vals['bare-sse']['alive']}) | "
                f"{f(vals['bare-plain']['kib_per_stream'])} ({vals['bare-plain']['alive']}) | "
                f"{f(tg['kib_per_stream'])} ({tg['alive']}) | | "
                f"{tg['kib_per_stream'] / vals['bare-sse']['kib_per_stream']:.2f}× | ≤ 45 |"
            )
            print(
                f"| server CPU while {n:,} streams sit idle | "
                f"{vals['bare-sse']['idle_cpu_fraction_while_held']:.0%} | "
                f"{vals['bare-plain']['idle_cpu_fraction_while_held']:.0%} | "
                f"{tg['idle_cpu_fraction_while_held']:.0%} | | | |"
            )
    if "departed" in r:
        t = r["departed"]["servers"]
        b, tg = t["bare-sse"], t["turngate"]
        n = r["departed"]["streams"]
        print(
            f"| departed ({n} streams): s until CPU quiet | {f(b['cpu_quiet_after_s'], 2)} | | "
            f"{f(tg['cpu_quiet_after_s'], 2)} | | | |"
        )
        print(
            f"| departed: CPU-s burned after the close | {f(b['cpu_s_burned_after_close'], 2)} | | "
            f"{f(tg['cpu_s_burned_after_close'], 2)} | | | |"
        )
        print(
            f"| departed: s until active generations = 0 | | | "
            f"{f(tg['active_generations_zero_after_s'], 2)} | | | ≤ 1 s |"
        )
        print(
            f"| departed: s until every row finalized | | | "
            f"{f(tg['rows_finalized_after_s'], 2)} | | | ≤ 5 s |"
        )
        print(
            f"| departed: streams opened OK | {b['ok']}/{n} | | {tg['ok']}/{n} "
            f"{tg.get('open_statuses', '')} | | | |"
        )
    if "turns" in r:
        t = r["turns"]
        m = t["median_turns_per_s"]
        print(
            f"| short turns/s end to end (conc {t['concurrency']}) | {f(m.get('bare-sse'), 0)} | | "
            f"{f(m.get('turngate'), 0)} | {f(m.get('turngate-nosync'), 0)} | "
            f"{f(t['ratio'].get('turngate/bare-sse'), 2)}× | |"
        )
        for name in ("turngate", "turngate-nosync"):
            rows = t["raw"].get(name, [])
            if rows:
                pg = sorted(x["postgres_cpu_ms_per_turn"] for x in rows)[len(rows) // 2]
                cores = sorted(x["postgres_cores"] for x in rows)[len(rows) // 2]
                srv = sorted(x["server_cpu_s"] * 1000 / x["turns"] for x in rows)[len(rows) // 2]
                print(
                    f"| {name}: PostgreSQL CPU ms/turn (cores busy); gateway CPU ms/turn | | | "
                    f"{pg:.2f} ({cores:.2f}); {srv:.2f} | | | |"
                )


if __name__ == "__main__":
    main()
