"""The browser pages' files are asked for again on every visit (``Cache-Control: no-cache``, answered 304
while unchanged): served with a ``Last-Modified`` only, a browser kept them fresh on its own heuristic (a
tenth of their age: days, for files some weeks old), so after an upgrade a clinic's browser went on running
the old portal, or the new page with some of its old modules (an import the old module lacks stops the page).
"""

from __future__ import annotations

import httpx
import pytest

from tests.api import browser
from tests.api.test_pages import PAGES, linked

pytestmark = pytest.mark.usefixtures("database")


@pytest.mark.parametrize("path", [*PAGES, "/docs"])
def test_every_file_of_a_page_is_revalidated(client, path: str) -> None:  # type: ignore[no-untyped-def]
    files = [path, *linked(client, path)] if path != "/docs" else ["/docs/assets/swagger-ui-bundle.js"]
    for file in files:
        answer = client.get(file)
        assert answer.status_code == 200 and answer.headers.get("cache-control") == "no-cache", file
        unchanged = client.get(file, headers={"If-None-Match": answer.headers["etag"]})
        assert unchanged.status_code == 304 and unchanged.content == b"", file


@pytest.mark.slow
@pytest.mark.parametrize("path", PAGES)
def test_a_second_visit_asks_for_every_file_again(page, live_api: str, path: str) -> None:  # type: ignore[no-untyped-def]
    """In Chromium: a file taken from its cache without asking has a transfer size of 0; one revalidated,
    the size of the 304's header."""
    assert httpx.get(f"{live_api}{path}").status_code == 200
    for _ in range(2):
        page.get("about:blank")
        page.get(f"{live_api}{path}")
        browser.wait_until(page, browser.ready)
    fetched = page.execute_script(
        "return [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]"
        ".map((entry) => [entry.name, entry.transferSize])"
    )
    assert len(fetched) > 5
    assert [name for name, size in fetched if size == 0] == []  # none taken unasked from the cache
    assert browser.problems(page) == []
