"""Post-hoc calibration: temperature scaling with a class-bias term, and expected calibration error.

The classifier is trained on class-rebalanced batches, so its raw softmax reflects a flattened
class mix as well as being over-confident. Fitting a temperature ``T`` and a per-class bias ``b``
on validation data by negative log-likelihood (Guo et al. 2017; the bias is the prior-shift
correction of Saerens et al. 2002) gives probabilities calibrated for the class mix of the data
they were fitted on.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import cast

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@functools.cache
def _bias(bias: tuple[float, ...]) -> np.ndarray:
    """A calibration's bias as a float64 array, made once (read-only: it is shared)."""
    array = np.asarray(bias, dtype=np.float64)
    array.flags.writeable = False
    return array


@dataclass(frozen=True, slots=True)
class Calibration:
    temperature: float = 1.0
    bias: tuple[float, ...] = field(default_factory=tuple)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """(N, C) logits -> (N, C) calibrated probabilities, float64, rows summing to 1."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.bias:
            z = z + _bias(self.bias)
        return softmax(z)

    def to_dict(self) -> dict[str, object]:
        return {"method": "temperature+bias", "temperature": self.temperature, "bias": list(self.bias)}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Calibration:
        bias = cast("list[float]", data.get("bias") or [])
        temperature = cast(float, data.get("temperature", 1.0))
        return cls(temperature=float(temperature), bias=tuple(float(b) for b in bias))


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    p = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def fit(logits: np.ndarray, labels: np.ndarray, *, with_bias: bool = True, iterations: int = 500) -> Calibration:
    """Fit ``T`` (and ``b``) minimising the NLL of ``labels`` under softmax(logits / T + b).

    Deterministic: full-batch L-BFGS in float64 on log T so the temperature stays positive.
    """
    import torch

    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=with_bias)
    params = [log_t, bias] if with_bias else [log_t]
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp() + bias, y)
        # A weak pull keeps the bias identifiable (softmax ignores a constant shift).
        loss = loss + 1e-4 * bias.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    centred = (bias - bias.mean()).detach().numpy()
    return Calibration(
        temperature=float(log_t.exp().item()),
        bias=tuple(float(b) for b in centred) if with_bias else (),
    )


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017)."""
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Per-bin count, mean confidence and accuracy, for the reliability diagram."""
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        n = int(in_bin.sum())
        out.append(
            {
                "lower": float(lo),
                "upper": float(hi),
                "count": n,
                "confidence": float(confidence[in_bin].mean()) if n else 0.0,
                "accuracy": float(correct[in_bin].mean()) if n else 0.0,
            }
        )
    return out
