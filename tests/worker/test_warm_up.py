"""What a worker child warms before its first case: a batching GPU worker every batch shape it will
run, since cuDNN builds its plans per shape on first use (seconds each on a GPU); a CPU worker, or a
GPU worker that does not batch, one case. (No GPU here: a stand-in predictor reports its device and
records its warm-ups.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core.config import Settings
from ml.predictor import Predictor
from worker import runtime


class StandIn:
    def __init__(self, device: str, *, shapes_oom: bool = False) -> None:
        self.device = torch.device(device)
        self.info = SimpleNamespace(model_id="stand-in", manifest={}, manifest_sha256="")  # (no known answer recorded)
        self.shapes_oom = shapes_oom
        self.warm_ups: list[tuple[int, list[int]]] = []

    def warm_up(self, rounds: int = 2, batch_sizes: range | tuple[int, ...] = (1,)) -> None:
        self.warm_ups.append((rounds, list(batch_sizes)))
        if self.shapes_oom and rounds == 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def load_with(monkeypatch: pytest.MonkeyPatch, settings: Settings, stand_in: StandIn) -> object:
    monkeypatch.setattr(Predictor, "load", lambda *args, **kwargs: stand_in)
    return runtime.load_predictor(settings, str(stand_in.device))


@pytest.mark.parametrize(
    ("device", "batching", "warmed"),
    [
        ("cuda", "auto", [(1, [1]), (0, [1, 2, 3, 4, 5, 6, 7, 8])]),  # the backend runs 1..8 at 1, 2, 4, 8
        ("cuda", "off", [(1, [1])]),
        ("cpu", "auto", [(1, [1])]),
    ],
)
def test_a_batching_gpu_worker_warms_its_batch_shapes_before_its_first_case(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, device: str, batching: str, warmed: list
) -> None:
    config = settings.model_copy(update={"batching": batching, "batch_max_size": 8})
    stand_in = StandIn(device)
    assert load_with(monkeypatch, config, stand_in) is stand_in
    assert stand_in.warm_ups == warmed


def test_a_gpu_too_small_for_the_largest_batch_leaves_that_shape_cold_not_the_worker_down(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    stand_in = StandIn("cuda", shapes_oom=True)
    assert load_with(monkeypatch, settings.model_copy(update={"batching": "auto"}), stand_in) is stand_in
    assert [rounds for rounds, _ in stand_in.warm_ups] == [1, 0]  # the case, then the shapes that ran out
