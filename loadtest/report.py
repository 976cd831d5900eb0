"""The results as Markdown tables: what bench.py and bench_scale.py print, and
docs/performance.md.

    python loadtest/report.py     # reads loadtest/results/bench.json and bench-scale.json
"""

from __future__ import annotations

import json
from typing import Any

from harness import RESULTS, machine_line


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def latency(fig: dict[str, Any]) -> str:
    return f"p50 {fig['p50_ms']:.1f} / p99 {fig['p99_ms']:.1f} ms" if fig else "-"


# The side-by-side layout, shared by the terminal table and loadtest/report.py:
# (label, figure, key, unit, reference label, reference figure, key, ratio name).
# A key of None means the latency cells of the figures.
LAYOUT: list[tuple[str, str, str | None, str, str, str, str | None, str]] = [
    ("single durable POST (4 metrics)", "single_post", "req_per_s", "req/s",
     "no-op POST", "noop_post", "req_per_s", "single_vs_noop"),
    ("  latency", "single_post", None, "", "", "noop_post", None, ""),
    ("batch POST (1,000 x 4 metrics)", "batch_post", "rows_per_s", "rows/s",
     "COPY ceiling, 1 conn", "copy_ceiling", "rows_per_s", "batch_vs_copy"),
    ("GET /v1/devices/{id}/latest", "latest_get", "req_per_s", "req/s",
     "no-op GET", "noop_get", "req_per_s", "latest_vs_noop_get"),
    ("  latency", "latest_get", None, "", "", "noop_get", None, ""),
    ("GET /v1/latest, 100 devices", "latest_100_get", "req_per_s", "req/s",
     "", "", "", ""),
    ("  latency", "latest_100_get", None, "", "", "", "", ""),
    ("aggregates {days} d hourly", "aggregates", "endpoint_ms", "ms",
     "time_bucket over raw", "aggregates", "raw_time_bucket_ms", "rollup_speedup"),
    ("single durable POST", "single_post", "req_per_s", "req/s",
     "naive FastAPI+ORM", "naive_post", "req_per_s", "vs_naive"),
    ("  latency", "single_post", None, "", "", "naive_post", None, ""),
    ("batch POST with rollups", "batch_post", "rows_per_s", "rows/s",
     "without rollups", "batch_post_no_rollups", "rows_per_s", "rollup_ingest_cost"),
    ("COPY with rollups", "copy_ceiling", "rows_per_s", "rows/s",
     "without rollups", "copy_ceiling_no_rollups", "rows_per_s", ""),
    ("mixed: single POST beside batches", "mixed.single_mixed", "req_per_s", "req/s",
     "single POST alone, c32", "mixed.single_alone", "req_per_s", ""),
    ("  latency", "mixed.single_mixed", None, "", "", "mixed.single_alone", None,
     "mixed_single_p99_ms"),
    ("mixed: batch POST beside singles", "mixed.batch_mixed", "rows_per_s", "rows/s",
     "batch POST alone, c4", "mixed.batch_alone", "rows_per_s", "mixed_batch_kept"),
    ("peak RSS of the service", "peak_rss_mb", "service", "MB",
     "naive baseline", "peak_rss_mb", "naive", ""),
]


def side_by_side(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(label, value, reference label, reference value, ratio name) of every LAYOUT row."""
    figures = report["figures"]

    def cell(name: str, key: str | None, unit: str) -> str:
        fig: dict[str, Any] = figures
        for part in name.split("."):  # "mixed.single_mixed": a figure inside a figure
            fig = fig.get(part) or {}
        if not name or "skipped" in fig:
            return "-" if name else ""
        return latency(fig) if key is None else fmt(fig.get(key), unit)

    days = (figures.get("aggregates") or {}).get("days", "?")
    return [(label.replace("{days}", str(days)), cell(name, key, unit), ref_label,
             cell(ref, ref_key, unit), ratio)
            for label, name, key, unit, ref_label, ref, ref_key, ratio in LAYOUT]


def bench_tables(report: dict[str, Any]) -> str:
    """The side-by-side table (Markdown), the rollup levels' costs, the notes."""
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
    goal = report["goal"]
    met = "met" if goal["met"] else "missed"
    out += ["", f"[n] = items in the answer; growth = p50 at the largest size / smallest;"
                f" goal: reads within x{goal['reads_within']} ({met})"]
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
