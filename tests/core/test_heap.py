"""The serving processes' heaps, frozen out of garbage collection once loaded (core.heap): a full
collection no longer walks the objects a process starts with (the API's 147,000 took 94-139 ms a
collection, every 4-5 s under load, with every request in flight waiting), and garbage made later is
still collected. Each check runs in a fresh interpreter: freezing is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests import support

#: what each probe prints last: the collector's state after the code under test ran
_STATE = """
import gc, json
print(json.dumps({"frozen": gc.get_freeze_count(), "walked": len(gc.get_objects()), "young": gc.get_threshold()[0]}))
"""


def probe(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> dict[str, int]:
    """Run ``code`` in a new interpreter (from the repository root, with ``env``); the collector's state
    it leaves: objects frozen, objects a full collection walks, the youngest generation's threshold."""
    finished = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code) + _STATE],
        cwd=support.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_settling_freezes_the_heap_so_far_and_later_cycles_are_still_collected() -> None:
    state = probe(
        """
        import gc, weakref
        from core import heap
        loaded = [[i] for i in range(100_000)]  # what a process loads at start, alive for its life
        assert heap.settle("test") >= 100_000

        class Node:
            pass

        # a cycle made after settling: garbage that only the collector can free
        a, b = Node(), Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        del a, b
        gc.collect()
        assert alive() is None, "a cycle made after settling was not collected"
        """
    )
    assert state["frozen"] >= 100_000
    assert state["walked"] < 1_000  # a full collection no longer walks what the process had loaded
    assert state["young"] == 7000


def test_an_api_process_settles_its_heap_once_its_app_is_made(stack_env: dict[str, str]) -> None:
    state = probe("from api.app import create_served_app\ncreate_served_app()\n", env=stack_env)
    assert state["frozen"] > 50_000  # FastAPI, SQLAlchemy, pydantic and the app
    assert state["walked"] < state["frozen"] // 20
    assert state["young"] == 7000


def test_a_worker_child_settles_its_heap_once_its_model_has_loaded(stack_env: dict[str, str]) -> None:
    """The preload of a worker child (after the fork) loads the model, then freezes the heap with it:
    PyTorch, ONNX Runtime and the model's objects out of every collection for the child's life."""
    state = probe(
        """
        import gc
        from core.config import Settings
        from worker import runtime
        gc.freeze()  # the parent's heap, settled before the fork (worker.celery_app)
        before = gc.get_freeze_count()
        runtime.preload(Settings()).join()
        assert runtime.get_predictor(Settings()) is not None
        assert gc.get_freeze_count() > before + 50_000, (before, gc.get_freeze_count())
        """,
        env=stack_env,
    )
    assert state["walked"] < state["frozen"] // 20
    assert state["young"] == 7000
