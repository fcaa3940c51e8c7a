"""ml stands alone and its modules depend on each other in one direction: every import is read,
those inside functions included, so a late import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ML = Path(__file__).resolve().parents[2] / "ml"
FORBIDDEN = ("core", "api", "worker", "cli")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "ml":  # from ml import data: the submodule
                found.update(f"ml.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {path.stem: path for path in ML.glob("*.py") if path.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        parts = [imported.split(".") for imported in _imports(path)]
        graph[name] = {p[1] for p in parts if len(p) > 1 and p[0] == "ml" and p[1] in modules} - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name], _ = "open", stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[name], _ = "done", stack.pop()
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_ml_imports_nothing_of_the_service() -> None:
    offending = {
        path.name: sorted(m for m in _imports(path) if m.split(".")[0] in FORBIDDEN) for path in ML.glob("*.py")
    }
    assert {name: mods for name, mods in offending.items() if mods} == {}


def test_ml_modules_have_no_import_cycle() -> None:
    graph = _graph()
    assert graph["train"] >= {"finalize", "recipe"} and "train" not in graph["finalize"]  # the graph is read
    assert _cycle(graph) is None


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
