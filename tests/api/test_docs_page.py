"""/docs works offline: Swagger UI from the pinned package, nothing from another origin, no inline script."""

from __future__ import annotations

import re


def test_the_docs_page_loads_everything_from_this_origin(client) -> None:  # type: ignore[no-untyped-def]
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "http" not in csp  # no CDN, no inline script
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/") for s in sources), sources
    assert "<script>" not in page.text  # every script has a src (CSP allows no inline one)
    for source in sources:
        asset = client.get(source)
        assert asset.status_code == 200 and len(asset.content) > 0, source
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert '"/openapi.json"' in client.get("/docs/init.js").text
    assert client.get("/openapi.json").json()["info"]["title"] == "dermq"
