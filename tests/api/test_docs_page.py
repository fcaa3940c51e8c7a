"""/docs works offline: Swagger UI from the pinned package, nothing from another origin, no inline script; in
a real browser it renders the API's OpenAPI document and tries its routes."""

from __future__ import annotations

import re

import pytest

from tests.api import browser

By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is in the test extra (make install)").By


def test_the_docs_page_loads_everything_from_this_origin(client) -> None:  # type: ignore[no-untyped-def]
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "http" not in csp  # no CDN, no inline script
    sources = [s for s in re.findall(r'(?:src|href)="([^"]+)"', page.text) if s != "data:,"]  # its empty favicon
    assert sources and all(s.startswith("/") for s in sources), sources
    assert "<script>" not in page.text  # every script has a src (CSP allows no inline one)
    for source in sources:
        asset = client.get(source)
        assert asset.status_code == 200 and len(asset.content) > 0, source
    assert client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert '"/openapi.json"' in client.get("/docs/init.js").text
    assert client.get("/openapi.json").json()["info"]["title"] == "dermq"


def test_the_openapi_document_says_every_v1_operation_takes_an_api_key(client) -> None:  # type: ignore[no-untyped-def]
    """The key is read by dermq's own dependency, which FastAPI cannot describe: the document declared no
    scheme, so the docs page had no "Authorize" and its "Try it out" could send no key to any route."""
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key: `Authorization: Bearer dq_...`",
    }
    operations = [(path, op) for path, ops in document["paths"].items() for op in ops.values()]
    assert all(op.get("security") == [{"apiKey": []}] for path, op in operations if path.startswith("/v1/"))
    assert all("security" not in op for path, op in operations if not path.startswith("/v1/"))  # /healthz, /readyz
    assert sum(path.startswith("/v1/") for path, _ in operations) > 20


def _try_out(page, operation: str):  # type: ignore[no-untyped-def]
    """Open ``operation``'s block, press "Try it out" and "Execute"; its answer's row."""
    block = page.find_element(By.ID, operation)
    block.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
    browser.wait_until(page, lambda _: block.find_element(By.CSS_SELECTOR, "button.try-out__btn")).click()
    block.find_element(By.CSS_SELECTOR, "button.execute").click()
    return browser.wait_until(
        page, lambda _: block.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response"), what=operation
    )


@pytest.mark.slow
def test_a_developer_reads_the_docs_and_tries_a_route_in_a_real_browser(page, live_api: str, tenant) -> None:  # type: ignore[no-untyped-def]
    """The served OpenAPI document (3.1, FastAPI's) is rendered route by route, and "Try it out" asks this
    API under the page's CSP: no error page, no console error, no CSP violation."""
    page.get(f"{live_api}/docs")
    health = "operations-health-healthz_healthz_get"
    browser.wait_until(
        page,
        lambda d: d.find_elements(By.ID, health) or "Unable to render" in d.find_element(By.TAG_NAME, "body").text,
        what="Swagger UI",
    )
    assert "Unable to render" not in page.find_element(By.TAG_NAME, "body").text
    assert page.find_elements(By.ID, "operations-cases-read_heatmap_v1_cases__case_id__heatmap_png_get")
    assert len(page.find_elements(By.CSS_SELECTOR, ".opblock")) > 10  # every route, not an error

    answer = _try_out(page, health)
    assert answer.find_element(By.CSS_SELECTOR, ".response-col_status").text.strip() == "200"
    assert '"status"' in answer.text

    # "Authorize" with a clinic's key, then "Try it out" on the case list: the key goes with it
    page.find_element(By.CSS_SELECTOR, "button.authorize").click()
    field = browser.wait_until(page, lambda d: d.find_element(By.CSS_SELECTOR, ".modal-ux input"), what="the key field")
    field.send_keys(tenant.token)
    page.find_element(By.CSS_SELECTOR, ".modal-ux button.authorize").click()
    page.find_element(By.CSS_SELECTOR, ".modal-ux button.btn-done").click()
    listed = _try_out(page, "operations-cases-list_cases_v1_cases_get")
    assert listed.find_element(By.CSS_SELECTOR, ".response-col_status").text.strip() == "200"
    assert '"items"' in listed.text
    assert browser.problems(page) == []
