"""Swagger UI (``/docs``) and ReDoc (``/redoc``) for the serving API, served offline.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank wherever serving has
no internet (a cluster, an air-gapped site). Here the pages load the copies that the
``fastapi-offline`` package ships, served by this app under :data:`ASSETS_PATH`; the HTML
names no other host. Neither the pages nor the assets are API operations, so none of them
appears in ``/openapi.json``.
"""

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_DIR", "ASSETS_PATH", "mount_docs"]

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS_PATH = "/docs-assets"

# Swagger UI would otherwise send the schema to validator.swagger.io for its badge.
_SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
# ReDoc 2 always shows the "API docs by Redocly" footer with a logo from its CDN, whatever its
# options; the copy served here shows a blank inline image instead, so no request leaves.
_REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
_BLANK_SVG = b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"


def mount_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and their assets to ``app``; the pages show ``app.title`` (read
    per request, so a title set after this call is the one shown)."""
    missing = [
        name
        for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
        if not (ASSETS_DIR / name).is_file()
    ]
    if missing:
        raise RuntimeError(f"fastapi-offline ships no {', '.join(missing)} in {ASSETS_DIR}")
    redoc_js = (
        (ASSETS_DIR / "redoc.standalone.js").read_bytes().replace(_REDOC_CDN_LOGO, _BLANK_SVG)
    )

    # Declared before the mount, so it answers instead of the unpatched file.
    @app.get(f"{ASSETS_PATH}/redoc.standalone.js", include_in_schema=False)
    async def redoc_bundle() -> Response:
        return Response(redoc_js, media_type="text/javascript")

    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters=_SWAGGER_UI_PARAMETERS,
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )
