"""Figures stand for what serving answers: an image loaded for evaluation (and for the int8 choice,
finalisation, int8 calibration and the drift reference) gives the model the input a worker gives it,
from the upload itself or from the working copy the intake keeps of a camera-sized one."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.common import FIXTURE_IMAGES
from core.case_images import StoredImage
from core.config import Settings
from ml import data as ds
from ml import evaluate, preprocess, quantize, registry, served_decode, working_copy
from ml.images import DecodedImage, ImageLimits, decode
from ml.model import Preprocessing
from worker.pipeline import _decode_claimed

SETTINGS = Settings()
SHIPPED = registry.REGISTRY_DIR / registry.DEFAULT_MODEL
#: the shipped entry's input (168x224, PyTorch's antialiased bicubic) where it is here, else the same by hand
PREP = (
    Preprocessing.from_dict(registry.read_manifest(SHIPPED)["preprocessing"])
    if SHIPPED.is_dir()
    else Preprocessing(input_size=(168, 224), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic-antialiased")
)


def lesion_jpeg(size: tuple[int, int]) -> bytes:
    """A fixture lesion (300x225) enlarged to ``size``, as a camera or the 600x450 release would hold it."""
    source = sorted(FIXTURE_IMAGES.glob("*.jpg"))[0]
    out = io.BytesIO()
    Image.open(source).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def model_input(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 pixels the model sees and the normalised float32 array it is given."""
    return preprocess.model_input(images, PREP)


def served_input(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The model input a worker makes of an upload: the intake's working copy where it keeps one (as
    ``api.intake_limits`` makes it), else the upload, read by the worker's own decode."""
    limits = ImageLimits.from_settings(SETTINGS)
    copy = working_copy.decode_upload(data, limits, fit=SETTINGS.overlay_max_side)[1]
    stored = StoredImage(copy, working_copy=True) if copy is not None else StoredImage(data, working_copy=False)
    decoded = _decode_claimed(SETTINGS, uuid.uuid4(), 1, stored)
    assert isinstance(decoded, DecodedImage), decoded
    return model_input([decoded.image])


def test_the_side_served_images_decode_toward_is_the_workers_default() -> None:
    assert Settings.model_fields["overlay_max_side"].default == served_decode.SERVED_SIDE


@pytest.mark.parametrize("size", [(600, 450), (1000, 750), (2000, 1500)])
def test_a_large_jpeg_loaded_for_scoring_is_the_served_model_input(tmp_path: Path, size: tuple[int, int]) -> None:
    data = lesion_jpeg(size)
    path = tmp_path / "ISIC_9999999.jpg"
    path.write_bytes(data)
    sample = ds.Sample("ISIC_9999999", "HAM_9999999", "mel", path)
    served = served_input(data)
    # the image is one where decoding toward the model's own input side scores something else
    toward_input = model_input([decode(data, reduce_to=max(PREP.input_size)).image])[0]
    assert np.abs(toward_input.astype(int) - served[0].astype(int)).max() > 0
    for loaded in (evaluate.load_images([sample]), quantize.decode_samples([sample])):
        for got, expected in zip(model_input(loaded), served, strict=True):
            np.testing.assert_array_equal(got, expected)
