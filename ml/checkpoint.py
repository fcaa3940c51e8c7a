"""A training run's work folder: the per-epoch state ``--resume`` continues from, and the final weights.

``last.pt`` holds tensors and plain values only (weights, moving average, optimiser, step, random
states) and is read with ``torch.load(weights_only=True)``; it is written atomically, so a run killed
mid-write still has the previous epoch's. ``final.safetensors`` is the moving average after the last
epoch: what :mod:`ml.finalize` ships, and what a student reads from its teacher's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ml import model as models
from ml.labels import NUM_CLASSES
from ml.recipe import TrainConfig, read_config

CHECKPOINT = "final.safetensors"
STATE = "last.pt"


def teacher_sources(spec: str) -> list[str]:
    """The teachers named by ``--teacher``: comma-separated work folders or registry entries."""
    return [part.strip() for part in spec.split(",") if part.strip()]


def load_teacher(source: str) -> tuple[nn.Module, models.Preprocessing]:
    """A teacher's weights and preprocessing: a finished run's work folder (its final moving average)
    or a registry entry (its verified shipped weights, float16 widened to float32)."""
    folder = Path(source)
    if (folder / "manifest.json").is_file():
        from ml.predictor import Predictor

        entry = Predictor.load(folder, device="cpu", backend="torch")  # every file verified, as serving does
        assert entry.model is not None
        return entry.model.eval().requires_grad_(False), entry.prep
    if not (folder / CHECKPOINT).is_file():
        raise SystemExit(f"teacher {source} has not finished (no {CHECKPOINT}) and is no registry entry")
    saved = read_config(folder / "config.json")
    net = models.create(saved["arch"], NUM_CLASSES)
    net.load_state_dict(load_file(str(folder / CHECKPOINT)))
    prep = models.preprocessing_for(
        net, saved["input_size"], saved.get("colour_constancy", "none"), saved.get("interpolation", "")
    )
    return net.eval().requires_grad_(False), prep


def save_state(
    workdir: Path,
    net: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epoch: int,
    step: int,
    history: list[dict[str, Any]],
) -> None:
    """Write the resume state atomically: a crash mid-write leaves the previous epoch's intact."""
    state = {
        "net": net.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "epoch": epoch,
        "step": step,
    }
    partial = workdir / f"{STATE}.partial"
    torch.save(state, partial)
    os.replace(partial, workdir / STATE)
    (workdir / "history.json").write_text(json.dumps(history, indent=2))


def load_state(workdir: Path) -> dict[str, Any]:
    return torch.load(workdir / STATE, map_location="cpu", weights_only=True)


def load_checkpoint(config: TrainConfig) -> nn.Module:
    net = models.create(config.arch, NUM_CLASSES)
    net.load_state_dict(load_file(str(Path(config.workdir) / CHECKPOINT)))
    return net.eval()
