"""Fine-tune a timm classifier on a HAM10000-layout folder and write a registry entry.

    python -m ml.train --data ../shared/data/ham10000 --out ml/registry/<model-id>

Recipe: lesion-level stratified split (fixed seed); ImageNet-initialised ``tf_efficientnet_lite0``;
square-root class-balanced sampling; flips, 90-degree rotations, random resized crops and colour
jitter; AdamW with warm-up and cosine decay; an exponential moving average of the weights, which is
what gets evaluated and shipped; early stopping on validation balanced accuracy; bf16 autocast on
CPUs that support it and fp16 autocast with out-of-memory back-off on CUDA. Afterwards
:mod:`ml.finalize` fits calibration on validation, evaluates the test split and writes the entry.

The resolved configuration, the split and the per-epoch history are written to ``--workdir``
(default ``<out>.work``) beside a checkpoint of the best weights, so ``--finalize-only`` can redo the
post-processing without training again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ml import data as ds
from ml import model as models
from ml import preprocess
from ml.images import ImageLimits, decode_image
from ml.labels import NUM_CLASSES
from ml.metrics import balanced_accuracy

CHECKPOINT = "best.safetensors"


@dataclass
class TrainConfig:
    data: str
    out: str
    workdir: str = ""
    arch: str = models.DEFAULT_ARCH
    imagenet: bool = True
    input_size: tuple[int, int] = (192, 192)
    epochs: int = 24
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.02
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.05
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mixup: float = 0.0
    ema_decay: float = 0.998
    balance_power: float = 0.5
    patience: int = 8
    time_budget_minutes: float = 0.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    split_seed: int = 20181
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    limit: int = 0
    threads: int = 0
    model_id: str = ""
    finalize_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m ml.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="HAM10000-layout folder (metadata.csv + images below it)")
    p.add_argument("--out", required=True, help="registry entry folder to write, e.g. ml/registry/<model-id>")
    p.add_argument("--workdir", default="", help="checkpoints and logs (default: <out>.work)")
    p.add_argument("--arch", default=models.DEFAULT_ARCH, help="timm architecture name")
    p.add_argument("--no-imagenet", dest="imagenet", action="store_false", help="random initialisation")
    p.add_argument("--input-size", type=int, nargs=2, default=[192, 192], metavar=("H", "W"))
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.02)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.05)
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout before the classifier")
    p.add_argument("--drop-path-rate", type=float, default=0.0, help="stochastic depth")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha, applied to half the batches (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--balance-power", type=float, default=0.5, help="sample weight = 1 / class_count ** power")
    p.add_argument("--patience", type=int, default=8, help="epochs without validation improvement before stopping")
    p.add_argument("--time-budget-minutes", type=float, default=0.0, help="stop starting epochs after this long")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=20181)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--limit", type=int, default=0, help="use only this many images (smoke runs)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--model-id", default="", help="registry id (default: the --out folder name)")
    p.add_argument("--finalize-only", action="store_true", help="skip training; calibrate and write the entry")
    args = p.parse_args(argv)
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k != "input_size"})
    config.input_size = (args.input_size[0], args.input_size[1])
    config.workdir = config.workdir or f"{config.out.rstrip('/')}.work"
    config.model_id = config.model_id or Path(config.out).name
    return config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_split(config: TrainConfig) -> ds.Split:
    samples = ds.read_dataset(config.data)
    if config.limit:
        rng = random.Random(config.seed)
        samples = sorted(samples, key=lambda s: s.image_id)
        rng.shuffle(samples)
        samples = samples[: config.limit]
    return ds.lesion_split(
        samples, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.split_seed
    )


def decode_samples(samples: list[ds.Sample], prep: models.Preprocessing, desc: str) -> np.ndarray:
    """(N, H, W, 3) uint8 at the model's input size, through the serving decode and resize path."""
    limits = ImageLimits(min_side=8)
    out = np.empty((len(samples), *prep.input_size, 3), dtype=np.uint8)
    for i, sample in enumerate(tqdm(samples, desc=desc, unit="img", leave=False, mininterval=5)):
        image = decode_image(sample.path.read_bytes(), limits, reduce_to=max(prep.input_size))
        out[i] = preprocess.to_uint8(image, prep)
    return out


def decode_for_training(samples: list[ds.Sample], size: tuple[int, int]) -> np.ndarray:
    """(N, H, W, 3) uint8 at a size a little above the input size, room for random crops."""
    limits = ImageLimits(min_side=8)
    prep = models.Preprocessing(input_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out = np.empty((len(samples), *size, 3), dtype=np.uint8)
    for i, sample in enumerate(tqdm(samples, desc="decode train", unit="img", leave=False, mininterval=5)):
        image = decode_image(sample.path.read_bytes(), limits, reduce_to=max(size))
        out[i] = preprocess.to_uint8(image, prep)
    return out


class Augment:
    """Batch augmentation on uint8 NHWC tensors -> normalised float NCHW (channels-last) tensors."""

    def __init__(self, prep: models.Preprocessing, generator: torch.Generator) -> None:
        self.size = prep.input_size
        self.mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(prep.std).view(1, 3, 1, 1)
        self.g = generator

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.g))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        images = batch.permute(0, 3, 1, 2).float() / 255.0  # N, 3, H, W
        out = []
        for image in images:
            _, h, w = image.shape
            scale = self._uniform(0.55, 1.0)
            ratio = math.exp(self._uniform(math.log(3 / 4), math.log(4 / 3)))
            ch = min(h, round(math.sqrt(scale * h * w / ratio)))
            cw = min(w, round(math.sqrt(scale * h * w * ratio)))
            top = int(torch.randint(0, h - ch + 1, (), generator=self.g))
            left = int(torch.randint(0, w - cw + 1, (), generator=self.g))
            crop = image[:, top : top + ch, left : left + cw].unsqueeze(0)
            crop = F.interpolate(crop, size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
            if torch.rand((), generator=self.g) < 0.5:
                crop = crop.flip(2)
            if torch.rand((), generator=self.g) < 0.5:
                crop = crop.flip(1)
            k = int(torch.randint(0, 4, (), generator=self.g))
            if k and self.size[0] == self.size[1]:
                crop = torch.rot90(crop, k, dims=(1, 2))
            # Colour jitter: brightness, contrast, saturation (dermatoscopes and lighting differ).
            crop = crop * self._uniform(0.8, 1.2)
            mean = crop.mean()
            crop = (crop - mean) * self._uniform(0.8, 1.2) + mean
            gray = crop.mean(dim=0, keepdim=True)
            crop = (crop - gray) * self._uniform(0.8, 1.2) + gray
            out.append(crop.clamp(0.0, 1.0))
        x = torch.stack(out)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def to_input(batch: np.ndarray, prep: models.Preprocessing) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW, channels-last (the serving path's tensor)."""
    return torch.from_numpy(preprocess.normalize(batch, prep)).permute(0, 3, 1, 2)


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    prep: models.Preprocessing,
    device: torch.device,
    autocast: torch.dtype | None,
    *,
    batch_size: int = 64,
    hflip: bool = False,
) -> np.ndarray:
    """(N, C) float32 logits for uint8 NHWC images; with ``hflip`` the mean over both views."""
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size], prep).to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = model(x).float()
            if hflip:
                logits = (logits + model(x.flip(3)).float()) / 2
        chunks.append(logits.cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, NUM_CLASSES), dtype=np.float32)


def sampling_weights(labels: np.ndarray, power: float) -> np.ndarray:
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    return (1.0 / np.maximum(counts, 1.0) ** power)[labels]


def effective_log_prior(labels: np.ndarray, power: float) -> np.ndarray:
    """log of the class mix the sampler shows the model: count ** (1 - power), normalised."""
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    mix = np.maximum(counts, 1.0) ** (1.0 - power)
    return np.log(mix / mix.sum())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(config: TrainConfig) -> Path:
    """Train, checkpointing the best EMA weights to ``workdir``; returns the checkpoint path."""
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    autocast = resolve_precision(config.precision, device)

    split = load_split(config)
    (workdir / "split.json").write_text(
        json.dumps({name: [s.image_id for s in getattr(split, name)] for name in ("train", "val", "test")})
    )
    (workdir / "config.json").write_text(json.dumps(asdict(config), indent=2))

    net = models.build(
        config.arch,
        NUM_CLASSES,
        imagenet=config.imagenet,
        drop_rate=config.drop_rate,
        drop_path_rate=config.drop_path_rate,
    )
    prep = models.preprocessing_for(net, config.input_size)
    margin = (round(config.input_size[0] * 1.15), round(config.input_size[1] * 1.15))
    train_images = torch.from_numpy(decode_for_training(split.train, margin))
    train_labels = np.array([s.label for s in split.train])
    val_images = decode_samples(split.val, prep, "decode val")
    val_labels = np.array([s.label for s in split.val])
    log_prior = effective_log_prior(train_labels, config.balance_power)

    net = net.to(device).to(memory_format=torch.channels_last)
    ema = models.create(config.arch, NUM_CLASSES).to(device).to(memory_format=torch.channels_last)
    ema.load_state_dict(net.state_dict())
    ema.eval().requires_grad_(False)

    optimizer = torch.optim.AdamW(param_groups(net, config.weight_decay), lr=config.lr)
    steps_per_epoch = max(1, len(split.train) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))

    def lr_at(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))

    generator = torch.Generator().manual_seed(config.seed)
    augment = Augment(prep, generator)
    weights = torch.as_tensor(sampling_weights(train_labels, config.balance_power))
    labels_t = torch.as_tensor(train_labels)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and autocast is torch.float16)

    history: list[dict[str, Any]] = []
    best, best_epoch, step = -1.0, -1, 0
    started = time.monotonic()
    batch_size = config.batch_size
    for epoch in range(config.epochs):
        if config.time_budget_minutes and epoch and time.monotonic() - started > config.time_budget_minutes * 60:
            print(f"time budget of {config.time_budget_minutes} min reached after {epoch} epochs", flush=True)
            break
        net.train()
        order = torch.multinomial(weights, steps_per_epoch * config.batch_size, replacement=True, generator=generator)
        running, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", mininterval=10)
        for i in bar:
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            for part in idx.split(batch_size):
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr_at(step)
                try:
                    loss = _train_step(
                        net,
                        optimizer,
                        scaler,
                        augment,
                        train_images[part],
                        labels_t[part],
                        device,
                        autocast,
                        config.label_smoothing,
                        mixup=config.mixup if float(torch.rand((), generator=generator)) < 0.5 else 0.0,
                        generator=generator,
                    )
                except torch.OutOfMemoryError:
                    if batch_size <= 4:
                        raise
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    batch_size //= 2
                    print(f"CUDA out of memory: continuing with micro-batches of {batch_size}", flush=True)
                    continue
                running += loss * len(part)
                seen += len(part)
            step += 1
            _ema_update(ema, net, min(config.ema_decay, (1 + step) / (10 + step)))
            if i % 20 == 0:
                bar.set_postfix(loss=f"{running / max(seen, 1):.3f}", lr=f"{lr_at(step):.2e}")
        val_logits = predict_logits(ema, val_images, prep, device, autocast)
        val_bacc = balanced_accuracy(val_labels, (val_logits - log_prior).argmax(1))
        record = {
            "epoch": epoch + 1,
            "train_loss": running / max(seen, 1),
            "val_balanced_accuracy": val_bacc,
            "val_accuracy": float((val_logits.argmax(1) == val_labels).mean()),
            "minutes": (time.monotonic() - started) / 60,
        }
        history.append(record)
        print(json.dumps(record), flush=True)
        (workdir / "history.json").write_text(json.dumps(history, indent=2))
        if val_bacc > best:
            best, best_epoch = val_bacc, epoch + 1
            state = {k: v.detach().float().cpu().contiguous() for k, v in ema.state_dict().items()}
            save_file(state, str(workdir / CHECKPOINT), metadata={"epoch": str(epoch + 1), "arch": config.arch})
        elif epoch + 1 - best_epoch >= config.patience:
            print(f"no validation improvement for {config.patience} epochs; stopping", flush=True)
            break
    print(f"best validation balanced accuracy {best:.4f} at epoch {best_epoch}", flush=True)
    return workdir / CHECKPOINT


def _train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    augment: Augment,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    autocast: torch.dtype | None,
    label_smoothing: float,
    *,
    mixup: float = 0.0,
    generator: torch.Generator | None = None,
) -> float:
    x = augment(images).to(device, non_blocking=True)
    y = labels.to(device, non_blocking=True)
    targets = F.one_hot(y, NUM_CLASSES).float() * (1 - label_smoothing) + label_smoothing / NUM_CLASSES
    if mixup > 0:
        # Mixup (Zhang et al. 2018): convex blends of image pairs and of their labels.
        lam = float(torch.distributions.Beta(mixup, mixup).sample())
        order = torch.randperm(len(x), generator=generator).to(device)
        x = lam * x + (1 - lam) * x[order]
        targets = lam * targets + (1 - lam) * targets[order]
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = torch.sum(-targets * F.log_softmax(net(x).float(), dim=1), dim=1).mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


@torch.no_grad()
def _ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for e, p in zip(ema.state_dict().values(), net.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


def load_checkpoint(config: TrainConfig) -> nn.Module:
    net = models.create(config.arch, NUM_CLASSES)
    net.load_state_dict(load_file(str(Path(config.workdir) / CHECKPOINT)))
    return net.eval()


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    if not config.finalize_only:
        train(config)
    else:
        saved = json.loads((Path(config.workdir) / "config.json").read_text())
        for key in (
            "arch",
            "input_size",
            "split_seed",
            "val_fraction",
            "test_fraction",
            "limit",
            "seed",
            "balance_power",
            "epochs",
            "lr",
            "batch_size",
        ):
            setattr(config, key, tuple(saved[key]) if key == "input_size" else saved[key])
    from ml.finalize import finalize  # imported late: finalisation can be revised without retraining

    finalize(config)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
