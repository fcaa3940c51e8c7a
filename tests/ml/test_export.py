"""ml.export and the ONNX Runtime backends on tiny timm models: export, int8, integrity, backend choice, CLI."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml import backend_choice, evaluate, export, ood, quantize, registry, serving_choice
from ml import data as ds
from ml.entry import save_gate
from ml.labels import CLASSES
from ml.predictor import Predictor
from tests.ml.conftest import TINY_HOOK_ARCH, save_tiny_entry
from tests.ml.test_predictor import _input, _reference_map, _upsampled, explained, pearson

FIXTURE_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "images"


def _with_data_record(entry: Path, data: Path = FIXTURE_DATA) -> Path:
    """Record ``data`` in the manifest as the model's training data, as ml.train does."""
    manifest = registry.read_manifest(entry)
    manifest["data"] = {
        "digest": ds.dataset_digest(ds.read_dataset(data)),
        "split_seed": 7,
        "val_fraction": 0.3,  # two validation images: the int8 choice is made on them
        "test_fraction": 0.3,
    }
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    return entry


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, fixture_pil: list[Image.Image]) -> Path:
    """A tiny entry (hflip TTA, like the shipped model) with model.onnx and model.int8.onnx."""
    entry = save_tiny_entry(
        tmp_path_factory.mktemp("onnx") / "tiny-onnx",
        tta="hflip",
        dtype=torch.float16,  # stored like the shipped model; exported in float32
    )
    export.export_entry(entry, calibration=fixture_pil)
    return entry


@pytest.fixture(scope="module")
def torch_predictor(exported: Path) -> Predictor:
    return Predictor.load(exported, device="cpu", backend="torch")


@pytest.fixture(scope="module")
def onnx_predictor(exported: Path) -> Predictor:
    return Predictor.load(exported, device="cpu", backend="onnx")


def _copy(entry: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(entry, tmp_path / entry.name))


def test_export_writes_and_records_both_graphs(exported: Path) -> None:
    manifest = registry.read_manifest(exported)
    weights = manifest["files"]["weights"]["sha256"]
    for artefact, name in (("onnx_fp32", "model.onnx"), ("onnx_int8", "model.int8.onnx")):
        record = manifest["files"][artefact]
        assert record["path"] == name
        assert record["sha256"] == registry.sha256_file(exported / name)
        assert record["source_weights_sha256"] == weights
        assert record["classifier"] == "classifier.weight"
    assert manifest["files"]["onnx_fp32"]["max_logit_error"] <= 1e-4
    import onnx

    graph = onnx.load(str(exported / "model.onnx")).graph  # float16 on disk, float32 in the graph
    types = {t.data_type for t in graph.initializer}
    assert onnx.TensorProto.FLOAT in types and onnx.TensorProto.FLOAT16 not in types
    assert manifest["files"]["onnx_int8"]["quantization"]["format"] == "QDQ"
    assert not list(exported.glob(".*.tmp")), "temporary files left behind"


def test_onnx_logits_match_torch_at_any_batch_size(
    torch_predictor: Predictor, onnx_predictor: Predictor, fixture_pil: list[Image.Image]
) -> None:
    assert onnx_predictor.info.backend == "onnx" and torch_predictor.info.backend == "torch"
    assert onnx_predictor.model is None and onnx_predictor.device.type == "cpu"
    expected = torch_predictor.logits(fixture_pil)
    np.testing.assert_allclose(onnx_predictor.logits(fixture_pil), expected, atol=1e-4)
    np.testing.assert_allclose(onnx_predictor.logits(fixture_pil[:1]), expected[:1], atol=1e-4)
    onnx_predictor.batch_size = 4  # uneven batches through the dynamic batch axis
    try:
        np.testing.assert_allclose(onnx_predictor.logits(fixture_pil), expected, atol=1e-4)
    finally:
        onnx_predictor.batch_size = 32
    assert onnx_predictor.predict([]) == []


def test_onnx_predictor_answers_like_torch(
    torch_predictor: Predictor, onnx_predictor: Predictor, fixture_pil: list[Image.Image]
) -> None:
    image = fixture_pil[0]
    ours, theirs = onnx_predictor.classify([image])[0], torch_predictor.classify([image])[0]
    assert ours.prediction.label == theirs.prediction.label and ours.prediction.referral == theirs.prediction.referral
    for code in CLASSES:
        assert ours.prediction.probabilities[code] == pytest.approx(theirs.prediction.probabilities[code], abs=1e-5)
    our_map, their_map = onnx_predictor.explain(image, ours), torch_predictor.explain(image, theirs)
    assert our_map.method == "cam" and our_map.heatmap.shape == (image.height, image.width)
    np.testing.assert_allclose(our_map.heatmap, their_map.heatmap, atol=1e-3)
    assert Image.open(io.BytesIO(our_map.overlay_png)).size == image.size
    # an analysis without its feature map: the heat map costs one more forward pass, same map
    bare = dataclasses.replace(ours, features=None)
    again = onnx_predictor.explain(image, bare, "mel")
    np.testing.assert_allclose(again.heatmap, onnx_predictor.explain(image, ours, "mel").heatmap, atol=1e-6)
    onnx_predictor.warm_up(rounds=1)
    assert json.loads(onnx_predictor.describe())["backend"] == "onnx"


def test_onnx_one_pass_cam_matches_pytorch_grad_cam(
    torch_predictor: Predictor, onnx_predictor: Predictor, fixture_pil: list[Image.Image]
) -> None:
    model = torch_predictor.model
    assert model is not None
    model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    for image in fixture_pil[:3]:
        x = _input(torch_predictor, image)
        top_two = np.argsort(onnx_predictor.logits([image])[0])[::-1][:2]
        for index in top_two:
            ours = _upsampled(explained(onnx_predictor, image, CLASSES[index]).cam, x)
            theirs = _reference_map(model, model.bn2, x, int(index))
            assert pearson(ours, theirs) >= 0.999


def test_int8_graph_serves_the_same_interface(exported: Path, fixture_pil: list[Image.Image]) -> None:
    int8 = Predictor.load(exported, device="cpu", backend="onnx-int8", threads=1)
    assert int8.info.backend == "onnx-int8"
    assert int8.info.artefact_sha256 == registry.sha256_file(exported / "model.int8.onnx")
    assert int8.backend.session.get_session_options().intra_op_num_threads == 1  # type: ignore[attr-defined]
    explanation = explained(int8, fixture_pil[1])
    assert explanation.class_code in CLASSES and explanation.method == "cam"
    assert np.isfinite(int8.logits(fixture_pil)).all()


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx"])
def test_a_tampered_graph_is_refused(exported: Path, tmp_path: Path, name: str) -> None:
    entry = _copy(exported, tmp_path)
    data = bytearray((entry / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (entry / name).write_bytes(bytes(data))
    backend = "onnx" if name == "model.onnx" else "onnx-int8"
    with pytest.raises(registry.IntegrityError, match="integrity check"):
        Predictor.load(entry, device="cpu", backend=backend)
    manifest = registry.read_manifest(entry)
    manifest["serving"] = {
        "default_backend": backend,
        "int8_kernel": backend_choice.int8_kernel(),
        "onnx_int8_sha256": manifest["files"]["onnx_int8"]["sha256"],  # the graph as measured, before the edit
    }
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    with pytest.raises(registry.IntegrityError):  # auto refuses too, it never falls back silently
        Predictor.load(entry, device="cpu", backend="auto")


def test_a_graph_from_other_weights_is_refused(exported: Path, tmp_path: Path) -> None:
    entry = _copy(exported, tmp_path)
    manifest = registry.read_manifest(entry)
    manifest["files"]["onnx_fp32"]["source_weights_sha256"] = "0" * 64
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    with pytest.raises(registry.RegistryError, match=r"other weights.*ml\.export"):
        Predictor.load(entry, device="cpu", backend="onnx")


def test_a_missing_graph_is_explained(tiny_entry: Path) -> None:
    with pytest.raises(registry.RegistryError, match=r"no model\.onnx.*python -m ml\.export"):
        Predictor.load(tiny_entry, device="cpu", backend="onnx")
    with pytest.raises(ValueError, match="unknown backend"):
        Predictor.load(tiny_entry, device="cpu", backend="tensorrt")


def test_auto_backend_choice(exported: Path, tiny_entry: Path) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    both = {"files": {"weights": {}, "onnx_fp32": {}, "onnx_int8": {"sha256": "a" * 64}}}
    assert backend_choice.choose({"files": {"weights": {}}}, "auto", cpu) == "torch"
    assert backend_choice.choose({"files": {"weights": {}, "onnx_fp32": {}}}, "auto", cpu) == "onnx"
    assert backend_choice.choose(both, "auto", cpu) == "onnx"  # int8 only when the manifest says so
    int8_here = {
        "default_backend": "onnx-int8",
        "int8_kernel": backend_choice.int8_kernel(),
        "onnx_int8_sha256": "a" * 64,
    }
    assert backend_choice.choose({**both, "serving": int8_here}, "auto", cpu) == "onnx-int8"
    # figures of another int8 graph (or none named): they do not hold for this one
    assert backend_choice.choose({**both, "serving": int8_here | {"onnx_int8_sha256": "b" * 64}}, "auto", cpu) == "onnx"
    unnamed = {k: v for k, v in int8_here.items() if k != "onnx_int8_sha256"}
    assert backend_choice.choose({**both, "serving": unnamed}, "auto", cpu) == "onnx"
    # int8 chosen on another class of CPU (or where none was recorded): its figures do not hold here
    elsewhere = "x86-no-vnni" if backend_choice.int8_kernel() == "x86-vnni" else "x86-vnni"
    assert backend_choice.choose({**both, "serving": int8_here | {"int8_kernel": elsewhere}}, "auto", cpu) == "onnx"
    assert backend_choice.choose({**both, "serving": {"default_backend": "onnx-int8"}}, "auto", cpu) == "onnx"
    assert backend_choice.choose({**both, "serving": {"default_backend": "torch"}}, "auto", cpu) == "torch"
    no_int8 = {"files": {"weights": {}, "onnx_fp32": {}}, "serving": {"default_backend": "onnx-int8"}}
    assert backend_choice.choose(no_int8, "auto", cpu) == "onnx"
    assert backend_choice.choose(both, "auto", cuda) == "torch"
    assert backend_choice.choose(both, "onnx-int8", cpu) == "onnx-int8"
    assert Predictor.load(tiny_entry, device="cpu").info.backend == "torch"
    assert Predictor.load(exported, device="cpu").info.backend == "onnx"
    with pytest.raises(ValueError, match="runs on the CPU"):
        Predictor.load(exported, device="cuda", backend="onnx")


def test_auto_serves_only_the_int8_graph_the_manifest_measured(
    tiny_entry: Path, fixture_pil: list[Image.Image]
) -> None:
    """``serving`` approves the int8 graph its figures were measured on. A graph written after them
    (``export_entry`` quantises again before ``ml.export`` compares: an export stopped there, or a graph
    quantised by hand) has not met the rule: ``auto`` serves fp32 until it is compared."""
    entry = _with_data_record(tiny_entry)
    export.run(entry, FIXTURE_DATA, threads=1)
    manifest = registry.read_manifest(entry)
    measured = manifest["files"]["onnx_int8"]["sha256"]
    assert manifest["serving"]["onnx_int8_sha256"] == measured
    manifest["serving"]["default_backend"] = "onnx-int8"  # as if its figures had met the rule
    registry.write_json_atomic(entry / registry.MANIFEST, manifest)
    assert Predictor.load(entry, device="cpu").info.backend == "onnx-int8"

    export.export_entry(entry, calibration=fixture_pil[-3:])  # another int8 graph, not compared
    assert registry.read_manifest(entry)["files"]["onnx_int8"]["sha256"] != measured
    assert Predictor.load(entry, device="cpu").info.backend == "onnx"
    assert Predictor.load(entry, device="cpu", backend="onnx-int8").info.backend == "onnx-int8"  # when asked for


def test_a_head_without_the_one_pass_map_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = save_tiny_entry(tmp_path / "convnext", TINY_HOOK_ARCH)
    with pytest.raises(export.ExportError, match="backend='torch'"):
        export.export_entry(entry)
    assert export.main(["--model", str(entry)]) == 2
    assert "average pooling" in capsys.readouterr().err
    assert "onnx_fp32" not in registry.read_manifest(entry)["files"]
    assert not list(entry.glob("*.onnx"))


def test_cli_without_data_exports_fp32_and_serves_it(tiny_entry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export.main(["--model", str(tiny_entry)]) == 0
    manifest = registry.read_manifest(tiny_entry)
    assert "onnx_fp32" in manifest["files"] and "onnx_int8" not in manifest["files"]
    assert manifest["serving"]["default_backend"] == "onnx"
    assert json.loads(capsys.readouterr().out)["default_backend"] == "onnx"
    assert Predictor.load(tiny_entry, device="cpu").info.backend == "onnx"


def test_cli_with_data_calibrates_on_training_images_and_decides(tiny_entry: Path) -> None:
    entry = _with_data_record(tiny_entry)
    assert export.main(["--model", str(entry), "--data", str(FIXTURE_DATA), "--threads", "1"]) == 0
    manifest = registry.read_manifest(entry)
    split = quantize.training_split(manifest, FIXTURE_DATA)
    calibration = manifest["files"]["onnx_int8"]["calibration"]
    assert calibration["split"] == "train" and calibration["images"] == len(split.train)
    assert calibration["image_ids_sha256"] == registry.sha256_bytes(
        "\n".join(s.image_id for s in quantize.calibration_samples(split.train, 200, 7)).encode()
    )
    serving = manifest["serving"]
    assert serving["split"] == "val" and serving["n"] == len(split.val)  # the test split is read once, elsewhere
    for figure in ("balanced_accuracy", "referral_sensitivity", "mel_sensitivity"):
        assert set(serving[figure]) == {"onnx", "onnx-int8"}
    fp32, int8 = serving["balanced_accuracy"]["onnx"], serving["balanced_accuracy"]["onnx-int8"]
    referral = serving["referral_sensitivity"]
    assert 0.0 <= serving["top1_agreement"] <= 1.0
    # the recorded figures and the rule the manifest states give the backend it chose (a tiny random
    # model on two images: int8 and fp32 can disagree on one, and then fp32 serves)
    int8_qualifies = (
        int8 >= fp32 - serving_choice.INT8_TOLERANCE
        and serving["top1_agreement"] >= serving_choice.MIN_TOP1_AGREEMENT
        and referral["onnx-int8"] >= referral["onnx"] - serving_choice.INT8_TOLERANCE
    )
    assert serving["default_backend"] == ("onnx-int8" if int8_qualifies else "onnx")
    assert Predictor.load(entry, device="cpu").info.backend == serving["default_backend"]


def test_serving_decision_rule() -> None:
    def comparison(
        int8: float,
        agreement: float = 0.995,
        referral: float = 0.90,
        flagged: float | None = 0.015,
        ood_agreement: float | None = 0.996,
    ) -> dict[str, object]:
        return {
            "balanced_accuracy": {"onnx": 0.700, "onnx-int8": int8},
            "referral_sensitivity": {"onnx": 0.90, "onnx-int8": referral},
            "top1_agreement": agreement,
            "ood_flagged": {"onnx": None if flagged is None else 0.015, "onnx-int8": flagged},
            "ood_agreement": ood_agreement,
            "n": 250,
        }

    def backend(**kwargs: float | None) -> str:
        return str(serving_choice.decide_serving(comparison(**kwargs), has_int8=True)["default_backend"])  # type: ignore[arg-type]

    assert backend(int8=0.6905) == "onnx-int8"  # within one point, agrees, refers as often, gated alike
    assert backend(int8=0.6895) == "onnx"  # more than one point of balanced accuracy lost
    assert backend(int8=0.700, agreement=0.985) == "onnx"  # most probable class agrees on under 99%
    assert backend(int8=0.700, referral=0.885) == "onnx"  # misses referrals fp32 makes
    # the gate refuses more real lesions behind int8 (thresholds fitted on fp32's outputs)
    assert backend(int8=0.700, flagged=0.019) == "onnx-int8"  # under half a point more
    assert backend(int8=0.700, flagged=0.021) == "onnx"  # more than half a point more
    # as many refused, but other lesions: the gate's verdict differs on more than 1% of images
    assert backend(int8=0.700, flagged=0.015, ood_agreement=0.985) == "onnx"
    # an entry without a gate: nothing is refused behind either graph, the rest of the rule decides
    assert backend(int8=0.700, flagged=None, ood_agreement=None) == "onnx-int8"
    assert "out-of-distribution gate" in serving_choice.decide_serving(comparison(0.700), has_int8=True)["rule"]
    assert serving_choice.decide_serving(None, has_int8=True)["default_backend"] == "onnx"
    assert serving_choice.decide_serving(comparison(0.700), has_int8=False)["default_backend"] == "onnx"
    assert serving_choice.decide_serving(comparison(0.700) | {"n": 0}, has_int8=True)["default_backend"] == "onnx"


def test_the_int8_choice_weighs_the_images_the_gate_refuses_behind_each_graph(tiny_entry: Path) -> None:
    """The gate's thresholds are fitted on fp32's outputs: behind int8 it can refuse other (or more) real
    lesions. The comparison records the share each graph gets flagged, as serving flags it, and their
    agreement image by image; a gate that flags a validation image behind one graph and not the other
    keeps int8 from the default (two images: agreement 50%)."""
    entry = _with_data_record(tiny_entry)
    assert export.run(entry, FIXTURE_DATA, threads=1)["ood_flagged"] == {"onnx": None, "onnx-int8": None}
    samples, _ = evaluate.select_samples(registry.read_manifest(entry), FIXTURE_DATA, "val")
    images = evaluate.load_images(samples)
    outputs = {
        name: Predictor.load(entry, device="cpu", backend=name).outputs(images) for name in ("onnx", "onnx-int8")
    }
    fp32 = outputs["onnx"]
    labels = fp32.logits.argmax(axis=1)
    fitted = ood.fit(fp32.features, labels, fp32.pixels, fp32.pixels, fp32.logits, fp32.features, components=1)
    # the feature distance of the validation image int8 moves most: a threshold between its two distances
    distances = {name: fitted.distance(out.features) for name, out in outputs.items()}
    i = int(np.argmax(np.abs(distances["onnx-int8"] - distances["onnx"])))
    assert distances["onnx-int8"][i] != distances["onnx"][i]
    lax = {"contrast": -1e9, "noise": 1e9, "colour": 1e30, "energy": 1e9}
    threshold = float((distances["onnx-int8"][i] + distances["onnx"][i]) / 2)
    save_gate(entry, ood.OODGate.from_arrays(fitted.arrays(), lax | {"distance": threshold}))

    measured = serving_choice.compare_on_validation(entry, FIXTURE_DATA, threads=1)
    served = {
        name: np.array(
            [p.out_of_distribution for p in Predictor.load(entry, device="cpu", backend=name).predict(images)]
        )
        for name in ("onnx", "onnx-int8")
    }
    for name, flagged in served.items():  # what the serving predictor of each graph refuses
        assert measured["ood_flagged"][name] == pytest.approx(flagged.mean())
    assert measured["ood_agreement"] == pytest.approx((served["onnx"] == served["onnx-int8"]).mean())
    assert served["onnx"][i] != served["onnx-int8"][i] and measured["ood_agreement"] <= 0.5
    assert serving_choice.decide_serving(measured, has_int8=True)["default_backend"] == "onnx"


def test_calibration_never_uses_held_out_images(tiny_entry: Path, tmp_path: Path) -> None:
    manifest = registry.read_manifest(_with_data_record(tiny_entry))
    split = quantize.training_split(manifest, FIXTURE_DATA)
    chosen = quantize.calibration_samples(split.train, 200, 7)
    held_out = {s.image_id for s in split.val + split.test}
    assert chosen and not {s.image_id for s in chosen} & held_out
    assert [s.image_id for s in chosen] == [s.image_id for s in quantize.calibration_samples(split.train, 200, 7)]
    assert len(quantize.calibration_samples(split.train, 3, 7)) == 3
    # round-robin over classes: the first picks cover every class the training split has
    first = quantize.calibration_samples(split.train, len({s.dx for s in split.train}), 7)
    assert {s.dx for s in first} == {s.dx for s in split.train}
    # another data set is refused rather than calibrated on (its "training" images could be anyone's)
    other = tmp_path / "other"
    other.mkdir()
    lines = (FIXTURE_DATA / "metadata.csv").read_text().splitlines()
    (other / "metadata.csv").write_text("\n".join(lines[:4]) + "\n")
    for line in lines[1:4]:
        name = line.split(",")[0] + ".jpg"
        (other / name).write_bytes((FIXTURE_DATA / name).read_bytes())
    with pytest.raises(export.ExportError, match="not the data this model was trained on"):
        quantize.training_split(manifest, other)


def test_evaluate_reports_each_backend(exported: Path, tmp_path: Path) -> None:
    figures = {}
    for backend in ("torch", "onnx", "onnx-int8"):
        out = tmp_path / backend
        args = ["--model", str(exported), "--data", str(FIXTURE_DATA), "--out", str(out), "--backend", backend]
        assert evaluate.main(args) == 0
        figures[backend] = json.loads((out / "metrics.json").read_text())
        assert figures[backend]["backend"] == backend
    assert figures["onnx"]["balanced_accuracy"] == pytest.approx(figures["torch"]["balanced_accuracy"])
    assert figures["onnx"]["confusion_matrix"] == figures["torch"]["confusion_matrix"]
