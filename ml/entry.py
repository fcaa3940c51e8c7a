"""Writing a registry entry from a trained torch model (the reading side is :mod:`ml.registry`)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ml import registry
from ml.decision import DecisionPolicy
from ml.labels import CLASSES
from ml.model import Preprocessing


def save_entry(
    out: str | Path,
    model: nn.Module,
    *,
    model_id: str,
    architecture: str,
    preprocessing: Preprocessing,
    policy: DecisionPolicy,
    tta: str = "none",
    dtype: torch.dtype = torch.float16,
    version: str = "1.0.0",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``weights.safetensors`` (in ``dtype``) and ``manifest.json`` with the weights' SHA-256."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(out / registry.WEIGHTS), metadata={"format": "pt", "architecture": architecture})
    (out / registry.WEIGHTS).chmod(0o644)
    manifest: dict[str, Any] = {
        "schema_version": registry.SCHEMA_VERSION,
        "model_id": model_id,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": architecture,
        "classes": list(CLASSES),
        "preprocessing": preprocessing.to_dict(),
        "tta": tta,
        "decision": policy.to_dict(),
        "files": {},
        "metrics": {},
        **(extra or {}),
    }
    registry.write_json_atomic(out / registry.MANIFEST, manifest)
    registry.record_file(
        out, "weights", registry.WEIGHTS, dtype=str(dtype).removeprefix("torch."), format="safetensors"
    )
    return out
