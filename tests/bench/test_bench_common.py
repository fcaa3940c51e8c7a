"""What the benchmarks say about their inputs."""

from __future__ import annotations

import io

from PIL import Image

from bench.common import FIXTURE_IMAGES, image_sizes


def jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 90, 80)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_the_images_a_benchmark_sends_are_described_by_their_own_sizes() -> None:
    assert image_sizes([path.read_bytes() for path in sorted(FIXTURE_IMAGES.glob("*.jpg"))]) == "300x225"
    assert image_sizes([jpeg((200, 150))] * 3) == "200x150"
    assert image_sizes([jpeg((600, 450)), jpeg((200, 150)), jpeg((300, 225))]) == "200x150 to 600x450"


def test_a_finish_rate_counts_no_case_of_the_batch_its_window_starts_with() -> None:
    """A batch's cases share one finish time: counted from the first of them, the rest of that batch
    finished inside the window, and a GPU run of 64 cases in batches of 8 read 63 cases where 56 came."""
    from datetime import UTC, datetime, timedelta

    from bench.common import rate_after

    start = datetime(2026, 12, 6, tzinfo=UTC)
    finished = [start + timedelta(seconds=batch) for batch in range(8) for _ in range(8)]  # 8 a second
    assert rate_after(finished, finished[0]) == 56 / 7
    assert rate_after(finished, finished[8]) == 48 / 6
