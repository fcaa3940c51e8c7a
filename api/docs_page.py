"""``/docs``: Swagger UI served from the pinned ``fastapi-offline`` package's copy, never a CDN, so that it
works offline and under a Content-Security-Policy without third-party origins or inline script.

The copy is Swagger UI 5: FastAPI's OpenAPI document is 3.1, which Swagger UI 4 (``swagger-ui-bundle``'s,
used before) refuses to render at all ("Unable to render this definition")."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from api.middleware import DOCS_CSP
from api.pages import PageFiles

#: Swagger UI's assets: served under /docs/assets (the page loads nothing from another origin).
ASSETS = "/docs/assets"
SWAGGER_UI = resources.files("fastapi_offline") / "static"

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dermq API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{assets}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body>
</html>
"""

INIT = """window.ui = SwaggerUIBundle({url: "%s", dom_id: "#swagger-ui", deepLinking: true});\n"""


def install(app: FastAPI) -> None:
    """Serve the docs page, its initialiser and Swagger UI's assets on ``app``."""
    openapi_url = app.openapi_url or "/openapi.json"
    app.mount(ASSETS, PageFiles(directory=str(SWAGGER_UI)), name="swagger-ui-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(PAGE.format(assets=ASSETS), headers={"Content-Security-Policy": DOCS_CSP})

    @app.get("/docs/init.js", include_in_schema=False)
    async def init() -> Response:
        return Response(INIT % openapi_url, media_type="text/javascript")
