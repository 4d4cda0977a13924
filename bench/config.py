"""Run presets: which sizes, dtypes and how many repetitions each ``--quick`` / ``--full`` run uses.

``--quick`` is sized to finish in under 5 minutes on 2 CPU cores (it is the default); ``--full`` is
meant for GPUs: every second power of two from 2^16 to 2^26, more repetitions, larger models.
"""

from __future__ import annotations

import dataclasses

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

    preset: str  # "quick" | "full"
    device: torch.device
    sizes: dict  # dtype name -> tuple of element counts for the per-op dropout cases
    p: float
    op_reps: Reps
    train_reps: Reps
    train_scale: str  # "small" | "large": model sizes of the training cases (bench/train.py)

    @property
    def dtypes(self) -> list:
        return [getattr(torch, name) for name in self.sizes]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def size_label(numel: int) -> str:
    """``65536`` -> ``"2^16"`` (other numbers as they are)."""
    return f"2^{numel.bit_length() - 1}" if numel > 0 and numel & (numel - 1) == 0 else str(numel)


def _pow2(*exponents: int) -> tuple:
    return tuple(2**e for e in exponents)


def make_config(preset: str, device: torch.device) -> Config:
    """The preset for ``device``. Quick on CPU is the one budgeted to 5 minutes on 2 cores: its
    largest case, 2^24 float32, is the size the acceptance checks are stated for."""
    on_gpu = device.type == "cuda"
    if preset == "quick":
        sizes = {
            "float32": _pow2(16, 18, 20, 22, 24),
            "bfloat16": _pow2(16, 20, 22) if not on_gpu else _pow2(16, 18, 20, 22, 24),
        }
        # One warm-up call suffices (it compiles the torch.compile provider); the largest CPU case
        # then costs 11 calls of every provider and mode, the bulk of the 5-minute budget.
        op_reps = Reps(warmup=1, min_reps=10, max_reps=200, budget_s=0.25 if not on_gpu else 0.1)
        train_reps = Reps(warmup=1, min_reps=8, max_reps=50, budget_s=1.5 if not on_gpu else 0.5)
        scale = "small"
    elif preset == "full":
        sizes = {"float32": _pow2(16, 18, 20, 22, 24, 26), "bfloat16": _pow2(16, 18, 20, 22, 24, 26)}
        op_reps = Reps(warmup=5, min_reps=30, max_reps=2000, budget_s=0.15 if on_gpu else 2.0)
        train_reps = Reps(warmup=3, min_reps=20, max_reps=200, budget_s=1.0 if on_gpu else 10.0)
        scale = "large" if on_gpu else "small"
    else:
        raise ValueError(f"preset must be 'quick' or 'full', got {preset!r}")
    return Config(preset, device, sizes, P_DROP, op_reps, train_reps, scale)
