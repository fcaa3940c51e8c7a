"""The worker layout chosen when DERMQ_WORKER_CONCURRENCY is left at 0 (auto): bench.layout measured
processes with one thread each beating threads on the CPU, and CUDA wants one process per device."""

from __future__ import annotations

from core.config import Settings
from core.cpus import usable_cpus
from worker import runtime


def test_auto_layout_is_one_single_threaded_child_per_core_on_the_cpu(settings: Settings) -> None:
    cpu = settings.model_copy(update={"device": "cpu", "worker_concurrency": 0, "worker_threads": 0})
    assert runtime.worker_concurrency(cpu) == usable_cpus()
    assert runtime.threads_per_child(cpu) == 1


def test_auto_layout_is_one_child_with_every_core_on_cuda(settings: Settings) -> None:
    cuda = settings.model_copy(update={"device": "cuda:0", "worker_concurrency": 0, "worker_threads": 0})
    assert runtime.worker_concurrency(cuda) == 1
    assert runtime.threads_per_child(cuda) == usable_cpus()


def test_explicit_settings_win(settings: Settings) -> None:
    chosen = settings.model_copy(update={"device": "cpu", "worker_concurrency": 3, "worker_threads": 2})
    assert (runtime.worker_concurrency(chosen), runtime.threads_per_child(chosen)) == (3, 2)


def test_production_code_carries_no_fault_injection_and_reads_no_tests() -> None:
    """Faults are injected by the tests' own Celery app module (tests/faults/worker_app.py), which wraps
    the model runtime's loader: no production module holds a fault setting or hook, or imports tests."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert not [name for name in Settings.model_fields if name.startswith("fault") or "_fault" in name]
    for folder in ("api", "core", "worker", "ml"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("DERMQ_TEST_FAULTS", "FAULT_INJECTION", "fault_injection", "from tests", "import tests"):
                assert needle not in text, f"{path.relative_to(root)} holds {needle!r}"
    assert not (root / "worker" / "faults.py").exists()


def test_a_child_pins_numpys_blas_to_one_thread() -> None:
    """OpenBLAS started a thread per core before the fork: a child's small NumPy products on two threads
    waited for the core the other child or the API held, and halved a camera backlog's throughput."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import numpy, threadpoolctl, torch\n"
        "from worker.runtime import pin_threads\n"
        "pin_threads(2)\n"
        "blas = [p['num_threads'] for p in threadpoolctl.threadpool_info() if p['user_api'] == 'blas']\n"
        "print(blas, torch.get_num_threads())\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[1] 2"
