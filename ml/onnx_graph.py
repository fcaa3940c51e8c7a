"""The float32 ONNX graph of a registry entry's model: export and check.

The graph is ``input`` (N, 3, H, W) -> ``logits`` (N, C) and ``features`` (N, K, h, w), i.e.
``forward_head(forward_features(x))`` and the feature map itself, with a dynamic batch axis. It is
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

from ml import backends
from ml.model import Preprocessing

OPSET = 18
EXPORT_ATOL = 1e-4


class ExportError(RuntimeError):
    """The model cannot be exported (or the export does not reproduce it)."""


class _WithFeatures(nn.Module):
    """``x`` -> (logits, last feature map): the two outputs the ONNX backends read."""

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


def export_fp32(model: nn.Module, prep: Preprocessing, path: Path, *, opset: int = OPSET) -> None:
    """Write ``model`` (float32, eval) as a single-file ONNX graph ``input`` -> ``logits``, ``features``."""
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


def check_fp32(model: nn.Module, onnx_bytes: bytes, batch_nhwc: np.ndarray) -> float:
    """Largest |logit| difference between ONNX Runtime and torch on ``batch_nhwc``; raises past 1e-4."""
    session = backends.create_session(onnx_bytes)
    x = np.ascontiguousarray(batch_nhwc.transpose(0, 3, 1, 2))
    with torch.inference_mode():
        expected, fmap = (t.numpy() for t in _WithFeatures(model)(torch.from_numpy(x)))
    logits, features = session.run(list(backends.OUTPUTS), {backends.INPUT: x})
    error = float(np.abs(logits - expected).max())
    if features.shape != fmap.shape or not error <= EXPORT_ATOL:
        raise ExportError(
            f"the ONNX graph does not reproduce the model: logits differ by {error:.2e} (limit {EXPORT_ATOL}), "
            f"feature map {features.shape} vs {fmap.shape}"
        )
    return error
