"""GPU out of memory: the worker frees the cache, runs that case on a CPU predictor, records the device
it used, and keeps the GPU predictor for the next cases. (No GPU here: a stand-in reports ``cuda``
and raises torch.OutOfMemoryError on demand, on top of the real CPU model.)"""

from __future__ import annotations

import uuid

import pytest
import torch
from PIL import Image

from core.db import session_scope
from core.models import Result
from worker import runtime
from worker.pipeline import run_classification

pytestmark = pytest.mark.usefixtures("database")


class GpuStandIn:
    """The primary predictor as if on a GPU: answers like the real one, runs out of memory when told."""

    def __init__(self, real, ooms: int) -> None:  # type: ignore[no-untyped-def]
        self.real, self.ooms, self.calls = real, ooms, 0
        self.device = torch.device("cuda", 0)
        self.info = real.info

    def classify(self, images):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.ooms:
            self.ooms -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return self.real.classify(images)

    def explain(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.real.explain(*args, **kwargs)


def device_of(settings, case_id: uuid.UUID) -> str:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return session.get(Result, case_id).device


def test_out_of_memory_on_the_gpu_runs_the_case_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, settings, tenant, store_case, jpeg_bytes: bytes
) -> None:  # type: ignore[no-untyped-def]
    from ml.predictor import Predictor

    cpu = Predictor.load(settings.model, device="cpu", overlay_max_side=settings.overlay_max_side)
    gpu = GpuStandIn(cpu, ooms=1)
    loads: list[str] = []
    freed: list[object] = []

    def load(config, device: str):  # type: ignore[no-untyped-def]
        loads.append(device)
        return cpu if device == "cpu" else gpu

    monkeypatch.setattr(runtime, "free_device_memory", freed.append)
    monkeypatch.setattr(runtime, "load_predictor", load)
    monkeypatch.setattr(runtime, "_predictor", None)  # (put back after the test)
    monkeypatch.setattr(runtime, "_cpu_predictor", None)
    first, second, third = (store_case(tenant, jpeg_bytes) for _ in range(3))
    assert run_classification(settings, first) == "succeeded"
    assert device_of(settings, first) == "cpu" and freed == [gpu] and loads == [settings.device, "cpu"]
    assert runtime.get_predictor(settings) is gpu  # the GPU predictor stays for the next cases

    assert run_classification(settings, second) == "succeeded"
    assert device_of(settings, second) == "cuda:0"

    gpu.ooms = 1  # a later out-of-memory reuses the CPU predictor loaded the first time
    assert run_classification(settings, third) == "succeeded"
    assert device_of(settings, third) == "cpu" and loads == [settings.device, "cpu"] and gpu.calls == 3


def test_on_a_cpu_worker_the_fallback_is_the_predictor_itself(settings) -> None:  # type: ignore[no-untyped-def]
    class OnCpu:
        device = torch.device("cpu")

    predictor = OnCpu()
    assert runtime.get_cpu_predictor(settings, predictor) is predictor  # type: ignore[arg-type]


def test_a_gpu_too_full_to_load_the_model_serves_on_the_cpu(monkeypatch: pytest.MonkeyPatch, settings) -> None:  # type: ignore[no-untyped-def]
    """Another process holds the card's memory: the model's load runs out of it. That failed every
    case the child took (model_error); the child now serves on the CPU. (No GPU here: the load on
    ``cuda`` raises as a full card does, the CPU load is the real one.)"""
    from ml.predictor import Predictor

    real_load = Predictor.load.__func__  # type: ignore[attr-defined]
    tried: list[str] = []

    def load(cls, entry, device: str = "auto", **kwargs):  # type: ignore[no-untyped-def]
        tried.append(device)
        if device.startswith("cuda"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_load(cls, entry, device=device, **kwargs)

    monkeypatch.setattr(Predictor, "load", classmethod(load))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)  # put back after
    predictor = runtime.load_predictor(settings, "cuda")
    assert tried == ["cuda", "cpu"] and predictor.device.type == "cpu"
    assert torch.backends.cudnn.allow_tf32 is False  # on a GPU: the float32 the manifests promise, not TF32
    assert predictor.predict([Image.new("RGB", (120, 90), (180, 120, 100))])[0].label
