"""No module over 400 lines (the team's rule: split by responsibility before a module gets there),
production code, tests, benchmarks and migrations alike."""

from __future__ import annotations

from tests.support import ROOT

LIMIT = 400
PACKAGES = ("api", "core", "worker", "ml", "cli", "client", "bench", "migrations", "tests")


def test_no_module_is_over_400_lines() -> None:
    modules = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    assert len(modules) > 300, "the walk found too few modules to mean anything"
    over = {
        str(path.relative_to(ROOT)): lines
        for path in modules
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > LIMIT
    }
    assert not over, f"split these by responsibility: {over}"
