"""A set of inputs that are not dermoscopy images, to measure the out-of-distribution gate.

Built deterministically from a seed, so the figure in the model card can be reproduced; nothing in
it is used to fit the gate (its thresholds come from validation lesions only). Five kinds:

- ``blank``: solid images (white, black, greys, skin and colour tones);
- ``noise``: uniform, Gaussian, salt-and-pepper and coloured noise at several sizes;
- ``texture``: stripes, checkerboards, gratings, gradients and random shapes;
- ``photo``: the photographs bundled with matplotlib (Grace Hopper, a gift box, a logo) and crops of them;
- ``corrupted``: real lesion images destroyed past recognition (pixels shuffled, 8x8 blocks
  shuffled, drowned in noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("blank", "noise", "texture", "photo", "corrupted")


def _blank(rng: np.random.Generator) -> list[Image.Image]:
    colours = [(255, 255, 255), (0, 0, 0), (128, 128, 128), (200, 200, 200), (60, 60, 60), (224, 172, 150)]
    for _ in range(6):
        r, g, b = (int(v) for v in rng.integers(0, 256, 3))
        colours.append((r, g, b))
    sizes = [(200, 150), (640, 480), (1024, 768)]
    return [Image.new("RGB", sizes[i % 3], c) for i, c in enumerate(colours)]


def _noise(rng: np.random.Generator) -> list[Image.Image]:
    out = []
    for i in range(40):
        h, w = [(150, 200), (480, 640), (300, 300), (768, 1024)][i % 4]
        kind = i % 4
        pixels: np.ndarray
        if kind == 0:
            pixels = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
        elif kind == 1:
            pixels = rng.normal(128, 60, (h, w, 3))
        elif kind == 2:
            pixels = np.where(rng.random((h, w, 1)) < 0.5, 0.0, 255.0).repeat(3, axis=2)
        else:
            pixels = rng.normal(rng.uniform(60, 200, 3), 40, (h, w, 3))
        out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


def _texture(rng: np.random.Generator) -> list[Image.Image]:
    out = []
    h, w = 300, 400
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(40):
        kind = i % 5
        period = float(rng.uniform(4, 40))
        if kind == 0:  # stripes at an angle
            angle = rng.uniform(0, np.pi)
            v = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0) * 255.0
        elif kind == 1:  # checkerboard
            v = (((xx // period) + (yy // period)) % 2) * 255.0
        elif kind == 2:  # sinusoidal grating
            v = 127.5 + 127.5 * np.sin(xx * 2 * np.pi / period) * np.cos(yy * 2 * np.pi / (period * 1.7))
        elif kind == 3:  # linear gradient
            v = (xx / w * 255.0) if i % 2 else (yy / h * 255.0)
        else:  # random shapes
            image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(image)
            for _ in range(30):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                box = [x0, y0, x0 + int(rng.integers(10, 120)), y0 + int(rng.integers(10, 120))]
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
            out.append(image)
            continue
        tint = rng.uniform(0.3, 1.0, 3)
        out.append(Image.fromarray(np.clip(v[..., None] * tint, 0, 255).astype(np.uint8)))
    return out


def _photos() -> list[Image.Image]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    out = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        path = folder / name
        if not path.is_file():
            continue
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        w, h = image.size
        out += [image, image.crop((0, 0, w // 2, h // 2)), image.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))]
        out.append(image.rotate(90, expand=True))
    return out


def _corrupted(lesions: Sequence[Image.Image], rng: np.random.Generator) -> list[Image.Image]:
    out = []
    for i, lesion in enumerate(lesions):
        pixels = np.asarray(lesion.convert("RGB"), dtype=np.uint8)
        h, w, _ = pixels.shape
        kind = i % 3
        if kind == 0:  # every pixel shuffled: the colours of a lesion, none of its structure
            flat = pixels.reshape(-1, 3).copy()
            rng.shuffle(flat)
            broken = flat.reshape(h, w, 3)
        elif kind == 1:  # 8x8 blocks shuffled
            bh, bw = h // 8 * 8, w // 8 * 8
            blocks = pixels[:bh, :bw].reshape(bh // 8, 8, bw // 8, 8, 3).swapaxes(1, 2).reshape(-1, 8, 8, 3).copy()
            rng.shuffle(blocks)
            broken = blocks.reshape(bh // 8, bw // 8, 8, 8, 3).swapaxes(1, 2).reshape(bh, bw, 3)
        else:  # drowned in noise
            broken = np.clip(pixels * 0.25 + rng.normal(128, 90, pixels.shape) * 0.75, 0, 255).astype(np.uint8)
        out.append(Image.fromarray(broken))
    return out


def build(lesions: Sequence[Image.Image], seed: int = 0) -> list[tuple[str, Image.Image]]:
    """(kind, image) pairs; ``lesions`` are real lesion images to corrupt (e.g. 60 of the test split)."""
    rng = np.random.default_rng(seed)
    items: list[tuple[str, Image.Image]] = []
    items += [("blank", image) for image in _blank(rng)]
    items += [("noise", image) for image in _noise(rng)]
    items += [("texture", image) for image in _texture(rng)]
    items += [("photo", image) for image in _photos()]
    items += [("corrupted", image) for image in _corrupted(lesions, rng)]
    return items
