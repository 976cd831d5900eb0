"""Headless Chromium for the browser tests: Debian's chromium driven by Playwright.

scripts/install-browser.sh installs it (`make test` runs it); Playwright's own browser
download cannot work offline, so the executable is given.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
# Screenshots every browser test leaves behind, for a person to look at (git-ignored).
ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Watched:
    """A page, with what it asked of other hosts and the errors it raised."""

    page: Page
    outside: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def screenshot(self, name: str, selector: str | None = None) -> bytes:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        target = self.page.locator(selector) if selector else self.page
        return await target.screenshot(path=str(ARTIFACTS / name))


async def watched_page(browser: Browser, base_url: str) -> Watched:
    """A new page in a fresh context (its own sessionStorage) that records outside requests."""
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    watched = Watched(page)
    origin = urlsplit(base_url).netloc
    page.on("request", lambda request: None if urlsplit(request.url).netloc == origin
            or request.url.startswith("data:") else watched.outside.append(request.url))
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    page.on("console", lambda message: watched.errors.append(message.text)
            if message.type == "error" and "401" not in message.text
            and "403" not in message.text and "404" not in message.text else None)
    return watched


def line_pixels(png: bytes, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels of a screenshot are close to a colour (a drawn line's, say)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(count for count, colour in image.getcolors(maxcolors=image.width * image.height)
               if all(abs(c - r) <= tolerance for c, r in zip(colour, rgb, strict=True)))
