"""The graph's ``pooled`` output: the classifier's input, read by the out-of-distribution gate instead
of averaging the feature map again (ml.onnx_graph.with_pooled_output, ml.export --pooled-output)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from ml import backends, export, ood, registry
from ml.onnx_graph import ExportError, with_pooled_output
from ml.predictor import Predictor
from tests.ml.conftest import save_tiny_entry

SHIPPED = registry.REGISTRY_DIR / registry.DEFAULT_MODEL


def _without_pooled_output(entry: Path) -> None:
    """Make ``entry``'s graph one exported before graphs had the output: the classifier's input is an
    inner tensor again (named as the exporter named it), and the manifest records the new file."""
    model = onnx.load(str(entry / "model.onnx"))
    graph = model.graph
    kept = [output for output in graph.output if output.name != backends.POOLED]
    del graph.output[:]
    graph.output.extend(kept)
    for node in graph.node:
        node.input[:] = ["view" if name == backends.POOLED else name for name in node.input]
        node.output[:] = ["view" if name == backends.POOLED else name for name in node.output]
    (entry / "model.onnx").write_bytes(model.SerializeToString())
    record = registry.read_manifest(entry)["files"]["onnx_fp32"]
    kept_fields = {k: v for k, v in record.items() if k not in ("path", "sha256", "bytes", "pooled_output")}
    registry.record_file(entry, "onnx_fp32", "model.onnx", **{**kept_fields, "outputs": list(backends.OUTPUTS)})


@pytest.fixture(scope="module")
def older(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped entry whose graph has no pooled output."""
    entry = Path(shutil.copytree(SHIPPED, tmp_path_factory.mktemp("older") / SHIPPED.name))
    _without_pooled_output(entry)
    return entry


def _not_lesions() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [
        Image.new("RGB", (300, 225), (250, 250, 250)),
        Image.fromarray(rng.integers(0, 256, (225, 300, 3), dtype=np.uint8)),
        Image.new("RGB", (300, 225), (20, 60, 200)),
    ]


def test_an_export_outputs_the_classifiers_input_as_the_pooled_features(tmp_path: Path) -> None:
    entry = save_tiny_entry(tmp_path / "tiny-pooled")
    export.export_entry(entry)
    record = registry.read_manifest(entry)["files"]["onnx_fp32"]
    assert record["outputs"] == ["logits", "features", "pooled"]
    predictor = Predictor.load(entry, device="cpu", backend="onnx")
    backend = predictor.backend
    assert isinstance(backend, backends.OnnxBackend) and backend.pools
    batch = np.random.default_rng(1).standard_normal((3, *predictor.prep.input_size, 3)).astype(np.float32)
    out = backend.forward(batch, features=True, pooled=True)
    assert out.pooled is not None and out.features is not None and out.pooled.shape == out.features.shape[:2]
    np.testing.assert_allclose(out.pooled, ood.pooled(out.features), rtol=1e-5, atol=1e-6)


def test_a_mirrored_pass_gives_the_original_images_pooled_features(tmp_path: Path) -> None:
    """With test-time flips the graph runs each image and its mirror: the logits are their mean, the
    pooled features the original's alone."""
    entry = save_tiny_entry(tmp_path / "tiny-hflip", tta="hflip")
    export.export_entry(entry)
    predictor = Predictor.load(entry, device="cpu", backend="onnx")
    backend = predictor.backend
    assert isinstance(backend, backends.OnnxBackend) and backend.pools and predictor.tta == "hflip"
    batch = np.random.default_rng(3).standard_normal((3, *predictor.prep.input_size, 3)).astype(np.float32)
    mirrored = backend.forward(batch, features=True, pooled=True, hflip=True)
    plain = backend.forward(batch, features=True, pooled=True)
    mirror = backend.forward(np.ascontiguousarray(batch[:, :, ::-1]), pooled=True)
    assert mirrored.pooled is not None and plain.pooled is not None and mirror.pooled is not None
    assert mirrored.pooled.shape == (3, plain.pooled.shape[1])
    np.testing.assert_allclose(mirrored.pooled, plain.pooled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mirrored.features, plain.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mirrored.logits, (plain.logits + mirror.logits) / 2, rtol=1e-5, atol=1e-5)
    assert not np.allclose(mirror.pooled, plain.pooled, rtol=1e-3)  # the mirror's features are others


@pytest.mark.parametrize(
    ("outputs", "refused"),
    [
        (["logits", "features", "pooled"], None),
        (["logits", "features"], None),
        (["logits", "features", "pooled", "other"], "returns"),
        (["logits", "pooled"], "returns"),
    ],
)
def test_a_graph_must_output_the_logits_and_map_and_may_output_the_pooled_features(
    tmp_path: Path, outputs: list[str], refused: str | None
) -> None:
    model = onnx.load(str(SHIPPED / "model.onnx"))
    graph = model.graph
    if "other" in outputs:
        graph.output.append(onnx.helper.make_tensor_value_info("mean", onnx.TensorProto.FLOAT, None))
    kept = [output for output in graph.output if output.name in outputs or output.name == "mean"]
    del graph.output[:]
    graph.output.extend(kept)
    weight = Predictor.load(SHIPPED, device="cpu", backend="onnx").cam_weight
    assert weight is not None
    session = backends.create_session(model.SerializeToString(), 1)
    if refused is None:
        backends.check_graph(session, weight)
    else:
        with pytest.raises(registry.RegistryError, match=refused):
            backends.check_graph(session, weight)


def test_a_pooled_output_that_is_not_the_classifiers_input_is_refused() -> None:
    """A graph naming the global average before its reshape, (N, K, 1, 1), as the pooled features
    would feed the gate arrays it cannot read: refused at load, not on the first case."""
    model = onnx.load(str(SHIPPED / "model.onnx"))
    graph = model.graph
    renamed = {backends.POOLED: "view", "mean": backends.POOLED}
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    weight = Predictor.load(SHIPPED, device="cpu", backend="onnx").cam_weight
    assert weight is not None
    session = backends.create_session(model.SerializeToString(), 1)
    assert next(o.shape for o in session.get_outputs() if o.name == backends.POOLED)[1:] == [1280, 1, 1]
    with pytest.raises(registry.RegistryError, match="not \\(N, 1280\\)"):
        backends.check_graph(session, weight)


def test_the_shipped_graph_gives_the_gate_its_pooled_features_and_the_same_answers(
    older: Path, fixture_pil: list[Image.Image]
) -> None:
    """Serving reads the graph's own average (float32) where the gate was fitted on NumPy's (float64):
    the same decisions and gate reasons, every distance within float32 rounding."""
    shipped = Predictor.load(SHIPPED, device="cpu", backend="onnx")
    before = Predictor.load(older, device="cpu", backend="onnx")
    assert isinstance(shipped.backend, backends.OnnxBackend) and shipped.backend.pools
    assert isinstance(before.backend, backends.OnnxBackend) and not before.backend.pools
    assert shipped.backend.output_names(pooled=True) == ["logits", "pooled"]  # no feature map copied out
    assert before.backend.output_names(pooled=True) == ["logits", "features"]
    images = [*fixture_pil, *_not_lesions()]
    assert shipped.predict(images) == before.predict(images)
    assert [a.prediction for a in shipped.classify(images)] == [a.prediction for a in before.classify(images)]
    assert all(shipped.predict(images[len(fixture_pil) :])[i].ood_reasons for i in range(3))
    gate = shipped.gate
    assert gate is not None
    graph, numpy = shipped.outputs(images).features, before.outputs(images).features
    np.testing.assert_allclose(gate.distance(graph), gate.distance(numpy), rtol=1e-6)


def test_the_upgrade_adds_the_output_in_place_with_the_same_numbers(
    older: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = Path(shutil.copytree(older, tmp_path / older.name))
    old_sha = registry.read_manifest(entry)["files"]["onnx_fp32"]["sha256"]
    assert export.main(["--model", str(entry), "--pooled-output"]) == 0
    printed = json.loads(capsys.readouterr().out)  # the CLI prints the graph's new record
    record = registry.read_manifest(entry)["files"]["onnx_fp32"]
    assert record["sha256"] == registry.sha256_file(entry / "model.onnx") != old_sha
    assert printed == record and record["outputs"] == ["logits", "features", "pooled"]
    assert old_sha in record["pooled_output"]
    assert record["max_logit_error"] == registry.read_manifest(older)["files"]["onnx_fp32"]["max_logit_error"]
    upgraded = Predictor.load(entry, device="cpu", backend="onnx").backend
    plain = Predictor.load(older, device="cpu", backend="onnx").backend
    assert isinstance(upgraded, backends.OnnxBackend) and upgraded.pools
    batch = np.random.default_rng(2).standard_normal((2, 168, 224, 3)).astype(np.float32)
    new, old = upgraded.forward(batch, features=True), plain.forward(batch, features=True)
    assert np.array_equal(new.logits, old.logits) and np.array_equal(new.features, old.features)
    # a second run finds the output there and leaves the file as it is
    assert export.main(["--model", str(entry), "--pooled-output"]) == 0
    assert registry.read_manifest(entry)["files"]["onnx_fp32"] == record


def test_a_graph_whose_classifier_is_not_found_gets_no_pooled_output(tmp_path: Path) -> None:
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["features"]), helper.make_node("Identity", ["features"], ["logits"])],
        "no-classifier",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 7])],
        [
            helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 7]),
            helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["batch", 7]),
        ],
    )
    with pytest.raises(ExportError, match="classifier"):
        with_pooled_output(helper.make_model(graph).SerializeToString())
