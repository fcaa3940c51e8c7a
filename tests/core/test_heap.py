"""The serving processes' heaps, frozen out of garbage collection once loaded (core.heap): a full
collection no longer walks the objects a process starts with (the API's 147,000 took 94-139 ms a
collection, every 4-5 s under load, with every request in flight waiting), and garbage made later is
still collected. Each check runs in a fresh interpreter: freezing is process-wide."""

from __future__ import annotations

import textwrap

from tests import probes, support

#: what each probe prints last: the collector's state after the code under test ran
_STATE = """
import gc, json
print(json.dumps({"frozen": gc.get_freeze_count(), "walked": len(gc.get_objects()), "young": gc.get_threshold()[0]}))
"""


def collector_after(code: str, env: dict[str, str] | None = None) -> dict[str, int]:
    """The collector's state a new interpreter leaves after ``code``: objects frozen, objects a full
    collection walks, the youngest generation's threshold."""
    return probes.probe(textwrap.dedent(code) + _STATE, env)  # type: ignore[no-any-return]


def test_settling_freezes_the_heap_so_far_and_later_cycles_are_still_collected() -> None:
    state = collector_after(
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
    """What each ``dermq-api`` process serves (one process's, and each of several's) comes from
    ``served_app``; uvicorn's processes make it through ``create_served_app``."""
    state = collector_after("from api.app import create_served_app\ncreate_served_app()\n", stack_env)
    assert state["frozen"] > 50_000  # FastAPI, SQLAlchemy, pydantic and the app
    assert state["walked"] < state["frozen"] // 20
    assert state["young"] == 7000


def test_a_worker_settles_its_heap_before_it_forks_its_children(stack_env: dict[str, str]) -> None:
    """Celery sends ``worker_init`` in the worker's main process before its pool forks the children."""
    env = {**stack_env, "DERMQ_WORKER_METRICS_PORT": str(support.free_port())}  # another handler serves metrics
    state = collector_after(
        "from celery import signals\nimport worker.celery_app\nsignals.worker_init.send(None)\n", env
    )
    assert state["frozen"] > 50_000  # Celery, kombu, SQLAlchemy and the worker's modules
    assert state["walked"] < state["frozen"] // 10  # (the handlers after it, the metrics server's, add some)
    assert state["young"] == 7000


def test_a_worker_child_settles_its_heap_once_its_model_has_loaded(stack_env: dict[str, str]) -> None:
    """The preload of a worker child (after the fork) loads the model, then freezes the heap with it:
    PyTorch, ONNX Runtime and the model's objects out of every collection for the child's life."""
    state = collector_after(
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
        stack_env,
    )
    assert state["walked"] < state["frozen"] // 20
    assert state["young"] == 7000
