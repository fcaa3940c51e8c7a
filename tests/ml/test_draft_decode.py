"""Draft-mode decoding of large JPEGs (what the worker does: ``reduce_to=overlay_max_side``) gives the
same answers as a full decode, within a stated tolerance: the same label, and every calibrated
probability within 0.03 (measured: at most 0.012 on these images)."""

from __future__ import annotations

import pytest

from bench.common import camera_jpegs
from core.config import Settings
from ml import registry
from ml.images import decode
from ml.predictor import Predictor

SHIPPED = registry.REGISTRY_DIR / registry.DEFAULT_MODEL
TOLERANCE = 0.03


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no shipped model")
def test_twelve_megapixel_jpegs_decoded_in_draft_mode_get_the_full_decode_answer() -> None:
    predictor = Predictor.load(SHIPPED, device="cpu")
    reduce_to = Settings.model_fields["overlay_max_side"].default
    for data in camera_jpegs():
        draft = decode(data, reduce_to=reduce_to)
        assert max(draft.image.size) < 4000  # it did decode at reduced scale
        full = predictor.predict([decode(data).image])[0]
        fast = predictor.predict([draft.image])[0]
        assert fast.label == full.label
        for code, probability in full.probabilities.items():
            assert fast.probabilities[code] == pytest.approx(probability, abs=TOLERANCE)
