"""Numbers no answer can be made from: a manifest whose decision, preprocessing or gate values no
fitted model has is refused when the entry loads (it turned every case into NaN probabilities, or a
silently inverted ranking), and a model whose scores come out non-finite raises instead of reading as
a confident diagnosis that no gate flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ml import ood, registry
from ml.decision import DecisionPolicy, NonFiniteOutput
from ml.entry import save_entry, save_gate
from ml.predictor import Predictor
from tests.ml.conftest import TINY_ARCH, tiny_model, tiny_prep
from tests.ml.test_ood import _fit


def _edit(entry: Path, section: str, **values: Any) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    target = manifest
    for key in section.split("."):
        target = target[key]
    target.update(values)
    (entry / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("section", "values", "says"),
    [
        ("decision.calibration", {"temperature": 0}, "temperature"),
        ("decision.calibration", {"temperature": -0.8}, "temperature"),  # would invert the ranking
        ("decision.calibration", {"bias": [0.1, 0.2]}, "bias"),
        ("decision.prior", {"nv": 0.0}, "prior"),
        ("decision", {"referral_threshold": 1.5}, "thresholds"),
        ("decision", {"uncertainty_threshold": float("nan")}, "thresholds"),
        ("preprocessing", {"std": [0.229, 0.0, 0.225]}, "deviations"),
        ("preprocessing", {"mean": [0.5, float("inf"), 0.5]}, "means"),
        ("decision.calibration", {"temperature": 1e-310}, "temperature"),  # logits / T: NaN probabilities
        ("preprocessing", {"mean": [123.7, 116.3, 103.5]}, "means"),  # the 0-255 scale
        # the warm-up image is already at the input size and skips the resize: each case then failed
        ("preprocessing", {"interpolation": "lanczos"}, "interpolation"),
        ("preprocessing", {"resize": "center_crop"}, "resize"),  # was served squashed, unsaid
        ("preprocessing", {"colour_constancy": "grey_world"}, "colour constancy"),
    ],
)
def test_a_manifest_with_numbers_no_model_was_fitted_with_is_refused_at_load(
    tiny_entry: Path, section: str, values: dict[str, Any], says: str
) -> None:
    Predictor.load(tiny_entry, device="cpu")  # loads as saved
    _edit(tiny_entry, section, **values)
    with pytest.raises(registry.RegistryError, match=says):
        Predictor.load(tiny_entry, device="cpu")


@pytest.mark.parametrize(
    "thresholds",
    [
        {"contrast": 8.0, "noise": 0.3, "colour": 42.0, "energy": -2.0},  # one missing
        {"contrast": 8.0, "noise": 0.3, "colour": 42.0, "energy": -2.0, "distance": float("nan")},
        {"contrast": 8.0, "noise": 0.3, "colour": 42.0, "energy": -2.0, "distance": "far"},
    ],
)
def test_a_gate_without_a_finite_threshold_for_each_score_is_refused_at_load(
    tiny_entry: Path, thresholds: dict[str, Any]
) -> None:
    gate = _fit(np.random.default_rng(0))[0]
    save_gate(tiny_entry, gate)
    assert Predictor.load(tiny_entry, device="cpu").gate is not None
    manifest = json.loads((tiny_entry / "manifest.json").read_text())
    manifest["ood"]["thresholds"] = thresholds
    (tiny_entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(registry.RegistryError, match="out-of-distribution gate"):
        Predictor.load(tiny_entry, device="cpu")


def test_gate_arrays_that_do_not_fit_together_are_refused() -> None:
    gate = _fit(np.random.default_rng(0))[0]
    arrays = gate.arrays()
    ood.OODGate.from_arrays(arrays, gate.thresholds)
    with pytest.raises(ValueError, match="class_means"):
        ood.OODGate.from_arrays(arrays | {"class_means": arrays["class_means"][:5]}, gate.thresholds)


def test_a_model_whose_scores_are_nan_raises_instead_of_answering(tmp_path: Path) -> None:
    net = tiny_model()
    with torch.no_grad():
        net.get_classifier().bias[2] = float("nan")  # a corrupted weight: every image scores NaN there
    entry = save_entry(
        tmp_path / "nan-v1",
        net,
        model_id="nan-v1",
        architecture=TINY_ARCH,
        preprocessing=tiny_prep(net),
        policy=DecisionPolicy(),
        dtype=torch.float32,
    )
    predictor = Predictor.load(entry, device="cpu")
    image = Image.new("RGB", (160, 120), (180, 120, 100))
    with pytest.raises(NonFiniteOutput, match="non-finite"):
        predictor.classify([image])
    with pytest.raises(NonFiniteOutput):
        predictor.predict([image])


def test_the_refusal_counts_the_images_whose_scores_are_not_numbers() -> None:
    net = tiny_model(TINY_ARCH)
    predictor = Predictor(net, tiny_prep(net), DecisionPolicy())
    logits = np.zeros((5, 7), dtype=np.float32)
    logits[1, 2] = np.nan
    logits[2, 0] = np.inf
    logits[4, [1, 5]] = (-np.inf, np.nan)
    with pytest.raises(NonFiniteOutput, match=r"for 3 image\(s\)"):
        predictor._decide(logits)
    assert len(predictor._decide(logits[[0, 3]])) == 2  # the finite rows alone are answered
