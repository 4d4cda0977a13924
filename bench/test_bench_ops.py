"""pytest-benchmark view of the per-op cases (small sizes): dropout, cross-entropy + sampling, site penalty::

    pytest bench/ --benchmark-only                      # all providers, modes, dtypes, sizes
    pytest bench/ --benchmark-only -k "cpu and fwd"     # a subset
    pytest bench/ --benchmark-only -k test_ce_sample    # one op

Same providers, modes and closures as ``python -m bench`` (:mod:`bench.dropout`, :mod:`bench.ce`,
:mod:`bench.site_penalty`); pytest-benchmark does the timing and statistics. Each result's
``extra_info`` holds the counted byte count and the effective GB/s of its median. Nothing here
asserts a time: speed is reported, never tested. ``pytest tests`` does not collect this file
(pyproject ``testpaths = ["tests"]``).
"""

from __future__ import annotations

import pytest
import torch

from bench import ce, site_penalty
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
    if not (provider.name == "compile" and mode == "inplace")  # as python -m bench: compile times out of place
    for dtype in DTYPES
    for numel in SIZES
]  # fmt: skip

CE_SHAPES = ((256, 1000), (256, 10_000))  # (N, C)
CE_PARAMS = [
    pytest.param(
        device, provider, dtype, rows, classes,
        id=f"{device.type}-{provider}-{dtype_name(dtype)}-N{rows}-C{classes}",
    )
    for device in DEVICES
    for provider in ce.providers(device)
    for dtype in DTYPES
    for rows, classes in CE_SHAPES
]  # fmt: skip

SITE_PARAMS = [
    pytest.param(
        device, provider, mode, dtype, numel,
        id=f"{device.type}-{provider}-{mode}-{dtype_name(dtype)}-n{numel}",
    )
    for device in DEVICES
    for provider in site_penalty.providers(device, P_DROP)
    for mode in site_penalty.MODES
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
    _record_bytes(benchmark, min_bytes_per_elem(mode, case.x.element_size()) * numel)


@pytest.mark.parametrize("device, provider, dtype, rows, classes", CE_PARAMS)
def test_ce_sample(benchmark, device, provider, dtype, rows, classes):
    case = ce.Case(dtype, rows, classes, device)
    call = _synchronized(ce.case_call(ce.providers(device)[provider](), case), device)
    call()  # warm-up (and compile) outside the timed rounds
    benchmark.group = f"ce {ce.MODE} {dtype_name(dtype)} {rows}x{classes} {device.type}"
    benchmark(call)
    _record_bytes(benchmark, ce.bytes_per_elem(case.z.element_size()) * case.numel)


@pytest.mark.parametrize("device, provider, mode, dtype, numel", SITE_PARAMS)
def test_site_penalty(benchmark, device, provider, mode, dtype, numel):
    case = site_penalty.Case(dtype, numel, device)
    fn = site_penalty.providers(device, P_DROP)[provider]()
    call = _synchronized(site_penalty.mode_fn(fn, mode, case), device)
    call()  # warm-up (and compile) outside the timed rounds
    benchmark.group = f"site {mode} {dtype_name(dtype)} {size_label(numel)} {device.type}"
    benchmark(call)
    _record_bytes(benchmark, site_penalty.bytes_per_elem(mode, case.inputs[0].element_size()) * numel)


def _record_bytes(benchmark, nbytes: int) -> None:
    benchmark.extra_info["bytes_min"] = nbytes
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps_eff"] = nbytes / benchmark.stats.stats.median / 1e9
