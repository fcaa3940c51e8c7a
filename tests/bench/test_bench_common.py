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
