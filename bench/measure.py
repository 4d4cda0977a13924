"""Timing and peak memory of a zero-argument function, on CPU or CUDA.

Timing: ``warmup`` untimed calls, then repeated timed calls in interleaved rounds (see
:func:`time_fns` and :class:`bench.config.Reps`).
On CUDA each call is timed with a pair of ``torch.cuda.Event`` around it, after zeroing a 256 MiB
buffer so that no input is served from L2 (as ``triton.testing.do_bench`` does); on CPU with
``time.perf_counter``. We report the median and the 20th/80th percentiles of the samples.

Peak memory: bytes allocated above what was live when the function started, at the worst moment.
On CUDA that is ``torch.cuda.max_memory_allocated`` after a reset. On CPU there is no allocator
statistic, so the function runs once under ``torch.profiler`` with ``profile_memory=True``: the
profiler records every allocation and free of the c10 CPU allocator (every tensor's storage) with a
timestamp, and the running sum of those events, in time order, peaks at the answer.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

from .config import Reps

_L2_FLUSH_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class Timing:
    """Summary of timed calls, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    @classmethod
    def from_samples(cls, samples_s: list) -> "Timing":
        ms = sorted(1e3 * s for s in samples_s)
        if len(ms) == 1:
            return cls(ms[0], ms[0], ms[0], 1)
        p20, *_, p80 = statistics.quantiles(ms, n=5, method="inclusive")
        return cls(statistics.median(ms), p20, p80, len(ms))


def _cpu_call_s(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _CudaTimer:
    """Times one call with CUDA events after flushing L2 with a memset of a large buffer."""

    def __init__(self, device: torch.device) -> None:
        self.flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        self.flush.zero_()
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


def time_fns(fns: dict, device: torch.device, reps: Reps) -> dict:
    """Median and spread of each function's run time on ``device`` (same keys as ``fns``).

    The functions are timed in interleaved rounds, one call of each per round, so that a change of
    load on a shared machine hits all of them alike and their ratios stay fair. Rounds continue
    until ``reps.budget_s`` per function is spent, at least ``reps.min_reps`` and at most
    ``reps.max_reps`` of them.
    """
    timer = _CudaTimer(device) if device.type == "cuda" else _cpu_call_s
    for fn in fns.values():
        for _ in range(reps.warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples = {key: [] for key in fns}
    deadline = time.perf_counter() + reps.budget_s * len(fns)
    rounds = 0
    while rounds < reps.max_reps and (rounds < reps.min_reps or time.perf_counter() < deadline):
        for key, fn in fns.items():
            samples[key].append(timer(fn))
        rounds += 1
    return {key: Timing.from_samples(times) for key, times in samples.items()}


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The per-allocation timeline lives in the raw kineto results; FunctionEvents only keep the
    # net allocation of each op, which cannot give a peak.
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` above those live before it.

    ``fn`` must drop what it allocates (return nothing) and should have run once already, so that
    one-time allocations (compiled kernels, optimizer state) are not counted.
    """
    if device.type == "cuda":
        return _cuda_peak_bytes(fn, device)
    return _cpu_peak_bytes(fn)
