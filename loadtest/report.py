"""Markdown tables of the latest results, for the README's Performance section.

    python loadtest/report.py     # reads loadtest/results/bench.json and bench-scale.json
"""

from __future__ import annotations

import json
from typing import Any

from bench import fmt, side_by_side
from harness import RESULTS


def machine_line(machine: dict[str, Any]) -> str:
    idle = machine.get("cpu_idle_before_pct")
    quiet = "quiet" if idle is not None and idle >= 90 else "**shared: other work used the CPU**"
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB,"
            f" PostgreSQL {machine['postgresql']} (shared_buffers {machine['shared_buffers']}),"
            f" TimescaleDB {machine['timescaledb']}, Python {machine['python']};"
            f" measured {machine['measured_at']} at commit {machine['commit']};"
            f" CPU idle before the run {idle}% ({quiet}).")


def bench_tables(report: dict[str, Any]) -> str:
    g = report["goals"]

    def goal(name: str) -> str:
        entry = g.get(name, {})
        met = {True: "met", False: "**missed**", None: "-"}[entry.get("met")]
        return f"{fmt(entry.get('value'))} | {entry.get('goal', '')} | {met}"

    out = ["| vitalstore | | reference | | ratio | goal | |", "|---|---:|---|---:|---:|---|---|"]
    for name, value, ref, ref_value, ratio in side_by_side(report):
        name = name.replace("  ", "&nbsp;&nbsp;")
        out.append(f"| {name} | {value} | {ref} | {ref_value} | "
                   f"{goal(ratio) if ratio else ' | | '} |")
    levels = (report["figures"].get("rollup_levels") or {}).get("ms_per_flush")
    if levels:
        out += ["", "Rollup maintenance in the database alone (`write_batch`, ms per flush):", "",
                "| rollup levels | flush of 32 single POSTs | flush of 5,000 batch readings |",
                "|---|---:|---:|"]
        out += [f"| {name} | {v['flush_32_singles']:.2f} | {v['flush_5000_batch']:.0f} |"
                for name, v in levels.items()]
    out += ["", *[f"- {note}" for note in report.get("notes", [])]]
    return "\n".join(out)


def scale_table(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    names = {"latest": "latest", "history_1h": "1-hour history page",
             "aggregate_30d": "30-day hourly aggregate",
             "raw_time_bucket_30d": "(time_bucket over raw rows, SQL)",
             "post": "single POST (durable)"}
    head = "| p50 / p99 ms | " + " | ".join(f"{int(s):,} readings" for s in sizes) + " | growth |"
    out = [head, "|---|" + "---:|" * (len(sizes) + 1)]
    for key, label in names.items():
        cells = []
        for size in sizes.values():
            value = size["latency_ms"].get(key, {})
            items = f" [{value['items']}]" if "items" in value else ""
            cells.append(f"{value['p50_ms']:.1f} / {value['p99_ms']:.1f}{items}"
                         if "p50_ms" in value else "skipped")
        growth = report["growth"].get(key)
        out.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(growth)} |")
    out.append("| load by SQL (rows/s) | " + " | ".join(
        fmt(s["load_rows_per_s"]) for s in sizes.values()) + " | |")
    out.append("| database size (MB) | " + " | ".join(
        fmt(s["bytes"]["database"] / 2**20) for s in sizes.values()) + " | |")
    out.append("| bytes per reading | " + " | ".join(
        fmt(s["bytes_per_reading"]) for s in sizes.values()) + " | |")
    return "\n".join(out)


def main() -> None:
    for name, render in (("bench.json", bench_tables), ("bench-scale.json", scale_table)):
        path = RESULTS / name
        if not path.exists():
            print(f"({path.name}: not measured yet)\n")
            continue
        report = json.loads(path.read_text())
        print(f"### {name}\n\n{machine_line(report['machine'])}\n\n{render(report)}\n")


if __name__ == "__main__":
    main()
