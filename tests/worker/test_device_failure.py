"""A GPU that fails (a CUDA error other than out of memory) loses the process's CUDA context: every
later CUDA call fails too. The worker used to fail that case and every later one ``model_error``
until the child was recycled; now the cases it holds go back to the queue, their attempts counted,
and the child exits for a new one. (No GPU here: a stand-in reports ``cuda`` and raises CUDA's error
on top of the real CPU model; the child's exit is recorded instead of taken.)"""

from __future__ import annotations

import uuid

import pytest
import torch
from sqlalchemy import select

from core.config import Settings
from core.db import session_scope
from core.models import AuditEvent, Case
from tests.conftest import Tenant, own_database_fixtures
from worker import retries, runtime, tasks

pytestmark = pytest.mark.usefixtures("database", "empty_queue")  # empty_queue: tests/conftest.py

# a batch claims the oldest queued cases of its whole database: this module has one of its own
tenant, store_case = own_database_fixtures()

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


class ChildEnded(BaseException):
    """What the stand-in for ``os._exit`` raises: the task stops there, as the child would."""


class BrokenGpu:
    """The primary predictor as if on a GPU that has failed."""

    device = torch.device("cuda", 0)

    def __init__(self, real) -> None:  # type: ignore[no-untyped-def]
        self.info = real.info

    def classify(self, images):  # type: ignore[no-untyped-def]
        raise torch.AcceleratorError(ILLEGAL_ACCESS)


class GpuFailingAtTheHeatMap(BrokenGpu):
    """A GPU that classifies, then fails while computing the heat map."""

    def __init__(self, real) -> None:  # type: ignore[no-untyped-def]
        super().__init__(real)
        self.real = real

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.real, name)

    def classify(self, images):  # type: ignore[no-untyped-def]
        return self.real.classify(images)

    def explain(self, image, analysis):  # type: ignore[no-untyped-def]
        raise torch.AcceleratorError(ILLEGAL_ACCESS)


@pytest.fixture
def broken_gpu(own_database: Settings, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """``classify`` in this process on a failed GPU (or the stand-in of ``request.param``); returns the
    exit statuses the child took."""
    from ml.predictor import Predictor

    cpu = Predictor.load(own_database.model, device="cpu", overlay_max_side=own_database.overlay_max_side)
    exits: list[int] = []

    def exit_(status: int) -> None:
        exits.append(status)
        raise ChildEnded

    monkeypatch.setattr(runtime.os, "_exit", exit_)
    monkeypatch.setattr(runtime.logging, "shutdown", lambda: None)  # pytest's own log handlers stay open
    monkeypatch.setattr(retries, "retry_delay", lambda done: 0.0)
    broken = getattr(request, "param", BrokenGpu)
    monkeypatch.setattr(runtime, "load_predictor", lambda config, device: cpu if device == "cpu" else broken(cpu))
    monkeypatch.setattr(runtime, "_predictor", None)  # (put back after the test)
    monkeypatch.setattr(runtime, "_cpu_predictor", None)
    return exits


def cases(settings: Settings, ids: list[uuid.UUID]) -> list[tuple[str, int, str | None]]:
    with session_scope(settings) as session:
        return [(c.status, c.attempts, c.failure_code) for c in (session.get(Case, i) for i in ids)]


@pytest.mark.parametrize("broken_gpu", [BrokenGpu, GpuFailingAtTheHeatMap], indirect=True, ids=["pass", "heat-map"])
@pytest.mark.parametrize("batching", ["off", "on"])
def test_a_failed_gpu_puts_its_cases_back_and_ends_the_child(
    broken_gpu: list[int],
    own_database: Settings,
    tenant: Tenant,
    store_case,
    jpeg_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
    batching: str,
) -> None:  # type: ignore[no-untyped-def]
    config = own_database.model_copy(update={"batching": batching})
    monkeypatch.setattr(tasks, "settings", lambda: config)
    held = [store_case(tenant, jpeg_bytes) for _ in range(3 if batching == "on" else 1)]
    with pytest.raises(ChildEnded):
        tasks.classify.apply(args=[str(held[0])])
    assert broken_gpu == [runtime.EXIT_DEVICE_FAILED]
    # none failed: each is queued again, the attempt it made counted
    assert cases(own_database, held) == [("queued", 1, None)] * len(held)
    with session_scope(own_database) as session:
        reasons = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.entity_id == str(held[0]), AuditEvent.action == "case.requeue")
        ).all()
    assert [detail["reason"] for detail in reasons] == ["device_failed"]


def test_a_gpu_that_fails_while_the_model_loads_leaves_the_child_serving_on_the_cpu(
    own_database: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a pass that broke a working context: the child would meet the same card after a restart.
    Its cases failed ``model_error`` once claimed: cases of the shared queue that other hosts could
    classify. It serves on the CPU instead, as with a card too full to load the model."""
    from ml.predictor import Predictor

    real_load = Predictor.load

    def load_failing_on_the_gpu(*args: object, **kwargs: object) -> Predictor:
        if str(kwargs.get("device", "cpu")) != "cpu":
            raise torch.AcceleratorError("CUDA error: no kernel image is available for execution on the device")
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Predictor, "load", load_failing_on_the_gpu)
    predictor = runtime.load_predictor(own_database, "cuda")
    assert predictor.device.type == "cpu"


def test_a_gpu_that_does_not_give_the_known_answer_leaves_the_child_serving_on_the_cpu(
    own_database: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry's known answer was recorded on a CPU: a card that computes another (its kernels, its
    driver) is not served from, and the model is not refused either: the CPU's own check decides."""
    from ml import entry
    from ml.registry import KnownAnswerDiffers

    real_check = entry.check_known_answer
    devices: list[str] = []

    def check_failing_on_the_gpu(model: str, predictor: object, device: str, required: bool) -> None:
        devices.append(device)
        if device != "cpu":
            raise KnownAnswerDiffers("label mel (expected nv)", device)
        real_check(model, predictor, required=required)

    real_load = runtime._loaded_and_warm

    def loaded(settings: Settings, device: str, threads: int) -> object:
        # the model on the CPU (no GPU here), checked as if it ran on ``device``
        def check(model: str, predictor: object, *, required: bool = False) -> None:
            check_failing_on_the_gpu(model, predictor, device, required)

        monkeypatch.setattr(entry, "check_known_answer", check)
        return real_load(settings, "cpu", threads)

    monkeypatch.setattr(runtime, "_loaded_and_warm", loaded)
    predictor = runtime.load_predictor(own_database, "cuda")
    assert predictor.device.type == "cpu" and devices == ["cuda", "cpu"]


def test_which_errors_mean_the_gpu_has_failed() -> None:
    assert runtime.device_failed(torch.AcceleratorError(ILLEGAL_ACCESS))
    assert runtime.device_failed(RuntimeError("CUDA error: device-side assert triggered"))
    assert not runtime.device_failed(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not runtime.device_failed(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not runtime.device_failed(ValueError("CUDA error: not a CUDA error at all"))


def test_the_memory_gauge_of_a_card_that_failed_while_loading_never_ends_the_child(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The child serves on the CPU, but CUDA was initialised: after each batch the GPU memory gauge
    asked the dead context, and its CUDA error ended the child as a GPU failing mid-pass would. (In a
    process of its own: the metrics module needs its multiprocess folder before it is imported.)"""
    import os
    import subprocess
    import sys

    from tests.support import ROOT

    script = (
        "import torch\n"
        "torch.cuda.is_available = torch.cuda.is_initialized = lambda: True\n"
        "torch.cuda.current_device = lambda: 0\n"
        "def dead(device):\n"
        f"    raise torch.AcceleratorError({ILLEGAL_ACCESS!r})\n"
        "torch.cuda.mem_get_info = dead\n"
        "from worker import metrics\n"
        "metrics.record_gpu_memory()\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]  # the gauge's call returned: the child goes on
