"""``python -m bench.peer``'s cheap parts, without BentoML: the peer answers what dermq answers for the
same image (else the comparison would be of two different jobs), and the table's ratios and verdicts."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections import Counter

import numpy as np
import pytest

from bench.common import FIXTURE_IMAGES, ROOT
from bench.peer_clients import LoadRun
from bench.peer_report import Figures, comparison, cpu_per_case
from ml import registry
from ml.images import decode
from ml.predictor import Predictor

FIXTURES = sorted(FIXTURE_IMAGES.glob("*.jpg"))


def peer_service(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A private copy of bench/peer_service.py run with a stand-in for ``bentoml`` whose decorators
    change nothing (nothing imports the real module)."""
    stand_in = types.ModuleType("bentoml")
    stand_in.service = lambda **_: lambda cls: cls  # type: ignore[attr-defined]
    stand_in.api = lambda **_: lambda method: method  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bentoml", stand_in)
    spec = importlib.util.spec_from_file_location("peer_service_under_test", ROOT / "bench" / "peer_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_peer_answers_what_dermq_answers_for_the_same_images(monkeypatch: pytest.MonkeyPatch) -> None:
    service = peer_service(monkeypatch)
    data = [path.read_bytes() for path in FIXTURES[:4]]
    answers = service.OnnxClassifier(registry.DEFAULT_MODEL, threads=1).classify(data)

    # what a dermq worker does with an upload: decode as the worker does, then the served backend
    dermq = Predictor.load(registry.DEFAULT_MODEL, device="cpu", backend="onnx", threads=1)
    expected = dermq.predict([decode(d, reduce_to=service.REDUCE_TO).image for d in data])
    assert [a["label"] for a in answers] == [p.label for p in expected]
    for answer, prediction in zip(answers, expected, strict=True):
        assert answer["probabilities"].keys() == prediction.probabilities.keys()
        np.testing.assert_allclose(
            list(answer["probabilities"].values()), list(prediction.probabilities.values()), atol=1e-5
        )


def figures(idle: float, rate: float, latency: float, errors: int = 0) -> Figures:
    run = LoadRun(seconds=10, completed=int(rate * 10), latencies=[latency] * 20, errors=Counter(timeout=errors))
    return Figures([idle] * 10, [run])


def test_the_table_gives_dermq_over_the_peer_against_the_targets() -> None:
    printed, met = comparison(
        figures(idle=0.020, rate=180, latency=0.2),
        figures(idle=0.050, rate=60, latency=0.6),
        ("peer", "dermq"),
        ("ONNX Runtime alone, batch 8", "260 images/s"),
        clients=32,
    )
    rows = {line.split("  ")[0]: line.split() for line in printed.splitlines()}
    assert rows["dermq / peer"][3:] == ["2.50x", "2.50x", "0.33x", "3.00x", "3.00x"]
    assert "260 images/s" in printed and "32 clients: completed/s" in printed
    assert met == {"idle p50 <= 2x the peer's": False, "throughput >= 0.5x the peer's": False, "0 errors (dermq)": True}

    _, met = comparison(
        figures(idle=0.020, rate=100, latency=0.2),
        figures(idle=0.030, rate=60, latency=0.3, errors=1),
        ("peer", "dermq"),
        ("ceiling", ""),
        clients=32,
    )
    assert met == {"idle p50 <= 2x the peer's": True, "throughput >= 0.5x the peer's": True, "0 errors (dermq)": False}


def test_the_cpu_line_gives_each_systems_server_cpu_per_case_and_the_ratio() -> None:
    line = cpu_per_case(
        {"peer": {"peer": 1.5}, "dermq": {"api": 1.1, "worker": 2.1, "postgres": 0.3}},
        {"peer": 100, "dermq": 100},
    )
    assert "peer 15.0 ms" in line and "dermq 35.0 ms" in line
    assert "api 11.0, worker 21.0, postgres 3.0" in line and "dermq / peer 2.33x;" in line
    assert "not counted for dermq: Redis" in line  # what it leaves out, said where the figure is
