"""Python's cyclic garbage collector in a long-running serving process: the heap a process starts
with, frozen out of every collection, and young collections ten times rarer.

CPython's collector walks every container object of a generation at each collection, and a full
collection walks all of them: in the API, after FastAPI, SQLAlchemy and pydantic have loaded, about
147,000 objects; in a worker child, after PyTorch, timm, ONNX Runtime and the model, about 500,000.
Those objects live as long as the process and are never garbage. Under `bench.load`'s 32 clients the
API ran a full collection every 4-5 s, 94-139 ms each (the event loop, and every request in flight,
waited), and about a thousand younger ones; a worker child ran five full collections while its model
loaded, 0.9-1.1 s in all, now one of 0.2 s (docs/PERFORMANCE.md, forty-fourth session).

:func:`settle`, called once a process has loaded what it serves with, collects what loading left
behind and moves everything else to the permanent generation (``gc.freeze``), which no collection
walks; a later :func:`settle` (a worker child after its model has loaded, in a heap its parent settled
before the fork) freezes what has come since. The threshold of the youngest generation goes from 700
net allocations of containers to :data:`YOUNG_THRESHOLD`: a request or a case frees nearly everything it
allocates by reference counting, so a young collection then runs rarely (in the API, one in 30 s of
`bench.load` against one every three requests), and the cyclic garbage it waits for stays a few
megabytes at most. Nothing is switched off: cycles are still collected, and frozen objects still free
by reference counting when the process drops them. A worker child settles from its preload thread; a
case that started meanwhile pauses once for that collection, and the objects it holds then are frozen
with the rest (a cycle among them is never collected: a few objects, once per child).
"""

from __future__ import annotations

import gc
import logging

#: net allocations of container objects between collections of the youngest generation (CPython: 700)
YOUNG_THRESHOLD = 7000

log = logging.getLogger("dermq.heap")


def settle(role: str) -> int:
    """Collect, then freeze this process's heap (see the module's docstring), and raise the youngest
    generation's threshold; returns how many objects are frozen now (the log line's ``count``).
    ``role`` names the process in the log line's message (``api``, ``worker``, ``worker-child``)."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    frozen = gc.get_freeze_count()
    log.info(
        "%s: startup heap frozen out of garbage collection", role, extra={"event": "heap_settled", "count": frozen}
    )
    return frozen
