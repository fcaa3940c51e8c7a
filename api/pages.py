"""The browser pages: the clinic portal (``/portal/``), the auditor console (``/audit/``) and the model card.

The pages are static files (HTML, CSS and ES modules in ``api/web``) served from this origin under the
strict page Content-Security-Policy of ``api.middleware``: no inline script or style, no other origin.
They call the public API with the key the user pastes; the server gives them nothing the API does not.

The model card is public, like ``/docs``: it describes the model, never a patient.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from core.config import Settings
from core.errors import NotFound

WEB = Path(__file__).resolve().parent / "web"
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CARD = "model_card.md"


def model_card(settings: Settings, model_id: str | None = None) -> str:
    """The model card of ``model_id`` (a packaged registry entry), or of the served model when None.

    The served model may be a folder of the operator's (``DERMQ_MODEL``); any other id must name an
    entry of the packaged registry, read as package data (the API never loads a model)."""
    if model_id is None or model_id in (settings.model, _served_id(settings.model)):
        folder = Path(settings.model)
        if folder.is_dir() and (folder / CARD).is_file():
            return (folder / CARD).read_text(encoding="utf-8")
        model_id = settings.model
    if MODEL_ID_RE.match(model_id):  # a plain name: never a path
        card = resources.files("ml").joinpath("registry", model_id, CARD)
        if card.is_file():
            return card.read_text(encoding="utf-8")
    raise NotFound("no model card for this model id; /model-card shows the served model's", code="model_not_found")


def _served_id(model: str) -> str | None:
    """The id a result names for a served folder (its manifest's ``model_id``, which is what a result's
    card link asks for), or None for a packaged entry's name or a folder without one."""
    try:
        manifest = json.loads((Path(model) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = manifest.get("model_id") if isinstance(manifest, dict) else None
    return found if isinstance(found, str) else None


class PageFiles(StaticFiles):
    """Static files a browser asks for again on each visit (``no-cache``: a 304 while unchanged). With only
    a ``Last-Modified``, a browser keeps a file fresh on its own heuristic (a tenth of its age: days, for
    files some weeks old), and after an upgrade ran the old page, or the new one with some old modules."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _to_slashed(page: str) -> Callable[[Request], Awaitable[RedirectResponse]]:
    async def redirect(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{page}/")

    return redirect


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the portal, the auditor console, their shared modules, and the model card on ``app``."""
    app.mount("/common", PageFiles(directory=WEB / "common"), name="web-common")
    app.mount("/portal", PageFiles(directory=WEB / "portal", html=True), name="portal")
    app.mount("/audit", PageFiles(directory=WEB / "audit", html=True), name="audit-console")
    # The app redirects no path to its slashed form (api.app); a page's address typed without its slash
    # goes to the page, on this origin whatever the request's Host header says.
    for page in ("/portal", "/audit"):
        app.add_route(page, _to_slashed(page), methods=["GET", "HEAD"], include_in_schema=False)

    @app.get("/model-card", include_in_schema=False)
    def served_model_card() -> PlainTextResponse:
        return PlainTextResponse(model_card(settings))

    @app.get("/model-card/{model_id}", include_in_schema=False)
    def named_model_card(model_id: str) -> PlainTextResponse:
        return PlainTextResponse(model_card(settings, model_id))
