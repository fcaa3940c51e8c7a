"""``bench/gpu.sh --quick`` (``python -m bench.gpu``) on this machine: without a GPU it says so
first, then prints one table with measured CPU throughput, the GPU-only rows marked as such, and a
pipeline that finished its cases on the CPU. With a GPU the first line names it instead."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.common import FIXTURE_IMAGES
from ml.labels import CLASSES
from tests import support

THROUGHPUT = re.compile(
    r"^torch (?P<device>cpu|cuda) fp32\s+(?P<batch>\d+)\s+(?P<rate>[0-9.]+) images/s\s+(?P<ms>[0-9.]+) ms$"
)
HEAT_MAP = re.compile(r"^torch (cpu|cuda) classify \+ heat map\s+1\s+([0-9.]+) cases/s\s+([0-9.]+) ms$")
PIPELINE = re.compile(
    r"^pipeline DERMQ_DEVICE=(cpu|cuda)(?:, (\d+) children)? \((\d+) cases at once, (\d+) failed\)\s+-\s+([0-9.]+) "
    r"cases/s \((?:([0-9.]+) from the first result on|all ended at once, in one batch)\)"
)
# the rows only a GPU host measures (bench.gpu.agreement_row, onnx_cuda_rows, oom_fallback_row)
AGREEMENT = re.compile(
    r"^cuda answers against the CPU's\s+(\d+)\s+(\d+)/(\d+) labels agree; "
    r"largest probability difference ([0-9.]+e[-+]\d+)\s+-$"
)
ONNX_CUDA = re.compile(
    r"^onnxruntime CUDA fp32(, TF32 allowed)?, bare pass \([^)]+\)"
    r"\s+(?P<batch>\d+)\s+(?P<rate>[0-9.]+) images/s\s+(?P<ms>[0-9.]+) ms$"
)
ONNX_CUDA_MISSING = re.compile(
    r"^onnxruntime CUDA\s+-\s+not available \(no CUDAExecutionProvider: onnxruntime-gpu\)\s+-$"
)
OOM_FALLBACK = re.compile(
    r"^OOM fallback \(worker _classify_image\)\s+1\s+OOM at ([0-9.]+) GiB held; answered on cpu \((\w+)\); "
    r"([0-9.]+) GiB left allocated\s+[0-9.]+ ms$"
)


def assert_throughput(measured: list[re.Match[str]], batches: list[int]) -> None:
    """Rows measured at ``batches``, each with images/s that is the batch over its p50 per batch."""
    assert [int(m["batch"]) for m in measured] == batches
    for m in measured:
        assert float(m["rate"]) > 0 and float(m["ms"]) > 0
        # images/s is the batch over the p50 per batch, within 5% and the 0.05 that printing it to one
        # decimal may take off (a loaded run printed 0.7 for 1/1.3411 s = 0.746: 6.5% by rounding alone)
        printed, exact = float(m["rate"]), int(m["batch"]) / (float(m["ms"]) / 1000)
        assert abs(printed - exact) < 0.05 * printed + 0.05, (printed, exact)


@pytest.mark.slow
def test_quick_run_prints_one_table_and_says_when_there_is_no_gpu(private_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # a private Redis (started and answering a ping): the run flushes its database
    database = f"{support.TEST_DATABASE}_bench_gpu"
    # through bench/gpu.sh with an interpreter of the caller's (DERMQ_BENCH_PYTHON: nothing installed),
    # as on a GPU image that cannot reach PyPI; this one notes how it was called, then runs this Python
    called = tmp_path / "called"
    interpreter = tmp_path / "python"
    interpreter.write_text(f'#!/bin/sh\necho "$@" > {called}\nexec {sys.executable} "$@"\n')
    interpreter.chmod(0o755)
    # and nothing is installed: a `make` that fails comes first on the PATH (gpu.sh stops on an error)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "make").write_text("#!/bin/sh\nexit 1\n")
    (tools / "make").chmod(0o755)
    try:
        run = subprocess.run(
            ["bash", "bench/gpu.sh", "--quick", "--database", database, "--redis-url", private_broker.url],
            env={**os.environ, "DERMQ_BENCH_PYTHON": str(interpreter), "PATH": f"{tools}:{os.environ['PATH']}"},
            cwd=support.ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        support.drop_database(f"postgresql+psycopg2:///{database}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert called.read_text().split() == [
        "-m",
        "bench.gpu",
        "--quick",
        "--database",
        database,
        "--redis-url",
        private_broker.url,
    ]
    lines = run.stdout.strip().splitlines()
    gpu = torch.cuda.is_available()
    if gpu:
        assert lines[0].startswith("dermq GPU benchmark on "), lines[0]
    else:
        assert lines[0].startswith("no GPU: CUDA is not available here"), lines[0]
    # the layout the pipeline row ran, as the API and the worker resolved it
    assert re.match(
        r"^pipeline layout: 1 API process, 1 worker child x \d+ threads? on \d+ CPUs, DERMQ_DEVICE=(cpu|cuda)$",
        lines[1],
    ), lines[1]
    assert lines[2].split() == ["measure", "batch", "throughput", "p50", "per", "batch"]
    rows = [line.strip() for line in lines[4:]]

    measured = [m for m in map(THROUGHPUT.match, rows) if m]
    assert_throughput(measured, [1, 8, 32, 128] if gpu else [1, 8, 32])
    assert {m["device"] for m in measured} == {"cuda" if gpu else "cpu"}

    # a worker's model work for one case: classification and heat map, on the same device
    heat = [m for m in map(HEAT_MAP.match, rows) if m]
    assert len(heat) == 1 and heat[0].group(1) == ("cuda" if gpu else "cpu"), rows
    assert float(heat[0].group(2)) > 0 and float(heat[0].group(3)) > 0

    pipeline = [m for m in map(PIPELINE.match, rows) if m]
    # the pipeline's rows whole (a failed one says why), and the end of the run's stderr
    shown = "\n".join([r for r in rows if r.startswith("pipeline")] + [run.stderr[-3000:]])
    # one worker child; on a GPU also two sharing it, as docker-compose.yml and deploy/k8s run
    assert [(m.group(1), m.group(2)) for m in pipeline] == (
        [("cuda", None), ("cuda", "2")] if gpu else [("cpu", None)]
    ), shown
    for _, _, cases, failed, rate, flowing in (m.groups() for m in pipeline):
        assert (int(cases), int(failed)) == (8, 0), shown
        # over the whole span, and once results flow (unless the eight ended in one batch: a loaded
        # machine's first batch can claim them all)
        assert float(rate) > 0 and (flowing is None or float(flowing) > 0)
    if not gpu:
        assert any(r.startswith("cuda answers against the CPU's") and "skipped: no GPU" in r for r in rows), rows
        assert any(r.startswith("onnxruntime CUDA") and "not available (no GPU)" in r for r in rows), rows
        assert any(r.startswith("OOM fallback") and "skipped: no GPU" in r for r in rows), rows
        # torch rows, heat map, agreement, ONNX, OOM, pipeline: nothing else
        assert len(rows) == len(measured) + 5, rows
        return

    # the GPU answers as the CPU does: every fixture image the same label, probabilities close (cuDNN
    # may round differently; a wrong device transfer or preprocessing moves them far more)
    agreements = [m for m in map(AGREEMENT.match, rows) if m]
    assert len(agreements) == 1, rows
    agreement = agreements[0]
    images, agree, of, gap = agreement.groups()
    assert int(images) == int(agree) == int(of) == len(list(FIXTURE_IMAGES.glob("*.jpg"))), agreement.group(0)
    assert float(gap) < 0.02, agreement.group(0)
    # ONNX Runtime on CUDA measured at every batch size where this interpreter has its CUDA build, and
    # else one row saying what is missing
    import onnxruntime

    onnx = [m for m in map(ONNX_CUDA.match, rows) if m]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert_throughput(onnx, [1, 8, 32, 128])
        onnx_rows = len(onnx)
    else:
        assert not onnx and sum(map(bool, map(ONNX_CUDA_MISSING.match, rows))) == 1, rows
        onnx_rows = 1
    # an out-of-memory error really provoked, the case answered on the CPU with a diagnosis, and the
    # GPU memory the run filled given back (what stays allocated is the model's own weights)
    fallbacks = [m for m in map(OOM_FALLBACK.match, rows) if m]
    assert len(fallbacks) == 1, [r for r in rows if r.startswith("OOM")]
    oom = fallbacks[0]
    held, label, left = oom.groups()
    assert label in CLASSES and float(held) > 1 and float(left) < 1, oom.group(0)
    # torch rows, heat map, agreement, ONNX, OOM, the two pipelines: nothing else (no 'failed' row)
    assert len(rows) == len(measured) + 1 + 1 + onnx_rows + 1 + 2, rows


def test_on_a_gpu_host_the_cuda_build_at_or_below_the_cpu_builds_version_is_swapped_in(tmp_path: Path) -> None:
    """Where nvidia-smi finds a GPU and ONNX Runtime has no CUDA provider, gpu.sh asks pip for the
    newest onnxruntime-gpu at or below the CPU build's version (PyPI had 1.31.1 against 1.32.0, so
    asking for the same version fetched nothing), installs what came, then runs bench.gpu. Run from a
    copy of the script beside a stand-in .venv whose python notes each call (no download)."""
    root = tmp_path / "checkout"
    (root / "bench").mkdir(parents=True)
    (root / "bench" / "gpu.sh").write_text((support.ROOT / "bench" / "gpu.sh").read_text())
    (root / ".venv" / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    python = root / ".venv" / "bin" / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'case "$*" in\n'
        '  "-c import onnxruntime; print(onnxruntime.__version__)") echo 1.32.0 ;;\n'
        "  -c*) exit 1 ;;\n"  # the CUDA provider test: the CPU build has none
        '  "-m pip download"*) for a; do d=$spec; spec=$a; done\n'  # -d DIR SPEC: the last two arguments
        '    touch "$d/onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl" ;;\n'
        "esac\n"
    )
    python.chmod(0o755)
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("make", "nvidia-smi"):  # make install and make services succeed; a GPU is listed
        (tools / tool).write_text("#!/bin/sh\nexit 0\n")
        (tools / tool).chmod(0o755)
    run = subprocess.run(
        ["bash", "bench/gpu.sh", "--quick"],
        env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "DERMQ_BENCH_PYTHON": ""},
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    lines = calls.read_text().splitlines()
    download = next(line.split() for line in lines if line.startswith("-m pip download"))
    assert download[-1] == "onnxruntime-gpu<=1.32.0"
    install = next(line.split() for line in lines if line.startswith("-m pip install"))
    assert install[-1].endswith("/onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert lines.index(" ".join(install)) > lines.index(next(x for x in lines if x.startswith("-m pip uninstall")))
    assert lines[-1] == "-m bench.gpu --quick"
    assert "swapped for onnxruntime_gpu-1.31.1" in run.stderr
