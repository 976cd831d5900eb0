"""The dashboard at /ui in headless Chromium, against `vitalstore serve` and its database."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from statistics import mean
from typing import Any

import asyncpg
import httpx
import pytest
from playwright.async_api import Browser, expect

from browser import Watched, chromium, line_pixels, watched_page
from conftest import ROOT, free_port
from harness import Service
from vitalstore import keys

LINE_RGB = (0x15, 0x65, 0xC0)  # the charts' line colour (app.js COLOR)


def heart_rate(t: int) -> float:
    return 60 + (t // 10) % 37


@dataclass
class Timeline:
    """When the readings were taken: from the module's start, not from test collection (the
    whole suite takes minutes, and a device seen "5 s ago" must still be fresh)."""

    now: int
    # One bedside monitor every 10 s for the last 50 minutes, silent from 30 to 20 minutes ago.
    bed_1: list[int]


@pytest.fixture(scope="module")
def timeline() -> Timeline:
    now = int(time.time())
    return Timeline(now, [t for t in range(now - 3000, now - 10, 10)
                          if not now - 1800 < t < now - 1200])


@pytest.fixture(scope="module")
async def service(db_url: str, api_headers: dict[str, str], timeline: Timeline
                  ) -> AsyncIterator[Service]:
    now = timeline.now
    server = Service(db_url, name="server", port=free_port(), headers=dict(api_headers),
                     log_dir=ROOT / ".pytest_cache", log_level=None).start(timeout=20)
    readings: list[dict[str, Any]] = [
        {"device": "ward-a:bed-1", "timestamp": t, "heartRateValue": heart_rate(t), "spo2": 97}
        for t in timeline.bed_1]
    readings += [
        {"device": "ward-a:bed-2", "timestamp": now - 5, "heartRateValue": 71, "spo2": 99},
        {"device": "ward-b:bed-1", "timestamp": now - 5, "heartRateValue": 64, "temperature": 36.6},
        # Silent for an hour: stale.
        {"device": "ward-b:bed-2", "timestamp": now - 3600, "heartRateValue": 80},
    ]
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        answer = await http.post("/v1/readings", json=readings, timeout=30)
    assert answer.status_code == 202, answer.text
    yield server
    server.stop(graceful=False)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


async def new_key(db_url: str, scopes: list[str], prefix: str | None = None,
                  revoked: bool = False) -> str:
    conn = await asyncpg.connect(db_url)
    try:
        name = f"ui-{uuid.uuid4().hex[:8]}"
        key, _ = await keys.create(conn, name, scopes, prefix)
        if revoked:
            assert await keys.revoke(conn, name)
    finally:
        await conn.close()
    return key


async def signed_in(browser: Browser, service: Service, key: str) -> Watched:
    watched = await watched_page(browser, service.url)
    await watched.page.goto(service.url + "/ui/")
    await watched.page.fill("#key", key)
    await watched.page.click("#sign-in button[type=submit]")
    return watched


async def chart_data(watched: Watched, metric: str) -> list[list[float | None]]:
    await watched.page.wait_for_function(
        "() => window.vitalstore.drawnMs !== null", timeout=20_000)
    data: list[list[float | None]] = await watched.page.evaluate(
        "(metric) => window.vitalstore.charts[metric].data", metric)
    return data


async def test_page_loads_with_the_sign_in_form_and_nothing_from_outside(browser, service):
    watched = await watched_page(browser, service.url)
    await watched.page.goto(service.url + "/ui/")
    await expect(watched.page.locator("#sign-in #key")).to_be_visible()
    assert await watched.page.evaluate("() => typeof uPlot") == "function"
    assert watched.outside == [] and watched.errors == []


async def test_sign_in_shows_the_devices_with_their_latest_values(browser, service, db_url):
    watched = await signed_in(browser, service, await new_key(db_url, ["read"]))
    page = watched.page
    await expect(page.locator("tr[data-device]")).to_have_count(4)
    row = page.locator('tr[data-device="ward-b:bed-1"]')
    await expect(row.locator('[data-metric="heartRateValue"]')).to_have_text("Heart rate 64 bpm")
    await expect(row.locator('[data-metric="temperature"]')).to_have_text("Temperature 36.6 °C")
    await expect(row).not_to_have_class("stale")
    await expect(page.locator('tr[data-device="ward-b:bed-2"]')).to_have_class("stale")
    # Kept for this tab only: not in the URL, not in a cookie.
    assert "vs_" not in page.url
    assert await page.evaluate("() => document.cookie") == ""
    assert (await page.evaluate("() => sessionStorage.getItem('vitalstore.key')")).startswith("vs_")
    png = await watched.screenshot("dashboard-fleet.png")
    assert len(png) > 10_000
    assert watched.outside == [] and watched.errors == []


async def test_fleet_refreshes_by_itself(browser, service, db_url):
    watched = await signed_in(browser, service, await new_key(db_url, ["read"]))
    value = watched.page.locator('tr[data-device="ward-a:bed-2"] [data-metric="spo2"]')
    await expect(value).to_have_text("SpO₂ 99 %")
    async with httpx.AsyncClient(base_url=service.url, headers=service.headers) as http:
        answer = await http.post("/v1/readings", json={
            "device": "ward-a:bed-2", "timestamp": time.time(), "spo2": 93})
    assert answer.status_code == 202
    await expect(value).to_have_text("SpO₂ 93 %", timeout=15_000)


async def test_search_by_prefix_narrows_the_fleet(browser, service, db_url):
    watched = await signed_in(browser, service, await new_key(db_url, ["read"]))
    await expect(watched.page.locator("tr[data-device]")).to_have_count(4)
    await watched.page.fill("#prefix", "ward-b:")
    await expect(watched.page.locator("tr[data-device]")).to_have_count(2)
    assert set(await watched.page.locator("tr[data-device]").evaluate_all(
        "(rows) => rows.map((row) => row.dataset.device)")) == {"ward-b:bed-1", "ward-b:bed-2"}


async def test_device_chart_draws_the_posted_points_with_the_gap(browser, service, db_url,
                                                                 timeline):
    watched = await signed_in(browser, service, await new_key(db_url, ["read"]))
    page = watched.page
    await page.click('a[href="#/device/ward-a%3Abed-1"]')
    await expect(page.locator('.tile[data-metric="heartRateValue"] .reading')).to_have_text(
        f"{heart_rate(timeline.bed_1[-1])} bpm")
    await page.click("text=last hour")
    xs, ys = await chart_data(watched, "heartRateValue")
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    assert points == [(t, heart_rate(t)) for t in timeline.bed_1]
    # The ten silent minutes are a gap (one null between them), not a line across.
    gaps = [xs[i] for i, y in enumerate(ys) if y is None]
    assert len(gaps) == 1 and timeline.now - 1800 < gaps[0] < timeline.now - 1200
    png = await watched.screenshot("dashboard-device-1h.png",
                                   '.chart[data-metric="heartRateValue"]')
    assert line_pixels(png, LINE_RGB) > 500, "the chart screenshot shows no line"
    await watched.screenshot("dashboard-device.png")
    assert watched.outside == [] and watched.errors == []


async def test_device_24h_chart_is_the_minute_averages_with_min_max_band(browser, service, db_url,
                                                                          timeline):
    watched = await signed_in(browser, service, await new_key(db_url, ["read"]))
    await watched.page.goto(service.url + "/ui/#/device/ward-a%3Abed-1?range=24h")
    xs, avg, low, high = await chart_data(watched, "heartRateValue")
    by_minute: dict[int, list[float]] = {}
    for t in timeline.bed_1:
        by_minute.setdefault(t // 60 * 60, []).append(heart_rate(t))
    drawn = {x: (a, lo, hi) for x, a, lo, hi in zip(xs, avg, low, high, strict=True)
             if a is not None}
    assert drawn == {minute: (pytest.approx(mean(v)), min(v), max(v))
                     for minute, v in by_minute.items()}
    caption = watched.page.locator('.chart[data-metric="heartRateValue"] figcaption')
    assert await caption.text_content() == "Heart rate (bpm) · 1m buckets"
    png = await watched.screenshot("dashboard-device-24h.png")
    assert line_pixels(png, LINE_RGB) > 500
    assert watched.outside == [] and watched.errors == []


@pytest.mark.parametrize(("kind", "message"), [
    ("unknown", "This key was refused (invalid API key"),
    ("revoked", "This key was refused (API key revoked)"),
    ("ingest only", "This key may not read"),
])
async def test_a_wrong_key_shows_the_message(browser, service, db_url, kind, message):
    if kind == "unknown":
        key = "vs_" + uuid.uuid4().hex
    else:
        key = await new_key(db_url, ["ingest"] if kind == "ingest only" else ["read"],
                            revoked=kind == "revoked")
    watched = await signed_in(browser, service, key)
    await expect(watched.page.locator("#message")).to_contain_text(message)
    await expect(watched.page.locator("#sign-in #key")).to_be_visible()
    assert await watched.page.evaluate("() => sessionStorage.getItem('vitalstore.key')") is None
    await watched.screenshot(f"dashboard-wrong-key-{kind.replace(' ', '-')}.png")


async def test_a_prefix_bound_key_sees_only_its_devices(browser, service, db_url):
    watched = await signed_in(browser, service, await new_key(db_url, ["read"], "ward-a:"))
    page = watched.page
    await expect(page.locator("tr[data-device]")).to_have_count(2)
    assert set(await page.locator("tr[data-device]").evaluate_all(
        "(rows) => rows.map((row) => row.dataset.device)")) == {"ward-a:bed-1", "ward-a:bed-2"}
    await page.goto(service.url + "/ui/#/device/ward-b%3Abed-1")
    await expect(page.locator("#message")).to_contain_text("Unknown device 'ward-b:bed-1'")
    await expect(page.locator(".tile")).to_have_count(0)


async def test_one_metric_across_a_ward(browser, service, db_url):
    watched = await signed_in(browser, service, await new_key(db_url, ["read"]))
    await watched.page.goto(
        service.url + "/ui/#/metric?metric=heartRateValue&prefix=ward-b%3A&range=24h")
    xs, avg, _, _, devices = await chart_data(watched, "heartRateValue")
    drawn = {x: (a, d) for x, a, d in zip(xs, avg, devices, strict=True) if a is not None}
    # ward-b: one reading an hour ago (80) and one now (64), one device in each minute.
    assert sorted(drawn.values()) == [(64, 1), (80, 1)]
    await watched.screenshot("dashboard-metric.png")
    assert watched.outside == [] and watched.errors == []
