"""Dropout kinds and layouts against their floor: a ``channels_last`` input to element-wise dropout,
channel dropout (``Dropout2d``) and locked (variational) dropout, at one size (the largest float32 size
of the preset), each timed with torch's version, ours and the floor in interleaved rounds.

The floor is the cheapest op moving the same bytes (read x, write y; plus read g, write dx for
fwd+bwd): ``torch.mul`` with a fresh output on the same tensor (which keeps its layout, as dropout
must). ``of_floor`` = floor median / provider median (1.0: at the floor).

Providers: ``eager`` (``F.dropout`` on the channels_last tensor, ``nn.Dropout2d``, and for locked
dropout, which torch has no module for, ``x * bernoulli((1, B, H)) / (1-p)``), ``ours``
(``dr.functional.dropout``, ``dr.Dropout2d``, ``dr.LockedDropout`` on the native backend of the
device) and ``floor``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import dropreg_ext as dr

from .config import Config, dtype_name
from .dropout import FLOOR, add_floor_ratios, add_ratios, our_backends
from .measure import run_cases, time_fns, timed_row

MODES = ("fwd", "fwd+bwd")
KINDS = ("channels_last", "dropout2d", "locked")


def _shape(kind: str, numel: int) -> tuple:
    """(N, C, H, W) images for the first two, (T, B, H) sequences for locked dropout, of ``numel``."""
    if kind == "locked":
        return (128, 64, numel // (128 * 64))
    side = int(round((numel // (16 * 64)) ** 0.5))
    return (16, 64, side, numel // (16 * 64 * side))


def _providers(kind: str, p: float, backend: str) -> dict:
    if kind == "channels_last":
        ours = dr.Dropout(p)
        return {"eager": lambda x: F.dropout(x, p, training=True), "ours": ours}
    if kind == "dropout2d":
        return {"eager": torch.nn.Dropout2d(p), "ours": dr.Dropout2d(p)}

    def eager_locked(x: torch.Tensor) -> torch.Tensor:
        mask = torch.bernoulli(x.new_full((1, *x.shape[1:]), 1 - p)) / (1 - p)
        return x * mask

    return {"eager": eager_locked, "ours": dr.LockedDropout(p)}


def _mode_call(fn: Callable, mode: str, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    if mode == "fwd":
        return lambda: fn(x.detach())
    return lambda: torch.autograd.grad(fn(x), x, g)


def case_keys(cfg: Config) -> list:
    return [(kind, max(cfg.sizes["float32"])) for kind in KINDS]


def run_case(kind: str, numel: int, cfg: Config) -> list:
    device = cfg.device
    shape = _shape(kind, numel)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device)
    g = torch.randn(shape, generator=gen, device=device)
    if kind == "channels_last":
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    x_grad = x.clone().requires_grad_()
    backend = our_backends(device)[0]
    out = torch.empty_like(x)
    calls = {
        ("copy", "copy"): lambda: out.copy_(x),
        (FLOOR, "fwd"): lambda: torch.mul(x, 2.0),
        (FLOOR, "fwd+bwd"): lambda: (torch.mul(x, 2.0), torch.mul(g, 2.0)),
    }
    with dr.use_backend(backend):
        for name, fn in _providers(kind, cfg.p, backend).items():
            calls.update({(name, mode): _mode_call(fn, mode, x_grad, g) for mode in MODES})
        timings = time_fns(calls, device, cfg.op_reps)
    s = x.element_size()
    copy_gbps = 2 * s * x.numel() / (timings[("copy", "copy")].median_ms / 1e3) / 1e9
    rows = [
        timed_row("kinds", kind, provider, mode, x.dtype, t, (2 if mode in ("fwd", "copy") else 4) * s * x.numel(),
                  copy_gbps, numel=x.numel(), shape="x".join(map(str, shape)), backend=backend)
        for (provider, mode), t in timings.items()
    ]
    add_ratios(rows)
    add_floor_ratios(rows)
    return rows


def run(cfg: Config, progress: Callable[[str], None]) -> list:
    return run_cases(case_keys(cfg), lambda kind, numel: f"kinds {kind} {dtype_name(torch.float32)}",
                     lambda kind, numel: run_case(kind, numel, cfg), progress)
