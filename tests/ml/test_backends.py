"""ml.backends.TorchBackend: it serves the float32 the entry's thresholds were fitted in, unless asked otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.backends import TorchBackend
from ml.decision import DecisionPolicy
from ml.predictor import Predictor
from tests.ml.conftest import TINY_ARCH, TINY_SIZE, tiny_model, tiny_prep

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """(3, H, W, 3) float32, as the predictor's preprocessing hands it over."""
    return np.random.default_rng(0).standard_normal((3, *TINY_SIZE, 3)).astype(np.float32)


def plain_fp32_logits(net: torch.nn.Module, batch_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(batch_nhwc).permute(0, 3, 1, 2)).numpy()


def test_default_is_fp32_with_autocast_off(batch: np.ndarray) -> None:
    backend = TorchBackend(tiny_model(TINY_ARCH), CPU)
    assert backend.precision == "fp32" and backend.autocast_dtype is None
    logits, fmap = backend.forward(batch, features=True)
    assert logits.dtype == np.float32 and fmap is not None and fmap.dtype == np.float32
    np.testing.assert_allclose(logits, plain_fp32_logits(backend.model, batch), rtol=0, atol=1e-6)


def test_fp32_ignores_an_autocast_region_around_the_call(batch: np.ndarray) -> None:
    backend = TorchBackend(tiny_model(TINY_ARCH), CPU)
    expected = plain_fp32_logits(backend.model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = backend.forward(batch)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-6)


def test_bf16_only_when_asked_and_it_moves_the_logits(batch: np.ndarray) -> None:
    fp32 = TorchBackend(tiny_model(TINY_ARCH), CPU)
    bf16 = TorchBackend(tiny_model(TINY_ARCH), CPU, precision="bf16")
    assert bf16.precision == "bf16" and bf16.autocast_dtype is torch.bfloat16
    assert TorchBackend(tiny_model(TINY_ARCH), CPU, precision="fp16").autocast_dtype is torch.float16
    reduced, _ = bf16.forward(batch)
    exact, _ = fp32.forward(batch)
    assert reduced.dtype == np.float32 and np.isfinite(reduced).all()
    assert not np.allclose(reduced, exact, rtol=0, atol=1e-6)  # autocast really ran in bfloat16
    np.testing.assert_allclose(reduced, exact, rtol=0, atol=0.05 * np.abs(exact).max())  # ...the same model


def test_precision_is_keyword_only_and_checked() -> None:
    net = tiny_model(TINY_ARCH)
    with pytest.raises(TypeError):
        TorchBackend(net, CPU, "bf16")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        TorchBackend(net, CPU, precision="int8")


def test_predictor_serves_fp32_by_default() -> None:
    net = tiny_model(TINY_ARCH)
    predictor = Predictor(net, tiny_prep(net), DecisionPolicy(), device="cpu")
    assert isinstance(predictor.backend, TorchBackend)
    assert predictor.backend.precision == "fp32" and predictor.backend.autocast_dtype is None
