"""The shipped model on ONNX Runtime: fp32 equals torch, the one-pass heat map equals pytorch-grad-cam's,
int8 stays close to fp32 on the fixture images, and (when the data is here) int8 is the default backend
only where the validation split shows it meets the bar.

Uses the entry's own model.onnx / model.int8.onnx when they belong to its current weights; otherwise
exports into a temporary copy once per module (int8 only when the training data is present, since it
is calibrated on training images).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml import backend_choice, export, quantize, registry, serving_choice
from ml.labels import CLASSES
from ml.predictor import Predictor
from tests.ml.test_predictor import _input, _reference_map, _upsampled, explained, pearson

SHIPPED = registry.REGISTRY_DIR / registry.DEFAULT_MODEL
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ham10000"
#: The bar for serving int8 by default: it gives fp32's most probable class on at least this share
#: of validation images. The shipped model's int8 graph measured 98.3% on its 1,277 validation images
#: and is therefore not the default (nor shipped: ml.export re-creates it); see docs/PERFORMANCE.md.
MIN_AGREEMENT = serving_choice.MIN_TOP1_AGREEMENT  # the bar: 99% on the most probable class
#: What the shipped model's int8 graph does measure on validation on a VNNI CPU (98.3%), less half a
#: point of run-to-run rounding: a regression guard on the CPU class it was measured on, not the bar.
INT8_AGREEMENT_FLOOR = 0.977
#: The same guard on any other class of int8 kernels: x86 without VNNI saturates u8s8 sums, and the
#: graph measured 96.4% there (ml.backend_choice.int8_kernel).
INT8_AGREEMENT_FLOOR_ANY_CPU = 0.955
#: How far int8 may move the nine fixture images' answers. Agreeing on 96-98% of validation top classes
#: (by CPU class), it is not held to the 99% bar on nine images: one of them, ISIC_0026083 (fp32: akiec
#: at 0.61, bkl 0.20), lies near enough to a boundary that int8 makes it nv (seen on x86 without VNNI and
#: in CI). A broken graph (wrong scales, a lost layer) moves most of them.
INT8_FIXTURE_FLIPS = 1
#: Total variation between the fp32 and int8 probability vectors, median over the fixture images
#: (measured: 0.008 on x86 without VNNI; the one flipped image moves 0.35).
INT8_MEDIAN_SHIFT = 0.05


def _current(entry: Path, artefact: str) -> bool:
    files = registry.read_manifest(entry).get("files", {})
    record = files.get(artefact)
    return bool(record) and record.get("source_weights_sha256") == files["weights"]["sha256"]


def _data_matches(entry: Path) -> bool:
    if not DATA.is_dir():
        return False
    try:
        quantize.training_split(registry.read_manifest(entry), DATA)
    except (export.ExportError, FileNotFoundError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def entry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SHIPPED.is_dir():
        pytest.skip(f"no shipped model at {SHIPPED}")
    if _current(SHIPPED, "onnx_fp32") and (_current(SHIPPED, "onnx_int8") or not _data_matches(SHIPPED)):
        return SHIPPED
    copied = Path(
        shutil.copytree(
            SHIPPED, tmp_path_factory.mktemp("shipped") / SHIPPED.name, ignore=shutil.ignore_patterns("*.png", "*.onnx")
        )
    )
    calibration, info = None, {}
    if _data_matches(copied):
        manifest = registry.read_manifest(copied)
        split = quantize.training_split(manifest, DATA)
        chosen = quantize.calibration_samples(
            split.train, quantize.DEFAULT_CALIBRATION_IMAGES, manifest["data"]["split_seed"]
        )
        calibration, info = quantize.decode_samples(chosen), {"split": "train"}
    export.export_entry(copied, calibration=calibration, calibration_info=info)
    return copied


@pytest.fixture(scope="module")
def torch_predictor(entry: Path) -> Predictor:
    return Predictor.load(entry, device="cpu", backend="torch")


@pytest.fixture(scope="module")
def onnx_predictor(entry: Path) -> Predictor:
    return Predictor.load(entry, device="cpu", backend="onnx")


@pytest.fixture(scope="module")
def int8_predictor(entry: Path) -> Predictor:
    if not _current(entry, "onnx_int8"):
        pytest.skip(f"no int8 graph: it is calibrated on training images and {DATA} is absent")
    return Predictor.load(entry, device="cpu", backend="onnx-int8")


def test_fp32_logits_match_torch_on_real_images(
    torch_predictor: Predictor, onnx_predictor: Predictor, fixture_pil: list[Image.Image]
) -> None:
    np.testing.assert_allclose(onnx_predictor.logits(fixture_pil), torch_predictor.logits(fixture_pil), atol=1e-4)
    assert [p.label for p in onnx_predictor.predict(fixture_pil)] == [
        p.label for p in torch_predictor.predict(fixture_pil)
    ]


def test_one_pass_cam_from_the_onnx_feature_map_matches_pytorch_grad_cam(
    torch_predictor: Predictor, onnx_predictor: Predictor, fixture_pil: list[Image.Image]
) -> None:
    assert torch_predictor.model is not None
    model = copy.deepcopy(torch_predictor.model).to(memory_format=torch.contiguous_format)
    for image in fixture_pil[:4]:
        x = _input(torch_predictor, image)
        top_two = np.argsort(onnx_predictor.logits([image])[0])[::-1][:2]
        for index in top_two:
            ours = _upsampled(explained(onnx_predictor, image, CLASSES[index]).cam, x)
            theirs = _reference_map(model, model.bn2, x, int(index))
            if not theirs.any():  # no position speaks for this class: both maps are empty after the ReLU
                assert not ours.any()
                continue
            assert pearson(ours, theirs) >= 0.999


def test_int8_stays_close_to_fp32_on_the_fixture_images(
    onnx_predictor: Predictor, int8_predictor: Predictor, fixture_pil: list[Image.Image]
) -> None:
    def probabilities(predictor: Predictor) -> np.ndarray:
        return np.array([[p.probabilities[c] for c in CLASSES] for p in predictor.predict(fixture_pil)])

    fp32, int8 = probabilities(onnx_predictor), probabilities(int8_predictor)
    assert (fp32.argmax(axis=1) != int8.argmax(axis=1)).sum() <= INT8_FIXTURE_FLIPS
    assert np.median(0.5 * np.abs(fp32 - int8).sum(axis=1)) <= INT8_MEDIAN_SHIFT
    for i, image in enumerate(fixture_pil[:3]):  # the int8 heat map still shows the same evidence
        label = CLASSES[int(fp32[i].argmax())]
        int8_map, fp32_map = explained(int8_predictor, image, label).cam, explained(onnx_predictor, image, label).cam
        assert pearson(int8_map, fp32_map) >= 0.9


@pytest.mark.slow
def test_int8_is_served_by_default_only_where_it_meets_the_bar_on_validation(entry: Path) -> None:
    """The bar for int8 (top class agrees with fp32 on at least 99% of the validation split, balanced
    accuracy within one point) decides the default backend; validation, because the test split is read
    once, after every choice. This test recomputes the figures from the graphs themselves on this CPU.
    On the class of int8 kernels the manifest's figures were measured on, they must be these figures,
    and the agreement is guarded against regressions; on another class (x86 without VNNI saturates
    u8s8 sums: the shipped graph measured 96.0% there) ``auto`` must not serve int8 at all."""
    if not _data_matches(entry):
        pytest.skip(f"the training data is not at {DATA}")
    if not _current(entry, "onnx_int8"):
        pytest.skip("no int8 graph for these weights")
    measured = serving_choice.compare_on_validation(entry, DATA)
    n = measured["n"]
    assert measured["top1_agreement"] >= INT8_AGREEMENT_FLOOR_ANY_CPU
    expected = serving_choice.decide_serving(measured, has_int8=True)
    meets = (
        measured["top1_agreement"] >= MIN_AGREEMENT
        and measured["balanced_accuracy"]["onnx-int8"]
        >= measured["balanced_accuracy"]["onnx"] - serving_choice.INT8_TOLERANCE
    )
    if not meets:
        assert expected["default_backend"] == "onnx"
    manifest = registry.read_manifest(entry)
    serving = manifest.get("serving")
    auto = backend_choice.choose(manifest, "auto", torch.device("cpu"))
    if serving is None or "top1_agreement" not in serving:
        assert auto == "onnx"
        return
    if serving.get("int8_kernel") != measured["int8_kernel"]:
        assert auto == "onnx"  # figures from another class of CPU qualify nothing here
        return
    assert serving["default_backend"] == expected["default_backend"] == auto
    # the same class of kernels rounds the same way: a few images either way at most
    assert serving["top1_agreement"] == pytest.approx(measured["top1_agreement"], abs=3 / n)
    for backend in ("onnx", "onnx-int8"):
        assert serving["balanced_accuracy"][backend] == pytest.approx(measured["balanced_accuracy"][backend], abs=0.01)
    assert measured["top1_agreement"] >= INT8_AGREEMENT_FLOOR
    if auto == "onnx-int8":  # what is served refers as many concerning lesions as fp32 would, within a point
        assert measured["referral_sensitivity"]["onnx-int8"] >= measured["referral_sensitivity"]["onnx"] - 0.01


def test_served_answers_gate_as_the_fitted_gate_scores(entry: Path, fixture_pil: list[Image.Image]) -> None:
    """What serving flags (predict, and classify as a worker calls it) is what the fitted gate's own
    scores of the same inputs flag: nothing for the fixture lesions, a reason for each image that is
    not one (blank, noise, a flat colour)."""
    predictor = Predictor.load(entry, device="cpu", backend="onnx")
    gate = predictor.gate
    assert gate is not None
    rng = np.random.default_rng(5)
    not_lesions = [
        Image.new("RGB", (300, 225), (250, 250, 250)),
        Image.fromarray(rng.integers(0, 256, (225, 300, 3), dtype=np.uint8)),
        Image.new("RGB", (300, 225), (20, 60, 200)),
    ]
    images = [*fixture_pil, *not_lesions]
    out = predictor.outputs(images)
    expected = gate.reasons(gate.scores(out.pixels, out.logits, out.features))
    assert all(expected[len(fixture_pil) :]) and not any(expected[: len(fixture_pil)]), expected
    assert [p.ood_reasons for p in predictor.predict(images)] == expected
    assert [a.prediction.ood_reasons for a in predictor.classify(images)] == expected


def test_a_graph_for_another_input_size_than_the_manifests_is_refused_at_load(tmp_path: Path) -> None:
    """The graph's declared input size was met only after the load, by the first pass (the known answer
    or the warm-up), as ONNX Runtime's own error: a worker logged no model_load_failed and a clinic was
    not told the model is unavailable. The load refuses it as the entry's fault, naming both sizes."""
    if not SHIPPED.is_dir() or not _current(SHIPPED, "onnx_fp32"):
        pytest.skip(f"no current model.onnx in {SHIPPED}")
    edited = Path(shutil.copytree(SHIPPED, tmp_path / SHIPPED.name, ignore=shutil.ignore_patterns("*.png")))
    manifest = registry.read_manifest(edited)
    height, width = manifest["preprocessing"]["input_size"]
    manifest["preprocessing"]["input_size"] = [height + 32, width]
    registry.write_json_atomic(edited / registry.MANIFEST, manifest)
    with pytest.raises(registry.RegistryError, match="exported for another input size") as refused:
        Predictor.load(edited, device="cpu", backend="onnx")
    assert f"(N, 3, {height + 32}, {width})" in str(refused.value) and f"3, {height}, {width}]" in str(refused.value)
