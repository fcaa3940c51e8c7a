"""ml.augment and the shared preprocessing: what training shows the model, and colour constancy."""

from __future__ import annotations

import numpy as np
import torch

from ml import preprocess
from ml.augment import Augment
from ml.model import Preprocessing

PREP = Preprocessing(input_size=(48, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")


def _batch(n: int = 6) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (n, 48, 64, 3)).astype(np.uint8))


def _pixels(x: torch.Tensor) -> np.ndarray:
    return ((x * 0.5 + 0.5) * 255).permute(0, 2, 3, 1).numpy()


def test_whole_image_epoch_keeps_every_pixel_up_to_a_flip() -> None:
    batch = _batch()
    augment = Augment(PREP, torch.Generator().manual_seed(0), strength=0.0, hue=0.0)
    out = _pixels(augment(batch, crops=False))
    source = batch.numpy().astype(np.float64)
    for image, original in zip(out, source, strict=True):
        views = [original, original[:, ::-1], original[::-1], original[::-1, ::-1]]
        assert min(np.abs(image - view).max() for view in views) < 1.0


def test_same_seed_same_views_other_seed_other_views() -> None:
    batch = _batch()
    first = Augment(PREP, torch.Generator().manual_seed(3))(batch)
    again = Augment(PREP, torch.Generator().manual_seed(3))(batch)
    other = Augment(PREP, torch.Generator().manual_seed(4))(batch)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_rotations_leave_no_black_corners() -> None:
    white = torch.full((8, 48, 64, 3), 255, dtype=torch.uint8)
    augment = Augment(PREP, torch.Generator().manual_seed(0), blur=0.0, erase=0.0, hue=0.0)
    augment.colour = lambda x: x  # type: ignore[method-assign]  # geometry only
    out = _pixels(augment(white))
    assert out.min() > 250  # reflection padding, never zeros


def test_output_is_channels_last_at_the_requested_size() -> None:
    out = Augment(PREP, torch.Generator().manual_seed(0), out_size=(42, 56))(_batch(2))
    assert out.shape == (2, 3, 42, 56) and out.is_contiguous(memory_format=torch.channels_last)


def test_shades_of_gray_removes_a_colour_cast_and_keeps_brightness() -> None:
    rng = np.random.default_rng(0)
    grey_world = rng.integers(60, 200, (40, 50, 1)).repeat(3, axis=2).astype(np.float64)
    cast = np.clip(grey_world * np.array([1.3, 1.0, 0.7]), 0, 255).astype(np.uint8)
    corrected = preprocess.shades_of_gray(cast).astype(np.float64)
    means = corrected.mean(axis=(0, 1))
    assert means.max() - means.min() < 0.1 * (cast.mean(axis=(0, 1)).max() - cast.mean(axis=(0, 1)).min())
    assert abs(corrected.mean() - cast.mean()) < 0.08 * cast.mean()
