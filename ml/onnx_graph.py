"""The float32 ONNX graph of a registry entry's model: export and check.

The graph is ``input`` (N, 3, H, W) -> ``logits`` (N, C), ``features`` (N, K, h, w) and ``pooled``
(N, K), i.e. ``forward_head(forward_features(x))``, the feature map itself and the classifier's
input (the map's global average, which the out-of-distribution gate reads), with a dynamic batch
axis. ``pooled`` is not a second computation: :func:`with_pooled_output` names the tensor the
classifier already reads as an output, so the graph computes what it did before. It is
written by torch's ``torch.export``-based exporter (``dynamo=True``, needs onnxscript): in torch 2.14
the TorchScript exporter is deprecated (it warns that it will be removed) and names the feature
map's axes wrongly, while the dynamo exporter gives the same numbers and clean shapes. The weights
are float16 on disk; the graph is float32, checked against torch on export (logits within 1e-4).

The ONNX backends compute the heat map from the feature map and the classifier weights (the one-pass
Grad-CAM), which is exact only for a global-average-pooling + linear head: :func:`classifier_key`
refuses other heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ml import backends, ood
from ml.model import Preprocessing

OPSET = 18
EXPORT_ATOL = 1e-4


class ExportError(RuntimeError):
    """The model cannot be exported (or the export does not reproduce it)."""


class _WithFeatures(nn.Module):
    """``x`` -> (logits, last feature map): what the exporter writes; :func:`with_pooled_output`
    then names the classifier's input as the third output the ONNX backends read."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # a timm model: forward_features / forward_head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.model.forward_features(x)
        return self.model.forward_head(fmap), fmap


def classifier_key(model: nn.Module) -> str:
    """The state-dict key of the classifier weight whose rows make the one-pass Grad-CAM.

    Raises :class:`ExportError` unless the head is global average pooling + one linear layer.
    """
    from ml.gradcam import linear_gap_head

    if linear_gap_head(model) is None:
        raise ExportError(
            f"{type(model).__name__}'s head is not global average pooling + one linear layer, so its heat map "
            "cannot be computed from the feature map alone; the ONNX backends need that. Serve this model with "
            "backend='torch' (gradient Grad-CAM)"
        )
    classifier = model.get_classifier()  # type: ignore[operator]  # timm's, checked by linear_gap_head
    name = next(n for n, m in model.named_modules() if m is classifier)
    return f"{name}.weight" if name else "weight"


def with_pooled_output(onnx_bytes: bytes) -> bytes:
    """The graph ``onnx_bytes`` with the classifier's input also an output, named ``pooled``.

    The classifier is the node that writes ``logits``: a ``Gemm`` (or a ``MatMul`` and an ``Add``)
    whose first input is the pooled features, after the ``ReduceMean`` and ``Reshape`` of the global
    average. That tensor is renamed and listed among the outputs: no node is added or changed
    otherwise, so the graph's logits and feature map are the same, to the bit. A graph that already
    has the output is returned as it is. Raises :class:`ExportError` for a graph whose classifier is
    not found that way; :func:`check_fp32` then checks that the output is the feature map's mean."""
    import onnx

    graph_model = onnx.load_model_from_string(onnx_bytes)
    graph = graph_model.graph
    if any(output.name == backends.POOLED for output in graph.output):
        return onnx_bytes
    writers = {name: node for node in graph.node for name in node.output}
    head = writers.get(backends.OUTPUTS[0])
    if head is not None and head.op_type == "Add":  # MatMul + Add: the product's writer reads the features
        products = [writers[name] for name in head.input if name in writers and writers[name].op_type == "MatMul"]
        head = products[0] if products else None
    if head is None or head.op_type not in ("Gemm", "MatMul") or head.input[0] not in writers:
        raise ExportError("the ONNX graph's classifier (the Gemm or MatMul before the logits) was not found")
    source = head.input[0]
    weights = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    # the features' width, where the classifier's weight says it: (C, K) for a Gemm that transposes
    # it (PyTorch's Linear), (K, C) otherwise
    transposed = any(a.name == "transB" and a.i == 1 for a in head.attribute)
    shape = weights.get(head.input[1]) if len(head.input) > 1 else None
    width = (shape[1] if transposed else shape[0]) if shape is not None and len(shape) == 2 else None
    for node in graph.node:
        node.input[:] = [backends.POOLED if name == source else name for name in node.input]
        node.output[:] = [backends.POOLED if name == source else name for name in node.output]
    for info in graph.value_info:
        if info.name == source:
            info.name = backends.POOLED
    graph.output.append(onnx.helper.make_tensor_value_info(backends.POOLED, onnx.TensorProto.FLOAT, ["batch", width]))
    return graph_model.SerializeToString()


def export_fp32(model: nn.Module, prep: Preprocessing, path: Path, *, opset: int = OPSET) -> None:
    """Write ``model`` (float32, eval) as a single-file ONNX graph ``input`` -> ``logits``,
    ``features``, ``pooled``."""
    model = model.float().eval().to(memory_format=torch.contiguous_format)
    height, width = prep.input_size
    example = torch.zeros(2, 3, height, width)
    program = torch.onnx.export(
        _WithFeatures(model).eval(),
        (example,),
        input_names=[backends.INPUT],
        output_names=list(backends.OUTPUTS),
        opset_version=opset,
        dynamo=True,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
        external_data=False,
        verbose=False,
    )
    if program is None:  # pragma: no cover - the dynamo exporter always returns its program
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)
    path.write_bytes(with_pooled_output(path.read_bytes()))


def check_fp32(model: nn.Module, onnx_bytes: bytes, batch_nhwc: np.ndarray) -> float:
    """Largest |logit| difference between ONNX Runtime and torch on ``batch_nhwc``; raises past 1e-4,
    or where the graph's pooled output is not its feature map's mean (within float32 rounding)."""
    session = backends.create_session(onnx_bytes)
    x = np.ascontiguousarray(batch_nhwc.transpose(0, 3, 1, 2))
    with torch.inference_mode():
        expected, fmap = (t.numpy() for t in _WithFeatures(model)(torch.from_numpy(x)))
    logits, features, pooled = session.run([*backends.OUTPUTS, backends.POOLED], {backends.INPUT: x})
    error = float(np.abs(logits - expected).max())
    if features.shape != fmap.shape or not error <= EXPORT_ATOL:
        raise ExportError(
            f"the ONNX graph does not reproduce the model: logits differ by {error:.2e} (limit {EXPORT_ATOL}), "
            f"feature map {features.shape} vs {fmap.shape}"
        )
    check_pooled(features, pooled)
    return error


def check_pooled(features: np.ndarray, pooled: np.ndarray) -> None:
    """:class:`ExportError` unless the graph's ``pooled`` output is the mean of its feature map."""
    mean = ood.pooled(features)
    if pooled.shape != mean.shape or not np.allclose(pooled, mean, rtol=1e-5, atol=1e-6):
        raise ExportError(
            f"the ONNX graph's {backends.POOLED!r} output {pooled.shape} is not its feature map's mean {mean.shape}"
        )
