"""What a manifest records so that a model can be reproduced: library versions, machine, device and
precision, and the code commit it was trained from."""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "timm", "numpy", "pillow", "onnxruntime", "safetensors")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def code_commit(root: Path | None = None) -> dict[str, Any]:
    """The git commit of the code and whether the work tree had changes (``None`` outside a checkout)."""
    root = root or Path(__file__).resolve().parents[1]
    git = shutil.which("git")
    if git is None:
        return {"commit": None, "modified": None}
    try:
        head = subprocess.run(  # noqa: S603 - a fixed git command, no input
            [git, "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603 - a fixed git command, no input
            [git, "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}
    return {"commit": head, "modified": bool(dirty)}


def describe_environment(*, device: str, precision: str) -> dict[str, Any]:
    return {
        **{name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "device": device,
        "precision": precision,
        "code": code_commit(),
    }
