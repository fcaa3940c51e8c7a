"""ml.backends.TorchBackend: it serves the float32 the entry's thresholds were fitted in, unless asked otherwise."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ml import ood
from ml.backends import TorchBackend, padded_batch
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
    logits, fmap, _ = backend.forward(batch, features=True)
    assert logits.dtype == np.float32 and fmap is not None and fmap.dtype == np.float32
    np.testing.assert_allclose(logits, plain_fp32_logits(backend.model, batch), rtol=0, atol=1e-6)


def test_fp32_ignores_an_autocast_region_around_the_call(batch: np.ndarray) -> None:
    backend = TorchBackend(tiny_model(TINY_ARCH), CPU)
    expected = plain_fp32_logits(backend.model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = backend.forward(batch).logits
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-6)


def test_bf16_only_when_asked_and_it_moves_the_logits(batch: np.ndarray) -> None:
    fp32 = TorchBackend(tiny_model(TINY_ARCH), CPU)
    bf16 = TorchBackend(tiny_model(TINY_ARCH), CPU, precision="bf16")
    assert bf16.precision == "bf16" and bf16.autocast_dtype is torch.bfloat16
    assert TorchBackend(tiny_model(TINY_ARCH), CPU, precision="fp16").autocast_dtype is torch.float16
    reduced = bf16.forward(batch).logits
    exact = fp32.forward(batch).logits
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


def test_padded_batches_are_powers_of_two() -> None:
    assert [padded_batch(n) for n in (1, 2, 3, 4, 5, 8, 9, 200)] == [1, 2, 4, 4, 8, 8, 16, 256]


def first_convolution(net: torch.nn.Module) -> torch.nn.Module:
    """The layer every pass starts with: its hooks fire where the model's own do not (the backend
    calls forward_features)."""
    return next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))


class Passes:
    """The batch sizes the model's passes ran at, and the threads they ran on (seen by the first
    convolution)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.sizes: list[int] = []
        self.threads: list[str] = []
        first_convolution(net).register_forward_pre_hook(self.seen)

    def seen(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.sizes.append(len(args[0]))
        self.threads.append(threading.current_thread().name)


def test_own_thread_runs_every_pass_on_one_thread_with_padded_batches_and_the_same_answers(batch: np.ndarray) -> None:
    # CUDA's default: cuDNN's per-shape plans are cached per thread, so one warm-up must serve every caller
    inline = TorchBackend(tiny_model(TINY_ARCH), CPU)
    net = tiny_model(TINY_ARCH)
    passes = Passes(net)
    own = TorchBackend(net, CPU, own_thread=True)
    assert inline.batch_shape(3) == 3 and own.batch_shape(3) == 4

    logits, fmap, _ = own.forward(batch, features=True)
    callers = []
    for _ in range(2):  # from two other threads too
        caller = threading.Thread(target=lambda: callers.append(own.forward(batch[:1]).logits))
        caller.start()
        caller.join()

    assert passes.sizes == [4, 1, 1]  # three images ran as four; one as one
    assert len(set(passes.threads)) == 1 and passes.threads[0].startswith("dermq-torch")
    expected, expected_fmap, _ = inline.forward(batch, features=True)
    assert logits.shape == expected.shape and fmap is not None and expected_fmap is not None
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)  # the padding changes no image's answer
    np.testing.assert_allclose(fmap, expected_fmap, rtol=0, atol=1e-5)
    for answer in callers:
        np.testing.assert_allclose(answer, expected[:1], rtol=0, atol=1e-5)


def test_own_thread_pads_a_mirrored_batch_too(batch: np.ndarray) -> None:
    # test-time flips double the padded batch: each image's mean over itself and its mirror is kept
    inline = TorchBackend(tiny_model(TINY_ARCH), CPU)
    net = tiny_model(TINY_ARCH)
    passes = Passes(net)
    logits, fmap, _ = TorchBackend(net, CPU, own_thread=True).forward(batch, features=True, hflip=True)
    expected, expected_fmap, _ = inline.forward(batch, features=True, hflip=True)
    assert passes.sizes == [8]  # three images and their mirrors, padded to four and four
    assert fmap is not None and expected_fmap is not None and fmap.shape == expected_fmap.shape
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fmap, expected_fmap, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hflip", [False, True])
def test_pooled_features_are_the_original_images_map_averaged_on_every_path(batch: np.ndarray, hflip: bool) -> None:
    """What the gate reads: each image's own feature map averaged (float64, as the gate was fitted),
    from a padded pass on the backend's own thread as inline, with and without mirrored copies."""
    net = tiny_model(TINY_ARCH)
    for backend in (TorchBackend(net, CPU), TorchBackend(net, CPU, own_thread=True)):
        out = backend.forward(batch, pooled=True, hflip=hflip)
        assert out.features is None and out.pooled is not None and out.pooled.dtype == np.float64
        fmap = backend.forward(batch, features=True).features
        assert fmap is not None and out.pooled.shape == fmap.shape[:2] == (3, fmap.shape[1])
        np.testing.assert_allclose(out.pooled, ood.pooled(fmap), rtol=0, atol=1e-6)
    assert TorchBackend(net, CPU).forward(batch).pooled is None  # only when asked for


def test_own_thread_hands_errors_back_to_the_caller(batch: np.ndarray) -> None:
    net = tiny_model(TINY_ARCH)

    def refuse(*_: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    first_convolution(net).register_forward_pre_hook(refuse)
    with pytest.raises(torch.OutOfMemoryError):  # what the worker's fallback to the CPU catches
        TorchBackend(net, CPU, own_thread=True).forward(batch)


def test_warm_up_runs_each_padded_batch_shape_once() -> None:
    net = tiny_model(TINY_ARCH)
    predictor = Predictor(TorchBackend(net, CPU, own_thread=True), tiny_prep(net), DecisionPolicy())
    passes = Passes(net)
    predictor.warm_up(rounds=1, batch_sizes=range(1, 9))
    assert passes.sizes == [
        1,
        2,
        4,
        8,
    ]  # a case at batch 1 (classification; its heat map reuses the features), then 2, 4, 8
