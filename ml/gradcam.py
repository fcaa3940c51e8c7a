"""Grad-CAM heat maps (Selvaraju et al. 2017): the one-pass exact form and the general hook form.

Where the classifier head is global average pooling followed by a linear layer (timm's
EfficientNets and ResNets), the gradient of class ``c``'s logit with respect to the last feature
map ``A`` (K x h x w) is ``W[c] / (h * w)`` at every position, so Grad-CAM at that layer is exactly
``ReLU(sum_k W[c, k] * A_k)`` up to a positive scale, which min-max normalisation removes. That map
needs no backward pass: it comes from the same forward pass as the classification
(:func:`class_activation_map`). :func:`linear_gap_head` checks, once at load time, that a model's
head really is of that form. Any other head uses :class:`GradCAM`, which takes gradients through
autograd with hooks that are always released.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn


def normalise(cam: np.ndarray) -> np.ndarray:
    """(h, w) -> (h, w) float32 in [0, 1]; an all-zero map stays zero."""
    cam = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    top = float(cam.max()) if cam.size else 0.0
    return cam / top if top > 0 else np.zeros_like(cam)


def class_activation_map(features: np.ndarray, weight: np.ndarray, class_index: int) -> np.ndarray:
    """One-pass Grad-CAM. ``features`` (K, h, w) float, ``weight`` (C, K) -> (h, w) float32 in [0, 1]."""
    cam = np.tensordot(np.asarray(weight[class_index], dtype=np.float32), np.asarray(features, dtype=np.float32), 1)
    return normalise(cam)


def linear_gap_head(model: nn.Module) -> tuple[np.ndarray, np.ndarray] | None:
    """The classifier's (weight (C, K), bias (C,)) if the head is average pooling + one linear layer.

    Checked both structurally and numerically (``forward_head`` must equal the linear layer applied
    to the spatial mean of a random feature map), so a model with extra layers in its head falls
    back to hook-based Grad-CAM instead of getting a wrong map.
    """
    timm_model: Any = model  # timm's get_classifier / forward_head, which nn.Module does not declare
    classifier = timm_model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear) or not hasattr(model, "forward_head"):
        return None
    channels = classifier.in_features
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probe = torch.randn(2, channels, 5, 4, generator=torch.Generator().manual_seed(0))
            probe = probe.to(classifier.weight.device, classifier.weight.dtype)
            expected = classifier(probe.mean(dim=(2, 3)))
            actual = timm_model.forward_head(probe)
    except Exception:
        return None
    finally:
        model.train(was_training)
    if actual.shape != expected.shape or not torch.allclose(actual, expected, atol=1e-4, rtol=1e-4):
        return None
    weight = classifier.weight.detach().float().cpu().numpy()
    bias = classifier.bias.detach().float().cpu().numpy() if classifier.bias is not None else np.zeros(len(weight))
    return weight, bias


class GradCAM:
    """Gradient-weighted class activation maps for any timm classifier.

    With ``target_layer=None`` the map is taken at the output of ``forward_features`` (the last
    feature map, before pooling), with gradients from :func:`torch.autograd.grad`: no hooks at all.
    A named ``target_layer`` uses a forward hook plus a tensor hook on that layer's output; both are
    removed in ``finally`` whatever happens, so no call leaves state behind.
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None) -> None:
        self.model = model
        self.target_layer = target_layer

    def __call__(self, x: torch.Tensor, class_index: int | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """``x`` (1, 3, H, W) float -> (map (h, w) float32 in [0, 1], logits (1, C) detached).

        ``class_index`` defaults to the top logit. Runs with gradients enabled even when called
        inside ``torch.inference_mode()`` or ``no_grad()``.
        """
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"GradCAM takes one image shaped (1, 3, H, W), not {tuple(x.shape)}")
        self.model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone().requires_grad_(False)
            if self.target_layer is None:
                timm_model: Any = self.model
                activation = timm_model.forward_features(x)
                logits = timm_model.forward_head(activation)
                index = int(logits[0].argmax()) if class_index is None else class_index
                (gradient,) = torch.autograd.grad(logits[0, index], activation)
            else:
                with self._capture(self.target_layer) as captured:
                    logits = self.model(x)
                    index = int(logits[0].argmax()) if class_index is None else class_index
                    logits[0, index].backward()
                activation, gradient = captured["activation"], captured["gradient"]
        weights = gradient[0].float().mean(dim=(1, 2))
        cam = torch.einsum("k,khw->hw", weights, activation[0].detach().float())
        return normalise(cam.cpu().numpy()), logits.detach()

    @contextmanager
    def _capture(self, name: str) -> Iterator[dict[str, torch.Tensor]]:
        module = dict(self.model.named_modules()).get(name)
        if module is None:
            raise ValueError(f"the model has no layer named {name!r}")
        captured: dict[str, torch.Tensor] = {}
        tensor_hooks = []

        def on_forward(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            captured["activation"] = output

            def on_gradient(grad: torch.Tensor) -> None:
                captured["gradient"] = grad

            tensor_hooks.append(output.register_hook(on_gradient))

        handle = module.register_forward_hook(on_forward)
        try:
            yield captured
        finally:
            handle.remove()
            for hook in tensor_hooks:
                hook.remove()
        if "gradient" not in captured:
            raise RuntimeError(f"layer {name!r} received no gradient; it does not feed the chosen class")
