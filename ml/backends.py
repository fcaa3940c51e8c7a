"""The engines behind :class:`ml.predictor.Predictor`: torch, and ONNX Runtime in fp32 or static int8.

Every backend does one thing: a batch of preprocessed images (N, H, W, 3) float32 in, logits (N, C)
float32 out, plus on request the last feature map (N, K, h, w) float32 that the one-pass Grad-CAM
reads and the pooled features (N, K) that the out-of-distribution gate reads (:class:`Pass`).
Preprocessing, decisions and heat maps stay in the predictor, shared by all of them.

- ``torch``: channels-last, ``inference_mode``, float32 on every device by default; hook-based
  Grad-CAM for heads where the one-pass map does not hold. The calibration, decision thresholds,
  known answer and ONNX export of an entry were all fitted in float32 on the CPU, and bfloat16
  autocast moved 1.4% of labels, so reduced precision is served only when a caller asks for it
  (``precision="bf16"`` or ``"fp16"``, accepting that the thresholds no longer match exactly). In
  float32 autocast is switched off explicitly, so an autocast region around the call does not leak
  in. One caveat on CUDA: PyTorch lets cuDNN convolutions use TF32 unless
  ``torch.backends.cudnn.allow_tf32`` is False; that flag is process-wide, so loading a model leaves
  it alone and the process that owns its torch turns TF32 off once, after any fork
  (:func:`float32_on_cuda`: ``ml.evaluate`` and the GPU benchmarks; the worker sets the same flag
  when it loads a model on a GPU, ``worker.runtime.load_predictor``).
- ``onnx`` / ``onnx-int8``: ``model.onnx`` / ``model.int8.onnx`` written by :mod:`ml.export`, on
  the CPU. Both files are listed in the manifest with their SHA-256 and are only ever parsed from
  the verified bytes. Their graphs output ``logits`` and ``features``, and graphs exported since the
  forty-first session also ``pooled``, the classifier's own input (the feature map's average, which
  the out-of-distribution gate reads: taken from the graph it costs nothing, where averaging the
  map again in NumPy took 0.13 ms of a case); the classifier weights for the heat map come from the
  verified safetensors file the graph was exported from.

Which of them serves an entry on this machine is :mod:`ml.backend_choice`'s answer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn

from ml import ood, registry
from ml.backend_choice import BACKENDS as BACKENDS  # the names, where choosing one needs no torch
from ml.backend_choice import ONNX_FILES as ONNX_FILES
from ml.gradcam import GradCAM, linear_gap_head

INPUT = "input"  # (N, 3, H, W) float32, normalised
OUTPUTS = ("logits", "features")  # (N, C) and (N, K, h, w)
#: the optional third output of a graph: (N, K) float32, the classifier's input (the map's average)
POOLED = "pooled"
DEFAULT_THREADS = 2
#: TorchBackend precision -> autocast dtype (None: plain float32, autocast off).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def float32_on_cuda() -> None:
    """Run this process's CUDA convolutions and matrix products in IEEE float32, not TF32 (cuDNN's
    default lets float32 convolutions round their inputs to TF32's 10-bit mantissa on Ampere and
    later): the precision every entry's thresholds were fitted and its figures measured in.
    Process-wide; touches no device, so it is safe before a fork and harmless without a GPU."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU. Call only after any fork."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Pass(NamedTuple):
    """What one forward pass gives for N images: what the caller asked :meth:`Backend.forward` for."""

    logits: np.ndarray  # (N, C) float32
    features: np.ndarray | None  # (N, K, h, w) float32 last feature map, when asked for
    #: (N, K) pooled features, when asked for: the graph's own float32 average where the graph
    #: outputs it, else :func:`ml.ood.pooled` of the feature map (summed in float64)
    pooled: np.ndarray | None


class Backend(Protocol):
    @property
    def name(self) -> str:
        """``torch``, ``onnx`` or ``onnx-int8``."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def cam_weight(self) -> np.ndarray | None:
        """The classifier's (C, K) weight when the head is average pooling + linear (one-pass CAM), else None."""
        ...

    def forward(
        self, batch_nhwc: np.ndarray, *, features: bool = False, pooled: bool = False, hflip: bool = False
    ) -> Pass:
        """(N, H, W, 3) float32 -> the logits, and the feature map and pooled features if asked for.

        With ``hflip`` the logits are the mean over the image and its mirror; the feature map and
        pooled features are always the original image's.
        """
        ...

    def gradcam(self, batch_nhwc: np.ndarray, class_index: int) -> np.ndarray:
        """(1, H, W, 3) -> (h, w) float32 in [0, 1] by gradients, for heads without the one-pass map."""
        ...

    def batch_shape(self, size: int) -> int:
        """The batch size a pass over ``size`` images runs at (larger where the backend pads)."""
        ...


def _same_gpu(device: torch.device) -> Callable[[], None] | None:
    """For a backend's own thread: select the GPU that ``device`` means on the creating thread (a
    bare ``cuda`` is that thread's current device, which a new thread does not inherit)."""
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    return functools.partial(torch.cuda.set_device, index)


def padded_batch(size: int) -> int:
    """The power of two at or above ``size``: the batch sizes a CUDA pass runs at."""
    return 1 << max(0, size - 1).bit_length()


class TorchBackend:
    """A timm model in channels-last layout on ``device``, run in ``precision``.

    ``precision`` is ``fp32`` (the default, on CUDA too: what the entry's thresholds were fitted on),
    or ``bf16`` / ``fp16`` autocast when explicitly requested. Grad-CAM's gradient path is float32
    whatever the precision.

    With ``own_thread`` (the default on CUDA) every pass runs on one thread of the backend's own and
    a batch is padded to a power of two. cuDNN builds its execution plans for each input shape on
    first use, about 1.8 s per shape for this model on an H200, and PyTorch caches them per thread
    (docs/PERFORMANCE.md, "GPU"). A warm-up on any thread then serves every later pass, whichever
    thread asks (a worker child warms up on its preload thread and classifies on its main thread),
    and a batcher's sizes up to 2**k need k + 1 warm shapes, not 2**k. Like CUDA itself, a backend
    with its own thread is made after any fork, in the process that uses it (a forked child would
    inherit the executor without its thread).
    """

    name = "torch"

    def __init__(
        self, model: nn.Module, device: torch.device, *, precision: str = "fp32", own_thread: bool | None = None
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.device = device
        if own_thread is None:
            own_thread = device.type == "cuda"
        self._thread = (
            ThreadPoolExecutor(1, thread_name_prefix="dermq-torch", initializer=_same_gpu(device))
            if own_thread
            else None
        )
        self.precision = precision
        #: the autocast dtype of :meth:`forward`; None for float32 with autocast off
        self.autocast_dtype = PRECISIONS[precision]
        self.model = model.eval().to(device).to(memory_format=torch.channels_last)
        head = linear_gap_head(self.model)
        self.cam_weight = head[0] if head is not None else None
        self._gradcam = GradCAM(self.model)

    def to_device(self, batch_nhwc: np.ndarray) -> torch.Tensor:
        # The model is channels-last; preprocessing's NHWC arrays usually lie channels-first in memory
        # (the layout the ONNX graphs read, ml.preprocess.normalize), so this is one copy on the CPU.
        x = torch.from_numpy(batch_nhwc).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True)

    def batch_shape(self, size: int) -> int:
        return padded_batch(size) if self._thread is not None else size

    def forward(
        self, batch_nhwc: np.ndarray, *, features: bool = False, pooled: bool = False, hflip: bool = False
    ) -> Pass:
        size = len(batch_nhwc)
        if self._thread is None:
            logits, fmap = self._forward(batch_nhwc, features=features or pooled, hflip=hflip)
        else:
            padding = self.batch_shape(size) - size
            if padding:  # zeros: in eval mode every image's outputs are its own
                batch_nhwc = np.concatenate([batch_nhwc, np.zeros((padding, *batch_nhwc.shape[1:]), batch_nhwc.dtype)])
            task = self._thread.submit(self._forward, batch_nhwc, features=features or pooled, hflip=hflip)
            logits, fmap = task.result()
            logits, fmap = logits[:size], None if fmap is None else fmap[:size]
        # the pooled features as the gate was fitted on them (ml.finalize serves this backend)
        return Pass(logits, fmap if features else None, ood.pooled(fmap) if pooled and fmap is not None else None)

    def _forward(self, batch_nhwc: np.ndarray, *, features: bool, hflip: bool) -> tuple[np.ndarray, np.ndarray | None]:
        x = self.to_device(batch_nhwc)
        dtype = self.autocast_dtype
        # enabled=False for float32 also switches off any autocast region the caller is in.
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            if hflip:
                x = torch.cat([x, x.flip(3)])
            timm_model: Any = self.model  # forward_features / forward_head: timm's, not nn.Module's
            fmap = timm_model.forward_features(x)
            logits = timm_model.forward_head(fmap).float()
            if hflip:
                n = len(batch_nhwc)
                logits = (logits[:n] + logits[n:]) / 2
                fmap = fmap[:n]
            fmap_out = fmap.float().cpu().numpy() if features else None
            return logits.cpu().numpy(), fmap_out

    def gradcam(self, batch_nhwc: np.ndarray, class_index: int) -> np.ndarray:
        if self._thread is None:
            return self._gradcam_map(batch_nhwc, class_index)
        return self._thread.submit(self._gradcam_map, batch_nhwc, class_index).result()

    def _gradcam_map(self, batch_nhwc: np.ndarray, class_index: int) -> np.ndarray:
        return self._gradcam(self.to_device(batch_nhwc).float(), class_index)[0]


class OnnxBackend:
    """An ONNX Runtime session on the CPU over a graph with ``input`` -> ``logits``, ``features``
    (and ``pooled``, where the graph has it)."""

    device = torch.device("cpu")

    def __init__(self, session: Any, cam_weight: np.ndarray, *, name: str = "onnx") -> None:
        self.session = session
        self.cam_weight = cam_weight
        self.name = name
        #: whether the graph outputs the pooled features itself (graphs exported before it did not)
        self.pools = POOLED in {o.name for o in session.get_outputs()}

    @classmethod
    def from_bytes(
        cls,
        model: bytes,
        cam_weight: np.ndarray,
        *,
        name: str = "onnx",
        threads: int = DEFAULT_THREADS,
        input_size: tuple[int, int] | None = None,
    ) -> OnnxBackend:
        """A session over ``model`` (the ONNX file's verified bytes, never a path); ``input_size``:
        the (height, width) the predictor feeds it (:func:`check_input_size`)."""
        session = create_session(model, threads)
        check_graph(session, cam_weight)
        if input_size is not None:
            check_input_size(session, input_size)
        return cls(session, cam_weight, name=name)

    def output_names(self, *, features: bool = False, pooled: bool = False) -> list[str]:
        """The graph outputs a pass asks ONNX Runtime for: only those wanted (each one asked for is
        copied out: the feature map is 215 KB an image), the feature map too where the graph has no
        pooled output to give."""
        from_graph = pooled and self.pools
        return [
            OUTPUTS[0],
            *([OUTPUTS[1]] if features or (pooled and not from_graph) else []),
            *([POOLED] if from_graph else []),
        ]

    def forward(
        self, batch_nhwc: np.ndarray, *, features: bool = False, pooled: bool = False, hflip: bool = False
    ) -> Pass:
        n = len(batch_nhwc)
        x = np.ascontiguousarray(batch_nhwc.transpose(0, 3, 1, 2), dtype=np.float32)
        if hflip:
            x = np.concatenate([x, x[..., ::-1]])
        names = self.output_names(features=features, pooled=pooled)
        outputs = dict(zip(names, self.session.run(names, {INPUT: x}), strict=True))
        logits = outputs[OUTPUTS[0]]
        if hflip:
            logits = (logits[:n] + logits[n:]) / 2
        fmap = outputs[OUTPUTS[1]][:n] if OUTPUTS[1] in outputs else None
        if not pooled:
            means = None
        elif POOLED in outputs:
            means = outputs[POOLED][:n]
        else:
            assert fmap is not None
            means = ood.pooled(fmap)
        return Pass(logits.astype(np.float32, copy=False), fmap if features else None, means)

    def gradcam(self, batch_nhwc: np.ndarray, class_index: int) -> np.ndarray:
        raise NotImplementedError("ONNX backends compute heat maps from the feature map; they hold no gradients")

    def batch_shape(self, size: int) -> int:
        return size


def create_session(model: bytes, threads: int = DEFAULT_THREADS) -> Any:
    """A CPU session: ``threads`` intra-op threads, all graph optimisations, sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings would go to stderr with no context
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def check_graph(session: Any, cam_weight: np.ndarray) -> None:
    """Refuse a graph whose inputs and outputs are not what the predictor feeds and reads."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = {o.name: o.shape for o in session.get_outputs()}
    if inputs != [INPUT] or set(outputs) - {POOLED} != set(OUTPUTS):
        raise registry.RegistryError(
            f"the ONNX graph takes {inputs} and returns {sorted(outputs)}; dermq needs [{INPUT!r}] -> "
            f"{list(OUTPUTS)} (and optionally {POOLED!r}). Re-export it with python -m ml.export"
        )
    channels = outputs["features"][1] if len(outputs["features"]) == 4 else None
    if isinstance(channels, int) and channels != cam_weight.shape[1]:
        raise registry.RegistryError(
            f"the ONNX feature map has {channels} channels but the classifier reads {cam_weight.shape[1]}"
        )
    pooled = outputs.get(POOLED)  # the classifier's input: (N, K), K where the graph says it
    width = pooled[1] if pooled is not None and len(pooled) == 2 else None
    if pooled is not None and (len(pooled) != 2 or (isinstance(width, int) and width != cam_weight.shape[1])):
        raise registry.RegistryError(
            f"the ONNX graph's {POOLED!r} output is {pooled}, not (N, {cam_weight.shape[1]}): the classifier's input"
        )


def check_input_size(session: Any, input_size: tuple[int, int]) -> None:
    """Refuse a graph whose declared input is not (N, 3, H, W) at the manifest's ``input_size``
    (height, width): every image is resized to that size, so such a graph refuses every case (or, where
    its sizes are free, computes on an input it was not exported for). A named (free) size is let through."""
    shape = list(session.get_inputs()[0].shape)
    fixed = [(got, want) for got, want in zip(shape[1:], [3, *input_size], strict=False) if isinstance(got, int)]
    if len(shape) != 4 or any(got != want for got, want in fixed):
        height, width = input_size
        raise registry.RegistryError(
            f"the ONNX graph's input is {shape}, but the manifest's preprocessing feeds it (N, 3, {height}, "
            f"{width}): it was exported for another input size, or the manifest's input_size was edited. "
            "Restore the entry, or re-export the graph with python -m ml.export"
        )


def classifier_weight(entry: Path, manifest: dict[str, Any], key: str) -> np.ndarray:
    """(C, K) float32 classifier weight ``key`` from the entry's verified safetensors weights."""
    from safetensors.numpy import load as load_numpy

    data = registry.read_verified(entry, "weights", manifest=manifest)
    try:
        tensors = load_numpy(data)
    except Exception as exc:
        raise registry.RegistryError(f"{entry.name}: weights file does not parse as safetensors") from exc
    if key not in tensors or tensors[key].ndim != 2:
        raise registry.RegistryError(f"{entry.name}: the weights hold no 2-D classifier tensor {key!r}")
    return tensors[key].astype(np.float32)


def load_onnx(
    entry: Path,
    manifest: dict[str, Any],
    name: str,
    *,
    input_size: tuple[int, int],
    threads: int = DEFAULT_THREADS,
) -> OnnxBackend:
    """The ONNX backend ``name`` of a registry entry, from SHA-256-verified bytes; ``input_size``: the
    (height, width) of the manifest's preprocessing, which the graph's declared input must match.

    Raises :class:`ml.registry.IntegrityError` for a tampered file, and
    :class:`ml.registry.RegistryError` when the entry has no such file, it was exported from other
    weights than the entry's or for another input size (re-run ``python -m ml.export``).
    """
    artefact, filename = ONNX_FILES[name]
    files = manifest.get("files", {})
    fix = f"run python -m ml.export --model {entry} (add --data DIR for int8)"
    if artefact not in files:
        raise registry.RegistryError(f"{entry.name}: no {filename} for the {name} backend; {fix}")
    record = files[artefact]
    if record.get("source_weights_sha256") != files["weights"]["sha256"]:
        raise registry.RegistryError(
            f"{entry.name}/{record['path']} was exported from other weights than the entry's weights.safetensors; {fix}"
        )
    if not record.get("classifier"):
        raise registry.RegistryError(f"{entry.name}: the {artefact} record names no classifier for the heat map")
    data = registry.read_verified(entry, artefact, manifest=manifest)
    weight = classifier_weight(entry, manifest, record["classifier"])
    try:
        return OnnxBackend.from_bytes(data, weight, name=name, threads=threads, input_size=input_size)
    except registry.RegistryError as exc:
        raise registry.RegistryError(f"{entry.name}/{record['path']}: {exc}") from None
    except Exception as exc:  # onnxruntime's own errors: a file that passed its digest but does not load
        raise registry.RegistryError(f"{entry.name}/{record['path']} does not load in ONNX Runtime: {exc}") from exc
