"""A probe: code run in a new interpreter, for process-wide state a test must not set in its own
process (the garbage collector's, logging's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from tests.support import ROOT


def probe(code: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> Any:
    """Run ``code`` in a new interpreter, from the repository root, with this process's environment
    and ``env`` over it (for process-wide state a test must not set in its own process: the garbage
    collector's, logging's); returns the JSON its last line of output prints (the code under test's
    state, as the probe reads it)."""
    finished = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])
