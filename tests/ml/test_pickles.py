"""What docs/SECURITY.md and ml/model.py say of pickles holds: dermq reads one only through PyTorch's
weights-only unpickler, in two places (the ImageNet weights when training starts, ``ml/model.py``; a
training run's own resume state, ``ml/checkpoint.py``). Every import and call is read, at any depth."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ml", "core", "api", "worker", "cli", "bench", "migrations")
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
DOCUMENTED = {"ml/model.py", "ml/checkpoint.py"}


def _sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


def test_pickles_are_read_only_where_documented_and_only_weights_only() -> None:
    torch_loads: dict[str, list[object]] = {}
    other: list[str] = []
    for path in _sources():
        name = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                other += [f"{name}: imports {m}" for m in modules if m.split(".")[0] in UNPICKLERS]
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if owner == "torch" and node.func.attr == "load":
                torch_loads.setdefault(name, []).append(_keyword(node, "weights_only"))
            elif node.func.attr == "load" and owner in ("np", "numpy") and _keyword(node, "allow_pickle") is not None:
                other.append(f"{name}: numpy.load with allow_pickle")
            elif node.func.attr == "read_pickle":
                other.append(f"{name}: read_pickle")
    assert set(torch_loads) == DOCUMENTED, "a torch.load the docs do not name (docs/SECURITY.md, ml/model.py)"
    assert all(value is True for values in torch_loads.values() for value in values), torch_loads
    assert not other, other
