"""The worker layout chosen when DERMQ_WORKER_CONCURRENCY is left at 0 (auto): bench.layout measured
processes with one thread each beating threads on the CPU, and CUDA wants one process per device."""

from __future__ import annotations

import os

from core.config import Settings
from worker import runtime


def test_auto_layout_is_one_single_threaded_child_per_core_on_the_cpu(settings: Settings) -> None:
    cpu = settings.model_copy(update={"device": "cpu", "worker_concurrency": 0, "worker_threads": 0})
    assert runtime.worker_concurrency(cpu) == (os.cpu_count() or 1)
    assert runtime.threads_per_child(cpu) == 1


def test_auto_layout_is_one_child_with_every_core_on_cuda(settings: Settings) -> None:
    cuda = settings.model_copy(update={"device": "cuda:0", "worker_concurrency": 0, "worker_threads": 0})
    assert runtime.worker_concurrency(cuda) == 1
    assert runtime.threads_per_child(cuda) == (os.cpu_count() or 1)


def test_explicit_settings_win(settings: Settings) -> None:
    chosen = settings.model_copy(update={"device": "cpu", "worker_concurrency": 3, "worker_threads": 2})
    assert (runtime.worker_concurrency(chosen), runtime.threads_per_child(chosen)) == (3, 2)
