"""Run presets: which sizes, dtypes and how many repetitions each ``--quick`` / ``--full`` run uses.

``--quick`` is sized to finish in under 5 minutes on 2 CPU cores, all four sections together (it is
the default); ``--check`` is the short GPU run of ``bench/gpu_check.sh`` (the sizes its verdict is
stated for, without the torch.compile baselines); ``--full`` is meant for GPUs: every second power of
two from 2^16 to 2^26 for the elementwise ops, vocabularies of 1k to 128k classes for the
cross-entropy, more repetitions, larger models. On a GPU the training steps run under bfloat16
autocast with TF32 matrix products (:attr:`Config.train_autocast`), as GPU users train.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

P_DROP = 0.5


@dataclasses.dataclass(frozen=True)
class Reps:
    """How functions are repeated: ``warmup`` untimed calls each, then timed rounds (one call of each
    function per round) until ``budget_s`` seconds per function are spent, at least ``min_reps``
    and at most ``max_reps`` rounds."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs to know; built by :func:`make_config`."""

    preset: str  # "quick" | "check" | "full"
    device: torch.device
    sizes: dict  # dtype name -> tuple of element counts for the per-op dropout cases
    p: float
    op_reps: Reps  # per-op dropout and site-penalty cases
    train_reps: Reps
    train_scale: str  # "small" | "large": model sizes of the training cases (bench/train.py)
    # How the training steps run on the device, as its users train: on a GPU the forward and the loss
    # under autocast to this dtype, and TF32 for the float32 matrix products that remain; None / False:
    # float32 throughout (the CPU).
    train_autocast: Optional[str]
    train_tf32: bool
    ce_shapes: dict  # dtype name -> tuple of (rows N, classes C) for the cross-entropy cases
    ce_reps: Reps
    site_sizes: dict  # dtype name -> tuple of element counts for the site-penalty cases
    budget_s: dict  # section -> seconds it is planned to take (quick on CPU only; printed with the elapsed time)
    compile_baseline: bool  # time torch.compile of the eager code beside eager in the per-op sections

    @property
    def dtypes(self) -> list:
        return [getattr(torch, name) for name in self.sizes]


CE_ROWS = 2048


def _ce(*classes: int) -> tuple:
    return tuple((CE_ROWS, c) for c in classes)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _pow2(*exponents: int) -> tuple:
    return tuple(2**e for e in exponents)


def make_config(preset: str, device: torch.device) -> Config:
    """The preset for ``device``. Quick on CPU is the one budgeted to 5 minutes on 2 cores; it keeps
    the sizes the acceptance checks are stated for (bench/checks.py): dropout at 2^24 float32 and bfloat16,
    cross-entropy at N = 2048, C = 10k float32, the training cases at their "small" scale."""
    on_gpu = device.type == "cuda"
    if preset == "quick" and not on_gpu:
        sizes = {"float32": _pow2(16, 20, 24), "bfloat16": _pow2(16, 20, 24)}
        # One warm-up call suffices (it compiles the torch.compile provider); the largest case then
        # costs 11 calls of every provider and mode (5 left the 3x check to noise). The sweep keeps
        # 3 sizes per dtype, 2^24 for the floor checks of both: every size costs two torch.compile
        # runs (~10 s each with a cold inductor cache). The cross-entropy cases: N = 2048 up to C = 10k, and
        # GPT-2's and a 128k vocabulary on fewer rows (N·C ~ 2.6e7 and 1.7e7: eager's softmax + multinomial
        # takes ~1 s per call there).
        op_reps = Reps(warmup=1, min_reps=10, max_reps=200, budget_s=0.25)
        ce_shapes = {"float32": _ce(1000, 10_000) + ((512, 50_257), (128, 131_072)), "bfloat16": _ce(1000, 10_000)}
        ce_reps = Reps(warmup=1, min_reps=5, max_reps=100, budget_s=0.5)
        site_sizes = {"float32": _pow2(16, 20, 22)}
        train_reps = Reps(warmup=1, min_reps=5, max_reps=30, budget_s=2.0)
        budget = {"dropout": 130, "ce": 120, "site": 30, "train": 60}  # cold inductor cache, load average 4.5
        scale = "small"
    elif preset == "quick":
        sizes = {"float32": _pow2(16, 18, 20, 22, 24), "bfloat16": _pow2(16, 18, 20, 22, 24)}
        op_reps = Reps(warmup=1, min_reps=10, max_reps=200, budget_s=0.1)
        ce_shapes = {"float32": _ce(1000, 10_000, 32_000, 128_000), "bfloat16": _ce(10_000, 128_000)}
        ce_reps = Reps(warmup=1, min_reps=10, max_reps=200, budget_s=0.1)
        site_sizes = {"float32": _pow2(16, 20, 24), "bfloat16": _pow2(20, 24)}
        train_reps = Reps(warmup=1, min_reps=8, max_reps=50, budget_s=0.5)
        budget = {}
        scale = "small"
    elif preset == "check":
        # bench/gpu_check.sh: the dropout sizes of its verdict (fwd+bwd against eager at 2^16 and at
        # every power of two from 2^20 to 2^26, float32 and bfloat16), without torch.compile (a build
        # of several seconds per size, and no verdict needs it); the cross-entropy and site sizes of
        # the acceptance checks (2^24 float32, N = 2048 at C = 10k) plus the HBM-sized points.
        sizes = {name: _pow2(16, *range(20, 27)) for name in ("float32", "bfloat16")}
        op_reps = Reps(warmup=3, min_reps=10, max_reps=200, budget_s=0.03)
        ce_shapes = {"float32": ((2048, 10_000), (512, 50_257)), "bfloat16": ((2048, 32_000),)}
        ce_reps = Reps(warmup=3, min_reps=10, max_reps=200, budget_s=0.03)
        site_sizes = {"float32": _pow2(24), "bfloat16": _pow2(24)}
        train_reps = Reps(warmup=2, min_reps=5, max_reps=50, budget_s=0.3)
        budget = {}
        scale = "large" if on_gpu else "small"
    elif preset == "full":
        sizes = {"float32": _pow2(16, 18, 20, 22, 24, 26), "bfloat16": _pow2(16, 18, 20, 22, 24, 26)}
        op_reps = Reps(warmup=5, min_reps=30, max_reps=2000, budget_s=0.15 if on_gpu else 2.0)
        ce_shapes = {name: _ce(1000, 10_000, 32_000, 128_000) for name in ("float32", "bfloat16")}
        ce_reps = Reps(warmup=3, min_reps=20, max_reps=1000, budget_s=0.15 if on_gpu else 2.0)
        site_sizes = dict(sizes)
        train_reps = Reps(warmup=3, min_reps=20, max_reps=200, budget_s=1.0 if on_gpu else 10.0)
        budget = {}
        scale = "large" if on_gpu else "small"
    else:
        raise ValueError(f"preset must be 'quick', 'check' or 'full', got {preset!r}")
    return Config(
        preset, device, sizes, P_DROP, op_reps, train_reps, scale, "bfloat16" if on_gpu else None, on_gpu,
        ce_shapes, ce_reps, site_sizes, budget, compile_baseline=preset != "check",
    )
