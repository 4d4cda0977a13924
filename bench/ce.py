"""Per-op cross-entropy with a sampled label: for N rows of C logits z, the per-row loss
CE(z_r, y_r), a label ŷ_r ~ softmax(z_r) and the gradient G = softmax(z) - onehot(ŷ) (the
cotangent of the regularizer's explicit term, docs/design.md §2). One mode, ``sample+grad``: all three
outputs from z and y, nothing requiring grad.

Providers:

* ours, per backend that runs natively on the device (:func:`bench.dropout.our_backends`):
  ``loss, lse, ŷ, G = ops.cross_entropy_sample_grad(z, y, rng)`` (one op: max, log-sum-exp, the
  true-label loss, a Gumbel-max ŷ and G from the row the sample read), what ``DropoutRegularizer``
  runs; ``<backend>-2op``: the two-op path ``cross_entropy_sample`` then ``ce_grad`` (z read twice);
* ``eager``: ``F.cross_entropy(z, y, reduction="none")``, ``p = torch.softmax(z)``,
  ``ŷ = torch.multinomial(p, 1)``, ``G = p - F.one_hot(ŷ, C)``: the same outputs;
* ``compile``: ``torch.compile`` of the eager function (static shapes, recompiled for each case).

Bytes (``bytes_min``, the same count for every provider, so GB/s compare like with like): the least
any provider moves, z read once and G written once, ``2 · s · N · C`` for itemsize s (the (N,)
vectors y, loss, lse, ŷ are left out: under 0.1% at C >= 1k). ``pct_copy`` divides that GB/s by the
GB/s of ``out.copy_(z)`` (the same ``2 · s · N · C`` bytes) timed in the same rounds.

The floor (``of_floor``): ``torch.mul(z, z2)`` with z2 a second tensor of z's shape, the cheapest op
that moves the two-op path's bytes (two reads of N x C and one fresh write), timed in the same
rounds. (Until the results of 2026-12-05 it was ``torch.add(z, z2)``, which moves the same bytes;
on an Intel Xeon VM its fresh bfloat16 form took 1.5x the time of ``torch.mul``'s, a floor that is
not the cheapest.) On the CPU most of its time is the page faults of its fresh output (4 KiB at a time), so
``floor-warm``, the same product into an output whose pages are already mapped, is timed too: the cost
of the bytes alone. Ours takes the same 4 KiB faults on G, but one thread maps G's pages ahead of
the rows being computed so the faults overlap the compute (csrc/cpu/fresh_output.h).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

import dropreg_ext as dr

from .config import Config, dtype_name
from .dropout import FLOOR, case_rows, fresh_compile, our_backends
from .measure import Timing, run_cases, time_fns, timed_row

MODE = "sample+grad"
FLOOR_WARM = FLOOR + "-warm"  # the floor's product into an output whose pages are mapped already
CeFn = Callable[[torch.Tensor, torch.Tensor], tuple]


def eager_ce_sample(z: torch.Tensor, y: torch.Tensor) -> tuple:
    """(per-row loss, ŷ ~ softmax(z), softmax(z) - onehot(ŷ)) in eager PyTorch ops."""
    loss = F.cross_entropy(z, y, reduction="none")
    p = torch.softmax(z, dim=-1)
    yhat = torch.multinomial(p, 1).squeeze(1)
    return loss, yhat, p - F.one_hot(yhat, z.shape[1]).to(p.dtype)


def ours_ce_sample(backend: str) -> CeFn:
    """(per-row loss, ŷ, G) by the fused op of ``backend``."""

    def fn(z: torch.Tensor, y: torch.Tensor) -> tuple:
        loss, _, yhat, grad = dr.ops.cross_entropy_sample_grad(z, y, dr.ops.make_rng(z.device), backend=backend)
        return loss, yhat, grad

    return fn


def ours_ce_sample_two_ops(backend: str) -> CeFn:
    """(per-row loss, ŷ, G) by ``cross_entropy_sample`` then ``ce_grad`` of ``backend``."""

    def fn(z: torch.Tensor, y: torch.Tensor) -> tuple:
        loss, lse, yhat = dr.ops.cross_entropy_sample(z, y, dr.ops.make_rng(z.device), backend=backend)
        return loss, yhat, dr.ops.ce_grad(z, lse, yhat, torch.ones_like(lse), backend=backend)

    return fn


TWO_OPS = "-2op"  # suffix of the two-op providers


def providers(device: torch.device, with_compile: bool = True) -> dict:
    """Provider name -> a ``make()`` returning ``fn(z, y) -> (loss, ŷ, G)``; compile compiles afresh."""
    makers = {"eager": lambda: eager_ce_sample}
    if with_compile:
        makers["compile"] = lambda: fresh_compile(eager_ce_sample)
    for b in our_backends(device):
        makers[b] = lambda b=b: ours_ce_sample(b)
        makers[b + TWO_OPS] = lambda b=b: ours_ce_sample_two_ops(b)
    return makers


def bytes_per_elem(itemsize: int) -> int:
    """Read z and write G, once each, per logit."""
    return 2 * itemsize


@dataclasses.dataclass
class Case:
    """One (dtype, N, C) point: logits and targets every provider shares."""

    dtype: torch.dtype
    rows: int
    classes: int
    device: torch.device

    def __post_init__(self) -> None:
        gen = torch.Generator(device=self.device).manual_seed(0)
        z = torch.randn(self.rows, self.classes, generator=gen, device=self.device)
        self.z = (2 * z).to(self.dtype)  # logits of a trained-ish model: softmax not flat
        self.z2 = torch.randn(self.rows, self.classes, generator=gen, device=self.device).to(self.dtype)  # the floor's
        self.y = torch.randint(0, self.classes, (self.rows,), generator=gen, device=self.device)

    @property
    def numel(self) -> int:
        return self.rows * self.classes


def case_keys(cfg: Config) -> list:
    """(dtype, N, C) of every case, in run order."""
    return [(getattr(torch, name), n, c) for name, shapes in cfg.ce_shapes.items() for n, c in shapes]


def _row(case: Case, provider: str, mode: str, timing: Timing, copy_gbps: float) -> dict:
    s = case.z.element_size()
    nbytes = (bytes_per_elem(s) if mode == MODE else 2 * s) * case.numel
    return timed_row("ce", "ce_sample", provider, mode, case.dtype, timing, nbytes, copy_gbps, rows=case.rows,
                     classes=case.classes, numel=case.numel)


def case_call(fn: CeFn, case: Case) -> Callable[[], None]:
    """A zero-argument closure doing one call of ``fn`` on the case's tensors."""
    def call() -> None:
        fn(case.z, case.y)  # the outputs are allocated (and count in the peak), then dropped

    return call


def run_case(case: Case, cfg: Config) -> list:
    """Every provider on one case, timed in interleaved rounds with ``out.copy_(z)``; peak memory of
    one call each."""
    out = torch.empty_like(case.z)
    warm = torch.mul(case.z, case.z2)  # its pages are mapped from here on
    calls = {
        "copy": lambda: out.copy_(case.z),
        FLOOR: lambda: torch.mul(case.z, case.z2),
        FLOOR_WARM: lambda: torch.mul(case.z, case.z2, out=warm),
    }
    for name, make in providers(cfg.device, cfg.compile_baseline).items():
        calls[name] = case_call(make(), case)
    timings = time_fns(calls, cfg.device, cfg.ce_reps)
    copy_gbps = 2 * case.z.element_size() * case.numel / (timings["copy"].median_ms / 1e3) / 1e9
    return case_rows(timings, calls, lambda name, t: _row(case, name, "copy" if name == "copy" else MODE, t, copy_gbps),
                     lambda name: name not in ("copy", FLOOR, FLOOR_WARM), cfg.device)


def run(cfg: Config, progress: Callable[[str], None]) -> list:
    """All cross-entropy cases of ``cfg``; ``progress(label)`` is called before each case."""
    return run_cases(case_keys(cfg), lambda dtype, n, c: f"ce {dtype_name(dtype)} N={n} C={c}",
                     lambda dtype, n, c: run_case(Case(dtype, n, c, cfg.device), cfg), progress)
