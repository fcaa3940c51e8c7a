"""The portal and auditor console are served from this origin under a strict CSP, whole; the model card is
readable by anyone; the pages' lists of actions and classes agree with the server's."""

from __future__ import annotations

import json
import re

import pytest

from core import audit
from ml.labels import DIAGNOSES

pytestmark = pytest.mark.usefixtures("database")

PAGES = ["/portal/", "/audit/"]


def linked(client, path: str) -> set[str]:  # type: ignore[no-untyped-def]
    """Every same-origin asset a page loads: its links and scripts, and the modules those import."""
    page = client.get(path).text
    base = path
    found: set[str] = set()
    todo = [_resolve(base, s) for s in re.findall(r'(?:src|href)="([^"#]+)"', page) if not s.startswith("data:")]
    while todo:
        url = todo.pop()
        if url in found or not url.endswith((".js", ".css")):
            continue
        found.add(url)
        if url.endswith(".js"):
            text = client.get(url).text
            todo += [_resolve(url, s) for s in re.findall(r'from "([^"]+)"', text)]
    return found


def _resolve(base: str, target: str) -> str:
    if target.startswith("/"):
        return target
    parts = base.rsplit("/", 1)[0].split("/")
    for piece in target.split("/"):
        if piece == "..":
            parts.pop()
        elif piece != ".":
            parts.append(piece)
    return "/".join(parts)


@pytest.mark.parametrize("path", PAGES)
def test_pages_load_everything_from_this_origin_under_a_strict_csp(client, path: str) -> None:  # type: ignore[no-untyped-def]
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["img-src"] == "'self' blob: data:" and csp["connect-src"] == "'self'"
    assert csp["form-action"] == "'none'"  # a page whose script failed never sends the pasted key in a URL
    assert csp["require-trusted-types-for"] == "'script'" and csp["frame-ancestors"] == "'none'"
    policy = page.headers["content-security-policy"]
    assert "unsafe" not in policy and "http" not in policy
    html = page.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline script
    assert not re.search(r"\sstyle=|<style|\son[a-z]+=", html)  # no inline style or handler
    assert "localStorage" not in html and "sessionStorage" not in html
    assets = linked(client, path)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200 and answer.content, asset
        expected = "text/javascript" if asset.endswith(".js") else "text/css"
        assert answer.headers["content-type"].split(";")[0] in (expected, "application/javascript"), asset
    assert client.get(path.rstrip("/"), follow_redirects=False).headers["location"].endswith(path)


def test_the_console_offers_every_audit_action_and_the_portal_names_every_class(client) -> None:  # type: ignore[no-untyped-def]
    console = client.get("/audit/").text
    offered = re.findall(r'<option value="([a-z_.]+)">', console.split('id="action"', 1)[1].split("</select>", 1)[0])
    assert offered == list(audit.ACTIONS)
    labels = client.get("/portal/labels.js").text
    for diagnosis in DIAGNOSES:
        assert f"{diagnosis.code}: {_js_string(diagnosis.name)}," in labels, diagnosis.code


def _js_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_the_model_card_is_public_and_names_only_registry_entries(client, settings) -> None:  # type: ignore[no-untyped-def]
    served = client.get("/model-card")
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/plain")
    assert served.text.startswith(f"# Model card: {settings.model}") and "not a diagnosis" in served.text
    older = client.get("/model-card/effnet-lite0-ham10000-v1")
    assert older.status_code == 200 and older.text.startswith("# Model card: effnet-lite0-ham10000-v1")
    for bad in ("no-such-model", "..", ".hidden", "%2e%2e%2fapi"):
        answer = client.get(f"/model-card/{bad}")
        assert answer.status_code == 404, bad
        assert answer.headers["content-type"] == "application/problem+json"
    assert client.get("/model-card/no-such-model").json()["code"] == "model_not_found"


def test_docs_keep_their_own_policy(client) -> None:  # type: ignore[no-untyped-def]
    """Swagger UI needs inline styles; the pages never get them."""
    assert "style-src 'self' 'unsafe-inline'" in client.get("/docs").headers["content-security-policy"]
    assert "unsafe-inline" not in client.get("/portal/").headers["content-security-policy"]


@pytest.mark.parametrize("path", PAGES)
def test_a_revalidated_page_keeps_its_policy(client, path: str) -> None:  # type: ignore[no-untyped-def]
    """A browser that revalidates a cached page gets 304 and keeps the stored response with the header
    fields of the 304 merged in (RFC 9111, 4.3.4): a 304 that carried the API's policy (a 304 has no
    content type) left the page blocked from loading its own scripts and styles on reload."""
    page = client.get(path)
    again = client.get(path, headers={"If-None-Match": page.headers["etag"]})
    assert again.status_code == 304
    policy = page.headers["content-security-policy"]
    assert again.headers.get("content-security-policy", policy) == policy


def test_a_served_folders_card_is_found_by_the_id_its_results_name(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A result names its model by the manifest's id, and the portal links to /model-card/<that id>;
    with DERMQ_MODEL a folder of the operator's (a refit model), that link answered 404."""
    from api.pages import model_card

    folder = tmp_path / "models" / "effnet-custom-v5"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model_id": "effnet-custom-v5"}))
    (folder / "model_card.md").write_text("# Model card: effnet-custom-v5\n")
    served = settings.model_copy(update={"model": str(folder)})
    assert model_card(served, "effnet-custom-v5") == model_card(served) == "# Model card: effnet-custom-v5\n"
    assert model_card(served, "effnet-lite0-ham10000-v1").startswith("# Model card: effnet-lite0-ham10000-v1")
