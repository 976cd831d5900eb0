"""`make bench-dashboard`: the dashboard's 30-day device view and its page weight, in Chromium.

A scratch database gets 30 days of one device (DASHBOARD_BENCH_INTERVAL_S, default 1: a
bedside monitor's rate, 2.6 million readings of 4 metrics) by INSERT ... SELECT, so the
trigger fills `latest` and the rollups as ingestion would. With `vitalstore serve` on it,
headless Chromium (Debian's, as in the tests) opens /ui/#/device/<id>?range=30d
DASHBOARD_BENCH_RUNS times (default 5), each in a fresh context with the key already in
sessionStorage, and reports:

  open_to_drawn_ms    navigation start to every chart drawn (page load, API calls, drawing)
  switch_to_drawn_ms  from the 24h view, clicking 30d until every chart is drawn
  page_weight         bytes of the HTML, JavaScript and CSS the page loads (uncompressed)

Writes loadtest/results/dashboard.json. Goals (issue 14): under 1 s, under 200 KB.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import harness
from harness import RESULTS, ScratchDatabase, Service, log

sys.path.insert(0, str(harness.ROOT / "tests"))
from browser import chromium  # the tests' launcher: one place knows Chromium's flags

INTERVAL = timedelta(seconds=float(os.environ.get("DASHBOARD_BENCH_INTERVAL_S", "1")))
RUNS = int(os.environ.get("DASHBOARD_BENCH_RUNS", "5"))
DEVICE = "bench-ward:bed-1"
DRAWN = "() => window.vitalstore.drawnAt !== null"
PAGE_TYPES = {"document", "script", "stylesheet"}


async def load(db_url: str) -> dict[str, Any]:
    import asyncpg

    end = datetime.now(UTC).replace(second=0, microsecond=0)
    conn = await asyncpg.connect(db_url)
    try:
        with harness.timer() as took:
            rows = await harness.load_readings(conn, [DEVICE], end - timedelta(days=30), end,
                                               INTERVAL, progress="  load")
            await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return {"rows": rows, "readings": rows // len(harness.METRICS),
            "interval_s": INTERVAL.total_seconds(), "load_s": round(took[0], 1)}


async def one_run(browser: Any, url: str, key: str) -> dict[str, Any]:
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    await context.add_init_script(f"sessionStorage.setItem('vitalstore.key', {json.dumps(key)})")
    page = await context.new_page()
    weights: dict[str, int] = {}
    api_bytes = [0]

    async def count(response: Any) -> None:
        kind = response.request.resource_type
        body = await response.body()
        if kind in PAGE_TYPES:
            weights[response.url.removeprefix(url)] = len(body)
        elif "/v1/" in response.url:
            api_bytes[0] += len(body)

    pending: list[asyncio.Task[None]] = []
    page.on("response", lambda response: pending.append(asyncio.ensure_future(count(response))))
    device = DEVICE.replace(":", "%3A")
    await page.goto(f"{url}/ui/#/device/{device}?range=30d")
    await page.wait_for_function(DRAWN, timeout=60_000)
    opened = await page.evaluate("() => window.vitalstore.drawnAt")
    # Where the time went: the page's own files, then each API call (ms from navigation).
    timeline = await page.evaluate("""() => ({
      page_loaded: performance.getEntriesByType("navigation")[0].domContentLoadedEventEnd,
      api: performance.getEntriesByType("resource").filter((r) => r.name.includes("/v1/"))
        .map((r) => [new URL(r.name).pathname.split("/").pop() + " " + new URL(r.name).search
          .replace(/.*metrics=/, ""), Math.round(r.startTime), Math.round(r.responseEnd)]),
      charts: performance.getEntriesByType("mark").map((m) => [m.name, Math.round(m.startTime)]),
    })""")
    points = await page.evaluate(
        "() => Object.values(window.vitalstore.charts).map((c) => c.data[0].length)")
    await asyncio.gather(*pending)
    await page.click("text=24h")
    await page.wait_for_function(DRAWN, timeout=60_000)
    await page.click("text=30d")
    await page.wait_for_function(DRAWN, timeout=60_000)
    switched = await page.evaluate("() => window.vitalstore.drawnMs")
    await page.screenshot(path=str(RESULTS / "dashboard-30d.png"), full_page=True)
    await context.close()
    return {"open_to_drawn_ms": opened, "switch_to_drawn_ms": switched, "points": points,
            "timeline_ms": timeline,
            "page_bytes": weights, "api_bytes_30d": api_bytes[0]}


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 1)


async def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    db = await ScratchDatabase("dashboard").create()
    try:
        log(f"30 days of {DEVICE}, a reading every {INTERVAL.total_seconds():g} s")
        data = await load(db.url)
        key = harness.api_key(db.url)
        if not key:
            raise SystemExit("this build has no `vitalstore keys`")
        with Service(db.url, name="vitalstore-dashboard") as service:
            async with chromium() as browser:
                await one_run(browser, service.url, key)  # warm-up: caches, plans
                runs = [await one_run(browser, service.url, key) for _ in range(RUNS)]
    finally:
        await db.drop()
    weights = runs[-1]["page_bytes"]
    report = {
        "data": data, "runs": RUNS,
        "open_to_drawn_ms": {"p50": p50([r["open_to_drawn_ms"] for r in runs]),
                             "max": round(max(r["open_to_drawn_ms"] for r in runs), 1)},
        "switch_to_drawn_ms": {"p50": p50([r["switch_to_drawn_ms"] for r in runs]),
                               "max": round(max(r["switch_to_drawn_ms"] for r in runs), 1)},
        "timeline_of_last_open_ms": runs[-1]["timeline_ms"],
        "points_per_chart": runs[-1]["points"], "api_bytes_30d": runs[-1]["api_bytes_30d"],
        "page_weight": {"total_bytes": sum(weights.values()), "files": weights},
        "goals": {"open_to_drawn_under_ms": 1000, "page_weight_under_bytes": 200_000},
    }
    out = RESULTS / "dashboard.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"\nwritten: {out.relative_to(harness.ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
