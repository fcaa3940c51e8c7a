"""``/docs``: Swagger UI served from the pinned ``fastapi-offline`` package's copy, never a CDN, so that it
works offline and under a Content-Security-Policy without third-party origins or inline script.

The copy is Swagger UI 5: FastAPI's OpenAPI document is 3.1, which Swagger UI 4 (``swagger-ui-bundle``'s,
used before) refuses to render at all ("Unable to render this definition")."""

from __future__ import annotations

from importlib import resources
from typing import Any

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


#: the API key, as the OpenAPI document declares it (``Authorization: Bearer <key>``: api.deps)
API_KEY = {"type": "http", "scheme": "bearer", "description": "an API key: `Authorization: Bearer dq_...`"}


def declare_api_key(app: FastAPI) -> None:
    """Say in ``app``'s OpenAPI document that every ``/v1/`` operation takes an API key. The key is
    read by a dependency of dermq's own (api.deps), which FastAPI cannot describe: the document declared
    no scheme, and the docs page's "Try it out" could send no key (no "Authorize")."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = API_KEY
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    """Serve the docs page, its initialiser and Swagger UI's assets on ``app``."""
    openapi_url = app.openapi_url or "/openapi.json"
    declare_api_key(app)
    app.mount(ASSETS, PageFiles(directory=str(SWAGGER_UI)), name="swagger-ui-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(PAGE.format(assets=ASSETS), headers={"Content-Security-Policy": DOCS_CSP})

    @app.get("/docs/init.js", include_in_schema=False)
    async def init() -> Response:
        return Response(INIT % openapi_url, media_type="text/javascript")
