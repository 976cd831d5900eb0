"""The pages served to browsers: the dashboard at /ui and the API docs at /schema, both offline.

The third-party assets (uPlot, Swagger UI) are not in the repository: `make setup` unpacks
them from the npm registry into ui/vendor/ (scripts/install-ui-assets.sh), and so does the
Docker image. Every page loads only from this service; the Content-Security-Policy says so to
the browser as well.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

from litestar import Response, Router
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components
from litestar.static_files import create_static_files_router

log = logging.getLogger(__name__)

UI_DIR: Final = Path(__file__).resolve().parent / "ui"
VENDOR_DIR: Final = UI_DIR / "vendor"
SWAGGER_ASSETS: Final = "/ui/vendor/swagger-ui-dist"

# Same origin only: the page's code, styles, images and API calls. uPlot sets element styles
# from JavaScript (allowed under this policy); the docs page has one inline bootstrap script.
_DASHBOARD_POLICY: Final = ("default-src 'self'; img-src 'self' data:; style-src 'self';"
                            " connect-src 'self'; frame-ancestors 'none'")
_DOCS_POLICY: Final = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline';"
                       " script-src 'self' 'unsafe-inline'; connect-src 'self'")
# No favicon request at all (Litestar's default links one from a CDN).
_NO_FAVICON: Final = "<link rel='icon' href='data:,'>"


def assets_missing() -> list[str]:
    """The vendored files the pages need that are not installed (run make setup)."""
    needed = ["uplot/uPlot.iife.min.js", "uplot/uPlot.min.css",
              "swagger-ui-dist/swagger-ui-bundle.js", "swagger-ui-dist/swagger-ui.css",
              "swagger-ui-dist/swagger-ui-standalone-preset.js"]
    return [name for name in needed if not (VENDOR_DIR / name).is_file()]


def dashboard_router(opt: dict[str, Any]) -> Router:
    """/ui: the dashboard's static files (index.html at /ui/)."""
    missing = assets_missing()
    if missing:
        log.warning("dashboard and docs assets missing in %s: %s; run scripts/install-ui-assets.sh"
                    " (make setup does)", VENDOR_DIR, ", ".join(missing))
    return create_static_files_router(
        "/ui", directories=[UI_DIR], html_mode=True, name="ui", opt=opt,
        include_in_schema=False, after_request=_with_policy(_DASHBOARD_POLICY))


def openapi_config(components: Components, opt: dict[str, Any]) -> OpenAPIConfig:
    """/schema: Swagger UI (also at /schema/swagger) and /schema/openapi.json, from local assets.

    Litestar's other renderers (ReDoc, Elements, RapiDoc, Scalar) load from CDNs; they are not
    served, so no docs page here is blank offline.
    """
    swagger = SwaggerRenderPlugin(
        js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
        css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
        standalone_preset_js_url=f"{SWAGGER_ASSETS}/swagger-ui-standalone-preset.js",
        path="/swagger", favicon=_NO_FAVICON)
    return OpenAPIConfig(
        title="vitalstore", version="0.1.0", components=components,
        description="Durable ingestion and queries of device vital signs. The dashboard is at"
                    " /ui; this schema is at /schema/openapi.json.",
        render_plugins=[swagger], use_handler_docstrings=True,
        openapi_router=Router("/schema", route_handlers=[], opt=opt, include_in_schema=False,
                              after_request=_with_policy(_DOCS_POLICY)))


def _with_policy(policy: str) -> Any:
    async def add_policy(response: Response[Any]) -> Response[Any]:
        response.headers["Content-Security-Policy"] = policy
        return response
    return add_policy

