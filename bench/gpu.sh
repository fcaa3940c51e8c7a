#!/usr/bin/env bash
# The GPU benchmark from a clean checkout (see docs/PERFORMANCE.md, "GPU"): creates .venv with
# `make install`; on a host with an NVIDIA driver, swaps ONNX Runtime for its CUDA build
# (onnxruntime-gpu, which serves the CPU as before; the newest release at or below the CPU build's
# version, as the CUDA build is published later or not for every release) so that the ONNX Runtime
# CUDA rows can run; starts PostgreSQL and Redis if they are down (`make services`; without them only the pipeline
# row is missing); then runs `python -m bench.gpu` with any arguments given here (--quick, --cases N,
# --database, --redis-url).
#
# DERMQ_BENCH_PYTHON=/path/to/python runs it with an interpreter that already holds dermq's
# dependencies instead (a GPU image's own CUDA build of torch, say, on a host that cannot reach
# PyPI): nothing is installed into it or swapped in it, and PostgreSQL and Redis are the caller's
# to start (PGHOST and --redis-url say where), or the pipeline row says `failed`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${DERMQ_BENCH_PYTHON:-}" ]; then
    exec "$DERMQ_BENCH_PYTHON" -m bench.gpu "$@"
fi
make --no-print-directory install
py=.venv/bin/python
if nvidia-smi -L > /dev/null 2>&1 && ! "$py" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
    version=$("$py" -c 'import onnxruntime; print(onnxruntime.__version__)')
    wheels=$(mktemp -d)
    # fetched before anything is removed: a host that cannot reach PyPI keeps its ONNX Runtime.
    # "<=": on 2026-12-04 PyPI had onnxruntime 1.32.0 but onnxruntime-gpu only up to 1.31.1 (built
    # for CUDA 13, whose libraries torch's cu130 wheels bring), so "==" fetched nothing at all
    if "$py" -m pip download -q --no-deps -d "$wheels" "onnxruntime-gpu<=$version"; then
        # both distributions share the onnxruntime package: remove both, then install the CUDA build
        # even if pip believes it is there (a later `make install` writes the CPU build over it)
        "$py" -m pip uninstall -q -y onnxruntime onnxruntime-gpu
        "$py" -m pip install -q --no-deps --force-reinstall "$wheels"/onnxruntime_gpu-*.whl
        echo "ONNX Runtime swapped for $(basename "$wheels"/onnxruntime_gpu-*.whl) (the CPU build was $version)" >&2
    else
        echo "no onnxruntime-gpu <= $version could be fetched: the ONNX Runtime CUDA rows will say so" >&2
    fi
    rm -rf "$wheels"
fi
make --no-print-directory services || echo "PostgreSQL or Redis did not start: the pipeline row will say so" >&2
exec "$py" -m bench.gpu "$@"
