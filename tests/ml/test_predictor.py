"""ml.predictor and ml.gradcam: prediction invariants, heat maps, and agreement with pytorch-grad-cam."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from ml import preprocess
from ml.decision import DecisionPolicy
from ml.gradcam import GradCAM, linear_gap_head
from ml.labels import CLASSES
from ml.predictor import Explanation, Predictor
from tests.ml.conftest import TINY_ARCH, TINY_HOOK_ARCH, tiny_model, tiny_prep


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    assert a.std() > 0 and b.std() > 0, "a flat map proves nothing"
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def explained(predictor: Predictor, image: Image.Image, class_code: str | None = None) -> Explanation:
    """What the worker does for one image: classify it, then explain that analysis."""
    return predictor.explain(image, predictor.classify([image])[0], class_code)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    net = tiny_model(TINY_ARCH)
    return Predictor(net, tiny_prep(net), DecisionPolicy(), device="cpu", batch_size=4)


def test_predictions_are_well_formed(predictor: Predictor, fixture_pil: list[Image.Image]) -> None:
    predictions = predictor.predict(fixture_pil)
    assert len(predictions) == len(fixture_pil)
    for p in predictions:
        assert list(p.probabilities) == list(CLASSES)
        assert abs(sum(p.probabilities.values()) - 1.0) < 1e-6
        assert all(0.0 <= v <= 1.0 for v in p.probabilities.values())
        assert p.label in CLASSES
        assert p.confidence == p.probabilities[p.label]
        assert 0.0 <= p.uncertainty <= 1.0
        assert p.referral == bool(p.referral_reasons)


def test_batching_does_not_change_answers(predictor: Predictor, fixture_pil: list[Image.Image]) -> None:
    together = predictor.logits(fixture_pil)  # batch size 4: three uneven batches
    alone = np.concatenate([predictor.logits([image]) for image in fixture_pil])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(predictor.logits(fixture_pil), together, atol=0)  # deterministic


def test_any_size_and_aspect_ratio(predictor: Predictor) -> None:
    images = [Image.new("RGB", size, (120, 80, 60)) for size in ((32, 32), (640, 90), (90, 640), (3000, 2000))]
    assert len(predictor.predict(images)) == 4
    assert predictor.predict([]) == []
    assert len(predictor.classify(images)) == 4
    assert predictor.classify([]) == []


def test_classify_answers_like_predict(predictor: Predictor, fixture_pil: list[Image.Image]) -> None:
    """One forward pass over the whole batch (classify) and batches of ``batch_size`` (predict) agree."""
    analyses = predictor.classify(fixture_pil)  # more images than batch_size: still one pass
    predictions = predictor.predict(fixture_pil)
    assert [a.prediction.label for a in analyses] == [p.label for p in predictions]
    for analysis, prediction in zip(analyses, predictions, strict=True):
        for code in CLASSES:
            assert analysis.prediction.probabilities[code] == pytest.approx(prediction.probabilities[code], abs=1e-5)
        assert analysis.batch.shape[0] == 1 and analysis.features is not None


def test_model_runs_channels_last(predictor: Predictor) -> None:
    weight = predictor.model.conv_stem.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_explanation_is_a_map_of_the_image(predictor: Predictor, fixture_pil: list[Image.Image]) -> None:
    image = fixture_pil[0]
    explanation = explained(predictor, image)
    assert explanation.heatmap.shape == (image.height, image.width)
    assert explanation.heatmap.dtype == np.float32
    assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() <= 1.0
    overlay = Image.open(io.BytesIO(explanation.overlay_png))
    assert overlay.format == "PNG" and overlay.size == image.size
    assert explanation.method == "cam"


def test_large_images_get_a_bounded_overlay(predictor: Predictor) -> None:
    explanation = explained(predictor, Image.new("RGB", (4000, 3000), (100, 90, 80)))
    assert Image.open(io.BytesIO(explanation.overlay_png)).size == (512, 384)


def test_overlay_pixels_follow_the_blend_formula(fixture_pil: list[Image.Image]) -> None:
    from ml import heatmap

    image = fixture_pil[2]
    cam = np.random.default_rng(3).random((6, 6)).astype(np.float32)
    png = heatmap.render(image, cam)
    heat = heatmap.upsample(cam, image.size)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    expected = heatmap.IMAGE_WEIGHT * pixels + (1 - heatmap.IMAGE_WEIGHT) * heatmap.colormap(heat).astype(np.float32)
    drawn = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    assert drawn.shape == expected.shape
    assert np.abs(drawn - expected).max() <= 3.0  # uint8 lookup table and blend: rounding only
    assert np.abs(drawn - expected).mean() <= 1.0


def test_explain_a_chosen_class(predictor: Predictor, fixture_pil: list[Image.Image]) -> None:
    analysis = predictor.classify([fixture_pil[1]])[0]
    maps = {code: predictor.explain(fixture_pil[1], analysis, code) for code in ("mel", "nv")}
    assert maps["mel"].class_code == "mel" and maps["nv"].class_code == "nv"
    assert not np.allclose(maps["mel"].cam, maps["nv"].cam)
    assert explained(predictor, fixture_pil[1]).class_code == analysis.prediction.label


def _input(predictor: Predictor, image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(preprocess.batch_nhwc([image], predictor.prep)).permute(0, 3, 1, 2).contiguous()


def _reference_map(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, index: int) -> np.ndarray:
    with ReferenceGradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(index)])[0]


def _upsampled(cam: np.ndarray, x: torch.Tensor) -> np.ndarray:
    return cv2.resize(cam.astype(np.float32), (x.shape[3], x.shape[2]))


def test_one_pass_cam_matches_pytorch_grad_cam(predictor: Predictor, fixture_pil: list[Image.Image]) -> None:
    assert linear_gap_head(predictor.model) is not None
    for image in fixture_pil[:4]:
        x = _input(predictor, image)
        top_two = np.argsort(predictor.logits([image])[0])[::-1][:2]  # classes with a positive evidence map
        for code in (CLASSES[i] for i in top_two):
            ours = _upsampled(explained(predictor, image, code).cam, x)
            theirs = _reference_map(predictor.model, predictor.model.bn2, x, CLASSES.index(code))
            assert pearson(ours, theirs) >= 0.999


def test_one_pass_cam_equals_the_gradient_path(predictor: Predictor, fixture_pil: list[Image.Image]) -> None:
    x = _input(predictor, fixture_pil[2])
    one_pass = explained(predictor, fixture_pil[2], "mel").cam
    with torch.inference_mode():  # GradCAM must still get gradients in here
        gradient, _ = GradCAM(predictor.model)(x, CLASSES.index("mel"))
    assert pearson(one_pass, gradient) >= 0.9999


def test_hook_path_for_other_heads_matches_pytorch_grad_cam(fixture_pil: list[Image.Image]) -> None:
    net = tiny_model(TINY_HOOK_ARCH)
    assert linear_gap_head(net) is None  # norm layer in the head: no one-pass shortcut
    predictor = Predictor(net, tiny_prep(net), DecisionPolicy(), device="cpu")
    image = fixture_pil[3]
    x = _input(predictor, image)
    for target in (None, "stages.3"):
        ours, _ = GradCAM(predictor.model, target)(x, CLASSES.index("mel"))
        layer = predictor.model.stages[3]
        theirs = _reference_map(predictor.model, layer, x, CLASSES.index("mel"))
        assert pearson(_upsampled(ours, x), theirs) >= 0.99
    assert explained(predictor, image).method == "gradcam"


def test_hooks_are_always_released(fixture_pil: list[Image.Image]) -> None:
    net = tiny_model(TINY_HOOK_ARCH)
    predictor = Predictor(net, tiny_prep(net), DecisionPolicy(), device="cpu")
    x = _input(predictor, fixture_pil[0])
    cam = GradCAM(predictor.model, "stages.3")
    first, _ = cam(x, 0)
    with pytest.raises(ValueError):
        GradCAM(predictor.model, "no.such.layer")(x, 0)
    with pytest.raises(IndexError):
        cam(x, 99)  # fails after the hooks went in
    for module in predictor.model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    np.testing.assert_allclose(cam(x, 0)[0], first, atol=1e-6)


def test_warm_up_and_describe(predictor: Predictor) -> None:
    import json

    predictor.warm_up(rounds=1)
    described = json.loads(predictor.describe())  # the worker's "model loaded" log line
    assert described == {"model_id": "unregistered", "device": "cpu", "backend": "torch", "tta": "none", "cam": True}


def test_loaded_entry_predicts(tiny_entry: Path, fixture_pil: list[Image.Image]) -> None:
    loaded = Predictor.load(tiny_entry, device="auto")
    assert loaded.device.type in ("cpu", "cuda")
    assert len(loaded.predict(fixture_pil[:2])) == 2
