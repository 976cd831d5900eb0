"""The API docs pages work offline: Swagger UI from local assets renders every operation."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from playwright.async_api import expect

from browser import chromium, watched_page
from conftest import ROOT, free_port
from harness import Service

METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
async def service(db_url: str) -> AsyncIterator[Service]:
    server = Service(db_url, name="server", port=free_port(), log_dir=ROOT / ".pytest_cache",
                     log_level=None).start(timeout=20)
    yield server
    server.stop(graceful=False)


async def operations(service: Service) -> list[tuple[str, str, dict[str, object]]]:
    async with httpx.AsyncClient(base_url=service.url) as http:
        schema = (await http.get("/schema/openapi.json")).json()
    return [(method, path, operation) for path, item in schema["paths"].items()
            for method, operation in item.items() if method in METHODS]


@pytest.mark.parametrize("page_path", ["/schema", "/schema/swagger"])
async def test_interactive_docs_render_every_operation_from_local_assets(service, page_path):
    expected = await operations(service)
    async with chromium() as browser:
        watched = await watched_page(browser, service.url)
        await watched.page.goto(service.url + page_path)
        blocks = watched.page.locator(".opblock-summary-path")
        await expect(blocks).to_have_count(len(expected), timeout=20_000)
        shown = set(await blocks.evaluate_all(
            "(nodes) => nodes.map((node) => node.dataset.path)"))
        assert shown == {path for _, path, _ in expected}
        await watched.screenshot(f"docs{page_path.replace('/', '-')}.png")
    assert watched.outside == [], "the docs page loaded assets from outside"
    assert watched.errors == []


@pytest.mark.parametrize("renderer", ["redoc", "elements", "rapidoc", "scalar"])
async def test_renderers_that_need_a_cdn_are_not_served(service, renderer):
    async with httpx.AsyncClient(base_url=service.url) as http:
        assert (await http.get(f"/schema/{renderer}")).status_code == 404


async def test_every_operation_has_a_description_beyond_its_summary(service):
    for method, path, operation in await operations(service):
        description = str(operation.get("description", "")).strip()
        assert len(description) > 20, f"{method.upper()} {path} has no description"
        assert description != operation.get("summary"), f"{method.upper()} {path}"
