"""Timing helpers and table printing shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "images"


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function, taking turns call by call.

    On a shared machine the load drifts over seconds; alternating spreads it evenly over the
    contenders, so their ratios stay meaningful even when absolute times do not.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - started)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def p50(values: Sequence[float]) -> float:
    return statistics.median(values)


def rate_after(finished: Sequence[datetime], start: datetime) -> float:
    """Finishes per second from ``start`` (a finish time) to the last finish, counting only those after
    ``start``: the cases a batch stored with the one at ``start`` share its time, and counting them as
    finished inside the window read a faster rate (up to 63 of 56 for 64 cases in batches of 8)."""
    after = sum(1 for at in finished if at > start)
    span = (max(finished) - start).total_seconds() if finished else 0.0
    return after / span if after and span > 0 else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c}" for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def camera_jpegs(count: int = 3, size: tuple[int, int] = (4000, 3000), quality: int = 90) -> list[bytes]:
    """12-megapixel JPEGs like a clinic camera's: fixture lesions upscaled, with sensor-like noise so
    they compress like photographs (about 2-4 MB each)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for path in sorted(FIXTURE_IMAGES.glob("*.jpg"))[:count]:
        big = np.asarray(Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(big + rng.integers(-6, 7, size=big.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def image_sizes(images: Sequence[bytes]) -> str:
    """The pixel sizes of encoded ``images`` in words, read from their headers: ``600x450`` when all
    share one, else the smallest and largest by area (``300x225 to 600x450``)."""
    import io

    from PIL import Image

    sizes = sorted({Image.open(io.BytesIO(data)).size for data in images}, key=lambda wh: (wh[0] * wh[1], wh))
    if not sizes:
        return "no images"
    words = [f"{w}x{h}" for w, h in (sizes[0], sizes[-1])]
    return words[0] if len(sizes) == 1 else f"{words[0]} to {words[1]}"


def stack_layout(env: Mapping[str, str]) -> str:
    """The process layout a stack started with ``env`` (DERMQ_* settings over this process's
    environment) runs, resolved as the API and the worker resolve it: API processes, worker children
    and threads per child."""
    import os

    from api.app import api_processes
    from tests.support import settings_for
    from worker.runtime import threads_per_child, worker_concurrency

    settings = settings_for(env)
    api, children = api_processes(settings), worker_concurrency(settings)
    threads = threads_per_child(settings)
    return (
        f"{api} API process{'es' if api != 1 else ''}, {children} worker child{'ren' if children != 1 else ''} "
        f"x {threads} thread{'s' if threads != 1 else ''} on {os.cpu_count()} CPUs"
    )
