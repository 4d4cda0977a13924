"""Per-op site penalty: the two sums of one regularizer site (docs/design.md §2) over n elements,

    [Σ (g_e ⊙ h)²,  Σ g_i ⊙ η ⊙ h],   η = ±sqrt(q/(1-q)) (Rademacher), q = the dropout p of the run.

Providers: ours, per backend that runs natively on the device (``ops.site_penalty(h, g_e, g_i, q,
"rademacher", rng)``: one pass, η drawn in-kernel, regenerated in backward); ``eager``: the same sums
in torch ops with η from ``torch.randint`` (a stored noise tensor); ``compile``: ``torch.compile`` of
the eager function (static shapes, recompiled for each case).

Modes: ``fwd`` (inputs without grad) and ``fwd+bwd`` (``torch.autograd.grad`` of both sums, output
gradient [1, 1], w.r.t. h, g_e and g_i). Peak memory is taken on ``fwd+bwd``.

Bytes (``bytes_min``, the same count for every provider), per element of itemsize s: fwd reads h,
g_e, g_i (3s); backward reads them again and writes dh, dg_e, dg_i (6s); fwd+bwd 9s. η is not
counted: ours never stores it. ``pct_copy`` compares with ``y.copy_(x)`` of n elements (2s).

The floor (``of_floor``), the cheapest ops moving those bytes, timed in the same rounds: ``fwd``
sums h, g_e and g_i (three reads); ``fwd+bwd`` adds a fresh ``torch.mul(t, 2.0)`` of each (three
more reads and three fresh writes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

import dropreg_ext as dr

from .checks import size_label
from .config import Config, dtype_name
from .dropout import FLOOR, case_rows, fresh_compile, our_backends
from .measure import ElementwiseCase, Timing, run_cases, seeded_randn, time_fns, timed_row

MODES = ("fwd", "fwd+bwd")
NOISE = "rademacher"
SiteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def eager_site_penalty(q: float) -> SiteFn:
    """``fn(h, g_e, g_i) -> [Σ (g_e h)², Σ g_i η h]`` in eager torch ops, η Rademacher by randint."""
    amplitude = math.sqrt(q / (1 - q))

    def fn(h: torch.Tensor, g_e: torch.Tensor, g_i: torch.Tensor) -> torch.Tensor:
        sign = torch.randint(0, 2, h.shape, dtype=h.dtype, device=h.device) * 2 - 1
        return torch.stack([((g_e * h) ** 2).sum(), (g_i * (sign * amplitude) * h).sum()])

    return fn


def ours_site_penalty(backend: str, q: float) -> SiteFn:
    def fn(h: torch.Tensor, g_e: torch.Tensor, g_i: torch.Tensor) -> torch.Tensor:
        return dr.ops.site_penalty(h, g_e, g_i, q, NOISE, dr.ops.make_rng(h.device), backend=backend)

    return fn


def providers(device: torch.device, q: float, with_compile: bool = True) -> dict:
    """Provider name -> a ``make()`` returning ``fn(h, g_e, g_i)``; compile compiles afresh."""
    makers = {"eager": lambda: eager_site_penalty(q)}
    if with_compile:
        makers["compile"] = lambda: fresh_compile(eager_site_penalty(q))
    makers.update({b: (lambda b=b: ours_site_penalty(b, q)) for b in our_backends(device)})
    return makers


def bytes_per_elem(mode: str, itemsize: int) -> int:
    return {"copy": 2, "fwd": 3, "fwd+bwd": 9}[mode] * itemsize


@dataclasses.dataclass
class Case(ElementwiseCase):
    """One (dtype, n) point: h, g_e, g_i (and copies requiring grad) shared by every provider."""

    def __post_init__(self) -> None:
        self.inputs = seeded_randn(3, self.numel, self.dtype, self.device)
        self.inputs_grad = [t.clone().requires_grad_() for t in self.inputs]
        self.grad_out = torch.ones(2, device=self.device, dtype=torch.float32)


def floor_fns(h: torch.Tensor, g_e: torch.Tensor, g_i: torch.Tensor) -> dict:
    """Mode -> the floor's zero-argument closure (see the module docstring)."""

    def reads() -> tuple:
        return h.sum(), g_e.sum(), g_i.sum()

    return {"fwd": reads, "fwd+bwd": lambda: (reads(), *(torch.mul(t, 2.0) for t in (h, g_e, g_i)))}


def mode_fn(fn: SiteFn, mode: str, case: Case) -> Callable[[], None]:
    """A zero-argument closure doing one ``mode`` pass of ``fn`` on the case's tensors."""

    def fwd() -> None:
        fn(*case.inputs)

    def fwd_bwd() -> None:
        out = fn(*case.inputs_grad)
        torch.autograd.grad(out, case.inputs_grad, case.grad_out.to(out.dtype))

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return fwd if mode == "fwd" else fwd_bwd


def case_keys(cfg: Config) -> list:
    """(dtype, n) of every case, in run order."""
    return [(getattr(torch, name), n) for name, sizes in cfg.site_sizes.items() for n in sizes]


def _row(case: Case, provider: str, mode: str, timing: Timing, copy_gbps: float) -> dict:
    nbytes = bytes_per_elem(mode, case.inputs[0].element_size()) * case.numel
    return timed_row("site", "site_penalty", provider, mode, case.dtype, timing, nbytes, copy_gbps, numel=case.numel)


def run_case(case: Case, cfg: Config) -> list:
    """Every provider and mode on one case, timed in interleaved rounds with ``y.copy_(x)``."""
    x = case.inputs[0]
    out = torch.empty_like(x)
    calls = {("copy", "copy"): lambda: out.copy_(x)}
    calls.update({(FLOOR, mode): fn for mode, fn in floor_fns(*case.inputs).items()})
    for name, make in providers(cfg.device, cfg.p, cfg.compile_baseline).items():
        fn = make()
        calls.update({(name, mode): mode_fn(fn, mode, case) for mode in MODES})
    timings = time_fns(calls, cfg.device, cfg.op_reps)
    copy_s = timings[("copy", "copy")].median_ms / 1e3
    copy_gbps = bytes_per_elem("copy", x.element_size()) * case.numel / copy_s / 1e9
    return case_rows(timings, calls, lambda key, timing: _row(case, *key, timing, copy_gbps),
                     lambda key: key[1] == "fwd+bwd" and key[0] != FLOOR, cfg.device)


def run(cfg: Config, progress: Callable[[str], None]) -> list:
    """All site-penalty cases of ``cfg``; ``progress(label)`` is called before each case."""
    return run_cases(case_keys(cfg), lambda dtype, numel: f"site {dtype_name(dtype)} n={size_label(numel)}",
                     lambda dtype, numel: run_case(Case(dtype, numel, cfg.device), cfg), progress)
