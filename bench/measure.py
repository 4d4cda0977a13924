"""Timing and peak memory of a zero-argument function, on CPU or CUDA.

Timing: ``warmup`` untimed calls, then repeated timed calls in interleaved rounds (see
:func:`time_fns` and :class:`bench.config.Reps`).
On CUDA each sample is a pair of ``torch.cuda.Event`` around ``k`` back-to-back calls, after
zeroing a 256 MiB buffer so that the first call's inputs are not served from L2 (as
``triton.testing.do_bench`` does); ``k`` is chosen once per function so that a sample lasts at least
:data:`MIN_SAMPLE_S` (an event pair around one short kernel measures launch latency, not the
kernel), and the sample is the batch's time over ``k``. On CPU, one call per sample, timed with
``time.perf_counter``. We report the median and the 20th/80th percentiles of the samples.

Peak memory: bytes allocated above what was live when the function started, at the worst moment.
On CUDA that is ``torch.cuda.max_memory_allocated`` after a reset. On CPU there is no allocator
statistic, so the function runs once under ``torch.profiler`` with ``profile_memory=True``: the
profiler records every allocation and free of the c10 CPU allocator (every tensor's storage) with a
timestamp, and the running sum of those events, in time order, peaks at the answer.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import torch

from .config import Reps

_L2_FLUSH_BYTES = 256 * 2**20
MIN_SAMPLE_S = 5e-4  # CUDA: calls are batched until a sample lasts this long
MAX_BATCH = 64


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
    """Times a batch of back-to-back calls with CUDA events after flushing L2 with a memset of a
    large buffer; returns the seconds per call."""

    def __init__(self, device: torch.device) -> None:
        self.flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        self.batch: dict = {}

    def calibrate(self, fn: Callable[[], object]) -> None:
        """The batch size of ``fn``: enough calls for a sample of MIN_SAMPLE_S (from one timed call)."""
        self.batch[fn] = 1
        one = self(fn)
        self.batch[fn] = max(1, min(MAX_BATCH, math.ceil(MIN_SAMPLE_S / max(one, 1e-7))))

    def __call__(self, fn: Callable[[], object]) -> float:
        calls = self.batch.get(fn, 1)
        self.flush.zero_()
        self.start.record()
        for _ in range(calls):
            fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3 / calls


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
        for fn in fns.values():
            timer.calibrate(fn)
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


@dataclasses.dataclass
class ElementwiseCase:
    """One (dtype, n) point of an elementwise benchmark. A section's subclass, a dataclass too (so that
    its ``__init__`` calls its ``__post_init__``), makes there the tensors every provider of the point shares."""

    dtype: torch.dtype
    numel: int
    device: torch.device


def run_cases(keys: list, label: Callable[..., str], run_case: Callable[..., list],
              progress: Callable[[str], None]) -> list:
    """The rows of every case of a section, case by case in the order of ``keys``:
    ``progress(label(*key))`` is called before ``run_case(*key)``."""
    rows = []
    for key in keys:
        progress(label(*key))
        rows += run_case(*key)
    return rows


def seeded_randn(count: int, shape, dtype: torch.dtype, device: torch.device) -> list:
    """``count`` standard normal tensors of ``shape`` from one generator seeded 0 on ``device``:
    every provider of a case sees the same inputs, every run the same values."""
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(count)]


def timed_row(section: str, case: str, provider: str, mode: str, dtype: torch.dtype, timing: Timing,
              bytes_min: int, copy_gbps: float, **fields) -> dict:
    """One result row: what was timed, the timing, the bytes counted by hand, and the effective
    GB/s (``bytes_min`` over the median) as a percentage of the copy's GB/s measured in the same
    rounds. ``fields`` adds the section's own columns (sizes, own bytes)."""
    gbps = bytes_min / (timing.median_ms / 1e3) / 1e9
    return {
        "section": section,
        "case": case,
        "provider": provider,
        "mode": mode,
        "dtype": str(dtype).removeprefix("torch."),
        **fields,
        **dataclasses.asdict(timing),
        "bytes_min": bytes_min,
        "gbps_eff": gbps,
        "pct_copy": 100 * gbps / copy_gbps,
    }
