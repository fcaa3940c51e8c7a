"""Preprocessing's normalisation: the same numbers as the textbook formula, laid out so that the
ONNX graphs' NCHW input is the array itself, not a copy of it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

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


ANTIALIASED = Preprocessing(
    input_size=(168, 224), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation=preprocess.ANTIALIASED
)


def test_the_antialiased_resampler_is_pytorchs_kernel_within_two_levels_of_pillows(
    fixture_pil: list[Image.Image],
) -> None:
    import torch
    from torch.nn.functional import interpolate

    bicubic = Preprocessing(input_size=(168, 224), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    for image in fixture_pil:
        pixels = preprocess.to_uint8(image, ANTIALIASED)
        assert pixels.shape == (168, 224, 3) and pixels.dtype == np.uint8
        assert pixels.strides == (224 * 4, 4, 1)  # three of the kernel's four interleaved channels: not copied
        source = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
        expected = interpolate(source, size=(168, 224), mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(pixels, expected)
        assert np.array_equal(np.asarray(preprocess.resize(image, ANTIALIASED)), pixels)
        # the same kernel as Pillow's bicubic in another fixed-point arithmetic: a level or two apart, rarely
        pillow = preprocess.to_uint8(image, bicubic).astype(int)
        assert np.abs(pixels.astype(int) - pillow).max() <= 2
        assert np.mean(pixels != pillow) < 0.01


def test_an_image_already_at_the_input_size_is_not_resampled() -> None:
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(168, 224, 3), dtype=np.uint8))
    assert np.array_equal(preprocess.to_uint8(image, ANTIALIASED), np.asarray(image))


def test_a_preprocessing_names_only_a_known_resampler(fixture_pil: list[Image.Image]) -> None:
    from ml import model as models
    from ml.recipe import parse_args

    net = models.create("test_efficientnet", 7)
    timms = models.preprocessing_for(net, (32, 32))
    assert timms.interpolation in ("bilinear", "bicubic")
    chosen = models.preprocessing_for(net, (32, 32), interpolation=preprocess.ANTIALIASED)
    assert chosen == dataclasses.replace(timms, interpolation=preprocess.ANTIALIASED)
    unknown = Preprocessing(input_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="lanczos")
    with pytest.raises(ValueError, match="unknown interpolation 'lanczos'"):
        preprocess.to_uint8(fixture_pil[0], unknown)
    assert parse_args(["--data", "d", "--out", "o", "--interpolation", preprocess.ANTIALIASED]).interpolation
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--out", "o", "--interpolation", "lanczos"])


def test_resampled_pixels_a_view_of_four_channels_score_as_their_packed_copy(fixture_pil: list[Image.Image]) -> None:
    from ml import ood

    pixels, batch = preprocess.model_input(fixture_pil[:1], ANTIALIASED)
    interleaved = np.ascontiguousarray(pixels)
    assert not pixels.flags.c_contiguous and np.array_equal(pixels, interleaved)
    assert np.array_equal(batch, preprocess.normalize(interleaved, ANTIALIASED))
    for stride in (1, 2):
        viewed, copied = (
            ood.image_scores(pixels[:, ::stride, ::stride]),
            ood.image_scores(interleaved[:, ::stride, ::stride]),
        )
        assert all(np.array_equal(viewed[k], copied[k]) for k in copied)  # to the bit: the thresholds read these
        assert np.array_equal(
            ood.colour_statistics(pixels[:, ::stride, ::stride]),
            ood.colour_statistics(interleaved[:, ::stride, ::stride]),
        )
    several, _ = preprocess.model_input(fixture_pil[:3], ANTIALIASED)
    assert np.array_equal(several[0], pixels[0])
    # an image already at the input size is not resampled (three channels) in a batch with one that is
    at_size = Image.fromarray(np.random.default_rng(5).integers(0, 256, size=(168, 224, 3), dtype=np.uint8))
    mixed, mixed_batch = preprocess.model_input([fixture_pil[0], at_size], ANTIALIASED)
    assert np.array_equal(mixed[0], pixels[0]) and np.array_equal(mixed[1], np.asarray(at_size))
    assert np.array_equal(mixed_batch[:1], batch)


def test_a_large_image_is_box_reduced_first_as_pillows_reducing_gap_does() -> None:
    import torch
    from torch.nn.functional import interpolate

    rng = np.random.default_rng(11)
    smooth = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    large = Image.fromarray(smooth).resize((1600, 1200), Image.Resampling.BICUBIC)  # 7x the input's side
    reduced = large.reduce((2, 2))  # int(1600 / 224 / 3), int(1200 / 168 / 3)
    source = torch.from_numpy(np.array(reduced)).permute(2, 0, 1)[None]
    expected = interpolate(source, size=(168, 224), mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
    pixels = preprocess.to_uint8(large, ANTIALIASED)
    assert np.array_equal(pixels, expected)
    # and what the box step changes is invisible: within a few levels of resampling the whole image
    whole = torch.from_numpy(np.array(large)).permute(2, 0, 1)[None]
    direct = interpolate(whole, size=(168, 224), mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
    assert np.abs(pixels.astype(int) - direct.astype(int)).max() <= 4
