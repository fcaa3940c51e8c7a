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


def test_each_path_is_divided_by_the_bare_pass_asking_for_its_outputs() -> None:
    from bench.served import baselines

    pooled = baselines(["logits", "pooled"], ["logits", "features", "pooled"])
    assert pooled["Predictor.predict"] == "bare pass: logits, pooled"
    assert pooled["classify + heat map"] == "bare pass: logits, features, pooled"
    assert len(set(pooled.values())) == 2
    older = baselines(["logits", "features"], ["logits", "features"])  # a graph without the pooled output
    assert set(older.values()) == {"bare pass: logits, features"} and len(older) == 3


def test_every_contender_goes_through_every_image() -> None:
    from bench.served import each_image

    seen: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    calls = {name: each_image(seen[name].append, 9) for name in seen}
    for _ in range(9):  # three contenders taking turns over nine images, as interleaved calls them
        for call in calls.values():
            call()
    assert all(sorted(images) == list(range(9)) for images in seen.values())
