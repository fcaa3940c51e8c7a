"""The working copy of a large upload (``ml.working_copy``): made from the intake's one decode, read by
the worker instead of decoding the upload again. Its answers equal a full decode's within the tolerance
draft decoding already has (every calibrated probability within 0.03, and the same label unless the
full decode's answer sits within that shift of the decision boundary), the heat map drawn
on it is the one drawn on the draft decode, and the reader takes nothing but what the maker wrote."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bench.common import camera_jpegs
from core.config import Settings
from ml import heatmap, registry, working_copy
from ml.images import DEFAULT_LIMITS, decode
from ml.predictor import Predictor
from tests.ml.answers import assert_same_answer

SHIPPED = registry.REGISTRY_DIR / registry.DEFAULT_MODEL
TOLERANCE = 0.03
SIDE = Settings.model_fields["overlay_max_side"].default


def jpeg(size: tuple[int, int], colour: tuple[int, int, int] = (170, 120, 100), **save: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG", quality=90, **save)
    return out.getvalue()


@pytest.fixture(scope="module")
def cameras() -> list[bytes]:
    return camera_jpegs()


def test_a_camera_jpeg_gets_a_working_copy_at_the_overlay_size_that_reads_back_as_the_upload(cameras) -> None:  # type: ignore[no-untyped-def]
    copy = working_copy.decode_upload(cameras[0], DEFAULT_LIMITS, fit=SIDE)[1]
    assert copy is not None
    back = working_copy.read(copy)
    assert back.image.size == (500, 375)  # the 1/8-scale draft decode as it is
    assert (back.format, back.width, back.height) == ("JPEG", 4000, 3000)  # what the upload declared
    assert back.media_type == "image/jpeg"
    assert len(copy) < 600_000  # 512x384 RGB and a header: a third of the 1.6-4 MB upload


def test_small_uploads_get_none_their_own_decode_is_as_cheap() -> None:
    for size in ((600, 450), (1024, 768), (4000, 40), (4000, 400)):  # small, or too thin to reduce
        assert working_copy.decode_upload(jpeg(size), DEFAULT_LIMITS, fit=SIDE)[1] is None
    for size in ((1600, 1200), (4000, 1800)):
        assert working_copy.decode_upload(jpeg(size), DEFAULT_LIMITS, fit=SIDE)[1] is not None
    assert working_copy.make(decode(jpeg((4000, 3000)), reduce_to=SIDE), SIDE) is None  # decoded without fit


def test_a_large_lossless_upload_is_reduced_to_the_working_size() -> None:
    out = io.BytesIO()
    Image.new("RGB", (2000, 1500), (170, 120, 100)).save(out, "PNG")
    copy = working_copy.decode_upload(out.getvalue(), DEFAULT_LIMITS, fit=SIDE)[1]
    assert copy is not None
    read = working_copy.read(copy)
    assert read.image.size == (512, 384) and (read.format, read.width, read.height) == ("PNG", 2000, 1500)


def test_the_copy_is_upright_whatever_the_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    copy = working_copy.decode_upload(jpeg((4000, 2000), exif=exif), DEFAULT_LIMITS, fit=SIDE)[1]
    assert copy is not None
    assert working_copy.read(copy).image.size == (250, 500)


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped model")
def test_camera_jpegs_read_from_their_working_copy_get_the_full_decode_answer(cameras) -> None:  # type: ignore[no-untyped-def]
    predictor = Predictor.load(SHIPPED, device="cpu")
    clear = 0
    for data in cameras:
        copy = working_copy.decode_upload(data, DEFAULT_LIMITS, fit=SIDE)[1]
        assert copy is not None
        full = predictor.predict([decode(data).image])[0]
        fast = predictor.predict([working_copy.read(copy).image])[0]
        clear += assert_same_answer(predictor, full, fast, TOLERANCE)
    assert clear >= 2  # most answers are clear of the decision boundary, and those must agree


def test_the_heat_map_drawn_on_the_copy_matches_the_one_drawn_on_the_draft_decode(cameras) -> None:  # type: ignore[no-untyped-def]
    draft = decode(cameras[1], reduce_to=SIDE)
    copy = working_copy.decode_upload(cameras[1], DEFAULT_LIMITS, fit=SIDE)[1]
    assert copy is not None
    cam = np.random.default_rng(0).random((6, 7)).astype(np.float32)
    on_copy, on_draft = (
        np.asarray(Image.open(io.BytesIO(heatmap.render(image, cam, SIDE))), dtype=np.int16)
        for image in (working_copy.read(copy).image, draft.image)
    )
    assert on_copy.shape == (375, 500, 3) and on_draft.shape == (384, 512, 3)
    # the same picture: the old overlay (drawn on the 1/4-scale decode) reduced to the new one's size
    shrunk = np.asarray(Image.fromarray(on_draft.astype(np.uint8)).resize((500, 375), Image.Resampling.BILINEAR))
    assert np.abs(on_copy - shrunk.astype(np.int16)).mean() < 3


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"P6\n512 384\n255\n" + bytes(512 * 384 * 3),  # a plain PPM: not one of ours
        b"P6\n# dermq-working-copy GIF 4000x3000\n4 3\n255\n" + bytes(36),  # a format dermq does not accept
        b"P6\n# dermq-working-copy JPEG 4000x3000\n4 3\n255\n" + bytes(35),  # a byte short
        b"P6\n# dermq-working-copy JPEG 4000x3000\n4 3\n255\n" + bytes(37),  # a byte over
        b"P6\n# dermq-working-copy JPEG 4000x3000\n0 3\n255\n",  # no pixels
        b"\xff\xd8\xff\xe0" + bytes(100),  # a JPEG
    ],
)
def test_the_reader_takes_only_what_the_maker_writes(data: bytes) -> None:
    with pytest.raises(working_copy.InvalidWorkingCopy):
        working_copy.read(data)
