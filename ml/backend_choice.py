"""Which backend (:mod:`ml.backends`) serves a registry entry on this machine.

``auto`` (see :func:`choose`) serves ONNX Runtime on the CPU when the entry has the files (int8 when
the manifest's ``serving.default_backend`` says so, its figures were measured on this CPU's class of
int8 kernels, :func:`int8_kernel`, and on the int8 graph the entry now has), and torch on CUDA or when
it has none.

This module needs no torch (``dermq model list`` reports its choice from the API's image, which has none).
"""

from __future__ import annotations

import functools
import platform
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: the backends of :mod:`ml.backends`
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
#: backend name -> (manifest artefact, file name)
ONNX_FILES = {"onnx": ("onnx_fp32", "model.onnx"), "onnx-int8": ("onnx_int8", "model.int8.onnx")}


def onnx_available(manifest: dict[str, Any], name: str) -> bool:
    return ONNX_FILES[name][0] in manifest.get("files", {})


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


@functools.cache
def int8_kernel() -> str:
    """The class of ONNX Runtime int8 kernels this CPU runs, which decides how an int8 graph's sums round.

    On x86 without VNNI, ONNX Runtime multiplies uint8 activations by int8 weights with VPMADDUBSW,
    whose int16 pair sums can saturate (ONNX Runtime's quantisation guide, on U8S8 against U8U8 and
    ``reduce_range``); with VNNI or AMX the products add up exactly in int32. The shipped v2 int8 graph agrees
    with fp32 on the most probable class of 98.7% of its validation images on a VNNI CPU and 96.0% on
    one without, so int8 figures hold only for the class they were measured on: ``x86-vnni``,
    ``x86-no-vnni``, ``x86`` (flags unreadable) or the machine name (``aarch64``, ...)."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return machine or "unknown"
    flags = _cpu_flags()
    if flags is None:
        return "x86"
    return "x86-vnni" if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else "x86-no-vnni"


def int8_measured_here(manifest: dict[str, Any]) -> bool:
    """Whether the manifest's int8 figures (``serving``) were measured on this CPU's :func:`int8_kernel`."""
    return manifest.get("serving", {}).get("int8_kernel") == int8_kernel()


def int8_graph_measured(manifest: dict[str, Any]) -> bool:
    """Whether the manifest's int8 figures (``serving``) were measured on the int8 graph it records now
    (``serving.onnx_int8_sha256``): a graph quantised again after them has met no rule."""
    record = manifest.get("files", {}).get(ONNX_FILES["onnx-int8"][0]) or {}
    measured = manifest.get("serving", {}).get("onnx_int8_sha256")
    return measured is not None and measured == record.get("sha256")


def choose(manifest: dict[str, Any], backend: str, device: torch.device | str) -> str:
    """The backend ``backend`` resolves to for an entry with ``manifest`` on ``device`` (``cpu``,
    ``cuda``, ``cuda:1`` or a :class:`torch.device`).

    ``auto`` serves int8 only where the manifest chose it *and* measured it, on this CPU's class of
    int8 kernels and on the int8 graph the entry has; elsewhere fp32 ONNX, since the figures that
    qualified int8 do not carry over."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if str(device).partition(":")[0] != "cpu":
        return "torch"
    preferred = manifest.get("serving", {}).get("default_backend", "onnx")
    if preferred == "onnx-int8" and not (int8_measured_here(manifest) and int8_graph_measured(manifest)):
        preferred = "onnx"
    if preferred == "torch":
        return "torch"
    for name in (preferred, "onnx") if preferred in ONNX_FILES else ("onnx",):
        if onnx_available(manifest, name):
            return name
    return "torch"
