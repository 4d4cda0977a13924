"""pytest-benchmark view of the per-op dropout cases (small sizes)::

    pytest bench/ --benchmark-only                      # all providers, modes, dtypes, sizes
    pytest bench/ --benchmark-only -k "cpu and fwd"     # a subset

Same providers, modes and closures as ``python -m bench`` (:mod:`bench.dropout`); pytest-benchmark
does the timing and statistics. Each result's ``extra_info`` holds the minimal byte count and the
effective GB/s of its median. Nothing here asserts a time: speed is reported, never tested.
``pytest tests`` does not collect this file (pyproject ``testpaths = ["tests"]``).
"""

from __future__ import annotations

import pytest
import torch

from bench.config import P_DROP, dtype_name, size_label
from bench.dropout import MODES, Case, min_bytes_per_elem, mode_fn, providers

pytest.importorskip("pytest_benchmark")

SIZES = (2**16, 2**20)
DTYPES = (torch.float32, torch.bfloat16)
DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

PARAMS = [
    pytest.param(
        device, provider, mode, dtype, numel,
        id=f"{device.type}-{provider.name}-{mode}-{dtype_name(dtype)}-n{numel}",  # no "^": -k must parse it
    )
    for device in DEVICES
    for provider in providers(device)
    for mode in MODES
    for dtype in DTYPES
    for numel in SIZES
]  # fmt: skip


def _synchronized(call, device: torch.device):
    """CUDA work is asynchronous: wait for it, so the wall-clock timer sees the kernel time."""
    if device.type != "cuda":
        return call

    def synced() -> None:
        call()
        torch.cuda.synchronize(device)

    return synced


@pytest.mark.parametrize("device, provider, mode, dtype, numel", PARAMS)
def test_dropout(benchmark, device, provider, mode, dtype, numel):
    case = Case(dtype, numel, device)
    call = _synchronized(mode_fn(provider.make(P_DROP), mode, case), device)
    call()  # warm-up outside the timed rounds: torch.compile compiles here
    benchmark.group = f"dropout {mode} {dtype_name(dtype)} {size_label(numel)} {device.type}"
    benchmark(call)
    bytes_min = min_bytes_per_elem(mode, case.x.element_size()) * numel
    benchmark.extra_info["bytes_min"] = bytes_min
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps_eff"] = bytes_min / benchmark.stats.stats.median / 1e9
