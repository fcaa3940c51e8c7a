"""``python -m bench.served``: the served path timed against a bare forward pass of the graph it
serves, asking for the outputs each path asks for, in one table with the ratios and issue 16's
targets."""

from __future__ import annotations

import re
import subprocess
import sys

from ml import registry
from tests import support

ROW = re.compile(
    r"^(bare pass: [a-z, ]+?|Predictor\.predict|classify \+ heat map)\s+([0-9.]+) ms\s+[0-9.]+ ms\s+([0-9.]+)x"
)


def test_a_short_run_prints_each_path_against_the_bare_pass() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.served", "--repeats", "15"],
        cwd=support.ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith(f"served path against the raw graph: {registry.DEFAULT_MODEL} on onnx, 1 thread(s)")
    rows = {m[1]: (float(m[2]), float(m[3])) for line in lines[3:] if (m := ROW.match(line))}
    # the shipped graph outputs the pooled features: predict asks for them and the logits, classification
    # for the feature map too (its heat map); each path is compared with a bare pass asking for the same
    bare = {"bare pass: logits, pooled", "bare pass: logits, features, pooled"}
    assert set(rows) == {*bare, "Predictor.predict", "classify + heat map"}, run.stdout
    assert all(rows[name][1] == 1.0 for name in bare)
    assert "<= 1.2x" in run.stdout and "<= 1.4x" in run.stdout
