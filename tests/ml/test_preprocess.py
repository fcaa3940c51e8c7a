"""Preprocessing's normalisation: the same numbers as the textbook formula, laid out so that the
ONNX graphs' NCHW input is the array itself, not a copy of it."""

from __future__ import annotations

import numpy as np
import pytest

from ml import preprocess
from ml.model import Preprocessing


@pytest.mark.parametrize(
    "mean,std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
)
def test_normalize_is_the_formula_exactly_and_channels_first_in_memory(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> None:
    prep = Preprocessing(input_size=(6, 8), mean=mean, std=std)
    pixels = np.random.default_rng(7).integers(0, 256, size=(3, 6, 8, 3), dtype=np.uint8)
    formula = (pixels.astype(np.float32) - np.float32(255.0) * np.asarray(mean, np.float32)) * (
        np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))
    )
    out = preprocess.normalize(pixels, prep)
    assert out.shape == (3, 6, 8, 3) and out.dtype == np.float32
    assert np.array_equal(out, formula)  # bit for bit: the model's answers do not move
    nchw = out.transpose(0, 3, 1, 2)
    assert nchw.flags.c_contiguous  # what ONNX Runtime is given, without a copy
    assert np.shares_memory(np.ascontiguousarray(nchw), out)
