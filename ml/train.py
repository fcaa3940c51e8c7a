"""Fine-tune a timm classifier on a HAM10000-layout folder and write a registry entry.

    python -m ml.train --data ../shared/data/ham10000 --out ml/registry/<model-id> [--recipe v2-student]
    python -m ml.train ... --resume            # continue an interrupted run from its last epoch

Recipe (``ml.recipe``; ``ml.cv`` compares recipes by lesion-grouped cross-validation, see each
model card for what was compared):
lesion-level stratified split (fixed seed); ImageNet-initialised EfficientNet-Lite; images through
the serving decode and resize path at a 4:3 input (168x224 for the served Lite0); square-root
class-balanced sampling; any-angle rotation, crops, flips, colour and hue jitter, blur and random
erasing, and a last epoch on whole images; AdamW with warm-up and a fixed cosine schedule to zero,
weight decay, dropout and stochastic depth; an exponential moving average of the weights, which is
what gets evaluated and shipped. No early stopping: validation is watched, never used to pick an
epoch. With ``--teacher`` the loss adds the soft labels of a finished teacher run or a registry entry
(knowledge distillation, Hinton et al. 2015), computed online on the very crop the student sees;
several teachers, comma-separated, give the normalised geometric mean of their softened softmaxes.

Every epoch ends with a checkpoint in ``--workdir`` (default ``<out>.work``): weights, EMA,
optimiser, step and random state, so ``--resume`` continues exactly. Afterwards :mod:`ml.finalize`
calibrates on validation, evaluates the test split and writes the entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ml import data as ds
from ml import model as models
from ml import preprocess
from ml.augment import Augment
from ml.backends import resolve_device
from ml.checkpoint import CHECKPOINT, STATE, load_state, load_teacher, save_state, teacher_sources
from ml.finalize import finalize
from ml.images import ImageLimits, decode_image
from ml.labels import NUM_CLASSES
from ml.metrics import balanced_accuracy
from ml.provenance import describe_environment
from ml.recipe import TrainConfig, check_same_run, load_split, parse_args, read_config, write_config
from ml.teacher_lesions import refuse_leaking_teachers


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


def decode_samples(samples: list[ds.Sample], prep: models.Preprocessing, desc: str) -> np.ndarray:
    """(N, H, W, 3) uint8 at the model's input size, through the serving decode and resize path."""
    limits = ImageLimits(min_side=8)
    out = np.empty((len(samples), *prep.input_size, 3), dtype=np.uint8)
    for i, sample in enumerate(tqdm(samples, desc=desc, unit="img", leave=False, mininterval=5)):
        image = decode_image(sample.path.read_bytes(), limits, reduce_to=max(prep.input_size))
        out[i] = preprocess.to_uint8(image, prep)
    return out


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
) -> np.ndarray:
    """(N, C) float32 logits for uint8 NHWC images."""
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size], prep).to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            chunks.append(model(x).float().cpu().numpy())
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


def lr_at(config: TrainConfig, step: int, total_steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine to zero at the last step: a fixed schedule, the same every run."""
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(config: TrainConfig, split: ds.Split | None = None) -> Path:
    """Train on ``split.train`` (watching ``split.val``), checkpointing every epoch to ``workdir``;
    returns the path of the final EMA weights."""
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    resuming = config.resume and (workdir / STATE).is_file()
    if resuming:
        check_same_run(config, read_config(workdir / "config.json"))
    elif (workdir / "config.json").exists() and (workdir / STATE).exists():
        raise SystemExit(f"{workdir} holds an unfinished run: pass --resume, or choose another --workdir")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    autocast = resolve_precision(config.precision, device)

    split = split or load_split(config)
    (workdir / "split.json").write_text(
        json.dumps({name: [s.image_id for s in getattr(split, name)] for name in ("train", "val", "test")})
    )
    write_config(config, workdir / "config.json")
    precision = f"{autocast} autocast".replace("torch.", "") if autocast else "float32"
    (workdir / "environment.json").write_text(
        json.dumps(describe_environment(device=str(device), precision=precision), indent=2)
    )

    net = models.build(
        config.arch,
        NUM_CLASSES,
        imagenet=config.imagenet and not resuming,
        drop_rate=config.drop_rate,
        drop_path_rate=config.drop_path_rate,
    )
    prep = models.preprocessing_for(net, config.input_size, config.colour_constancy, config.interpolation)
    teachers = [load_teacher(source) for source in teacher_sources(config.teacher)]
    refuse_leaking_teachers(config, split, teacher_sources(config.teacher))  # before anything is decoded
    # Distillation: images are decoded (and augmented) at the first teacher's size; the student and
    # any other teacher get the same crop resampled to their own sizes, so all see the same thing.
    teacher_prep = teachers[0][1] if teachers else None
    # at the teacher's size, with the student's resampler: what the student is served with is what it learns on
    source_prep = dataclasses.replace(teacher_prep, interpolation=prep.interpolation) if teacher_prep else prep
    for _, other in teachers:
        if (other.colour_constancy, other.mean, other.std) != (prep.colour_constancy, prep.mean, prep.std):
            raise SystemExit("teachers and student must share colour constancy and normalisation")
    train_images = torch.from_numpy(decode_samples(split.train, source_prep, "decode train"))
    train_labels = np.array([s.label for s in split.train])
    val_images = decode_samples(split.val, prep, "decode val")
    val_labels = np.array([s.label for s in split.val])
    log_prior = effective_log_prior(train_labels, config.balance_power)
    (workdir / "pixels.json").write_text(
        json.dumps(
            {
                "train": hashlib.sha256(train_images.numpy().tobytes()).hexdigest(),
                "val": hashlib.sha256(val_images.tobytes()).hexdigest(),
                "what": "SHA-256 of the decoded uint8 model inputs (N, H, W, 3), in image-id order",
            }
        )
    )

    net = net.to(device).to(memory_format=torch.channels_last)
    ema = models.create(config.arch, NUM_CLASSES).to(device).to(memory_format=torch.channels_last)
    ema.load_state_dict(net.state_dict())
    ema.eval().requires_grad_(False)
    teacher = [(t.to(device).to(memory_format=torch.channels_last), tp.input_size) for t, tp in teachers]

    optimizer = torch.optim.AdamW(param_groups(net, config.weight_decay), lr=config.lr)
    steps_per_epoch = max(1, len(split.train) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(config.seed)
    augment = Augment(
        source_prep, generator, out_size=prep.input_size, strength=config.augment_strength, rotate=config.rotate
    )
    teacher_augment = Augment(teacher_prep, generator) if teacher_prep is not None else None
    weights = torch.as_tensor(sampling_weights(train_labels, config.balance_power))
    labels_t = torch.as_tensor(train_labels)

    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    if resuming:
        state = load_state(workdir)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        history = json.loads((workdir / "history.json").read_text())[:start_epoch]
        print(f"resuming after epoch {start_epoch} of {config.epochs}", flush=True)

    minutes_before = history[-1]["minutes"] if history else 0.0
    started = time.monotonic()
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", mininterval=10, smoothing=0.05)
    for epoch in range(start_epoch, config.epochs):
        net.train()
        whole = config.last_epoch_whole and epoch == config.epochs - 1 and config.epochs > 1
        order = torch.multinomial(weights, steps_per_epoch * config.batch_size, replacement=True, generator=generator)
        running, seen = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, step, total_steps, warmup)
            loss = _train_step(net, teacher, optimizer, augment, teacher_augment, train_images[idx], labels_t[idx],
                               config, device, autocast, crops=not whole)  # fmt: skip
            running, seen = running + loss * len(idx), seen + len(idx)
            step += 1
            _ema_update(ema, net, min(config.ema_decay, (1 + step) / (10 + step)))
            bar.update(1)
            if i % 20 == 0:
                bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{running / max(seen, 1):.3f}")
        val_logits = predict_logits(ema, val_images, prep, device, autocast)
        record = {
            "epoch": epoch + 1,
            "train_loss": running / max(seen, 1),
            "val_balanced_accuracy": balanced_accuracy(val_labels, (val_logits - log_prior).argmax(1)),
            "val_accuracy": float((val_logits.argmax(1) == val_labels).mean()),
            "whole_images": whole,
            "minutes": minutes_before + (time.monotonic() - started) / 60,
        }
        history.append(record)
        tqdm.write(json.dumps(record))
        save_state(workdir, net, ema, optimizer, generator, epoch + 1, step, history)
    bar.close()
    final = {k: v.detach().float().cpu().contiguous() for k, v in ema.state_dict().items()}
    save_file(final, str(workdir / CHECKPOINT), metadata={"epochs": str(config.epochs), "arch": config.arch})
    return workdir / CHECKPOINT


def soft_targets(labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.one_hot(labels, NUM_CLASSES).float() * (1 - smoothing) + smoothing / NUM_CLASSES


def _train_step(
    net: nn.Module,
    teacher: list[tuple[nn.Module, tuple[int, int]]],
    optimizer: torch.optim.Optimizer,
    augment: Augment,
    teacher_augment: Augment | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
    autocast: torch.dtype | None,
    *,
    crops: bool,
) -> float:
    y = labels.to(device, non_blocking=True)
    targets = soft_targets(y, config.label_smoothing)
    if teacher and teacher_augment is not None:
        # One draw of the augmentation at the first teacher's size; the others get the same view resampled.
        big = teacher_augment(images, crops=crops).to(device, non_blocking=True)
        x = _resampled(big, augment.size)
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast or torch.float32,
                                             enabled=autocast is not None):  # fmt: skip
            teacher_log_probs = ensemble_log_probs(
                [net_t(_resampled(big, size)).float() for net_t, size in teacher], config.distill_temperature
            )
    else:
        x = augment(images, crops=crops).to(device, non_blocking=True)
        teacher_log_probs = None
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = net(x).float()
    loss = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    if teacher_log_probs is not None:
        t = config.distill_temperature
        distill = F.kl_div(F.log_softmax(logits / t, dim=1), teacher_log_probs,
                           reduction="batchmean", log_target=True) * t * t  # fmt: skip
        loss = (1 - config.distill_alpha) * loss + config.distill_alpha * distill
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _resampled(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``batch`` (N, 3, H, W) at ``size``, channels-last: itself, not resampled, when it is that size."""
    if tuple(batch.shape[-2:]) != tuple(size):
        batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    return batch.contiguous(memory_format=torch.channels_last)


def ensemble_log_probs(logits: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """The teachers' soft labels at ``temperature``: the normalised geometric mean of their
    softmaxes (the mean of their log-probabilities, renormalised); one teacher's own for one."""
    mean = torch.stack([F.log_softmax(z / temperature, dim=1) for z in logits]).mean(0)
    return mean - torch.logsumexp(mean, dim=1, keepdim=True)


@torch.no_grad()
def _ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for e, p in zip(ema.state_dict().values(), net.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        else:
            e.copy_(p)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    if config.finalize_only:
        saved = read_config(Path(config.workdir) / "config.json")
        keep = {k: getattr(config, k) for k in ("data", "out", "workdir", "model_id", "finalize_only", "cv_summary")}
        config = TrainConfig(**{**saved, **keep})
    else:
        train(config)
    finalize(config)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
