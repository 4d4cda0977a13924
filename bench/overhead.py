"""Host cost per call: each public call of ours against torch's counterpart on tiny tensors, where the
kernel is nothing and the host path (Python, dispatch, autograd, launches) is everything.

On a GPU the host path decides a call's time up to ~2^24 elements (bench/results/cuda-h200): it
does not depend on the device, so it is measured on whatever device runs the benchmark, 16
elements per tensor, one thread. Pairs (``torch`` vs ``ours``):

* ``dropout fwd``: ``F.dropout(x, p)`` vs ``dr.functional.dropout(x, p)``;
* ``dropout fwd+bwd``: the same and the gradient in x (``torch.autograd.grad(y, x, g)``);
* ``module fwd+bwd``: ``nn.Dropout(p)(x)`` vs ``dr.Dropout(p)(x)``, and the gradient;
* ``cross-entropy fwd+bwd``: ``F.cross_entropy(z, t)`` vs ``dr.ops.cross_entropy_sample_grad(z, t)``
  (loss, lse, ŷ and the sampled gradient in one op), and the gradient in z; z (4, 4);
* ``site fwd+bwd``: ``F.dropout`` fwd+bwd vs ``dr.ops.site_penalty(h, g_e, g_i, q, noise)`` and its
  gradients in h, g_e, g_i (one elementwise op each way, the nearest torch counterpart).

Gradients are taken with ``torch.autograd.grad``, as they pass through such ops inside a model, not
accumulated into leaves' ``.grad`` (which adds an ``add_`` per leaf per call).

Timing: the two calls alternate in rounds (interleaved, so a drift of the machine hits both); a
round times ``CALLS`` back-to-back calls of one side and the figure is the median over rounds of
µs per call. On CUDA each round ends with a synchronize (tiny tensors: the device is idle, the
host path is the time). ``ratio`` = ours / torch.

Ops dispatched per call (:class:`OpCounter`, a ``TorchDispatchMode``): the tensor ops each side
issues below autograd, forward and backward separately; on a GPU each is a launch at least. Ours
should be exactly its kernels: dropout 1 + 1, the cross-entropy 1 + 1, the site penalty 1 + 1.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dropreg_ext as dr

from .config import Config

NUMEL = 16
P = 0.5
CALLS = 200  # calls per timed round
ROUNDS = {"quick": 31, "check": 15, "full": 101}


class OpCounter(TorchDispatchMode):
    """Records the ops dispatched below autograd while it is active, by name (``ops``), but those
    that launch nothing: views (``detach``, ``view``, ...) and the ``prim`` metadata queries that fake
    tensors dispatch (``prim.device``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.namespace != "prim":
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@dataclasses.dataclass(frozen=True)
class Call:
    """One side of a pair: ``forward()`` returns what ``backward(out)`` differentiates (None: no backward)."""

    forward: Callable[[], object]
    backward: Callable[[object], None] | None = None

    def __call__(self) -> None:
        out = self.forward()
        if self.backward is not None:
            self.backward(out)

    def count(self) -> tuple:
        """(ops of the forward, ops of the backward) of one call."""
        with OpCounter() as fwd:
            out = self.forward()
        if self.backward is None:
            return fwd.ops, []
        with OpCounter() as bwd:
            self.backward(out)
        return fwd.ops, bwd.ops


def pairs(device: torch.device) -> dict:
    """Case name -> (torch's Call, our Call), on tiny tensors of ``device``."""
    x = torch.randn(NUMEL, device=device)
    xg = x.clone().requires_grad_()
    g = torch.ones_like(x)
    z = torch.randn(4, NUMEL // 4, device=device, requires_grad=True)
    t = torch.randint(0, NUMEL // 4, (4,), device=device)
    g_rows = torch.ones(4, device=device)
    h, g_e, g_i = (torch.randn(NUMEL, device=device, requires_grad=True) for _ in range(3))
    g_site = torch.ones(2, device=device)
    torch_module, our_module = torch.nn.Dropout(P), dr.Dropout(P)

    def backward(inputs: tuple, grad: torch.Tensor) -> Callable:
        return lambda out: torch.autograd.grad(out, inputs, grad)

    return {
        "dropout fwd": (Call(lambda: F.dropout(x, P)), Call(lambda: dr.functional.dropout(x, P))),
        "dropout fwd+bwd": (
            Call(lambda: F.dropout(xg, P), backward((xg,), g)),
            Call(lambda: dr.functional.dropout(xg, P), backward((xg,), g)),
        ),
        "module fwd+bwd": (
            Call(lambda: torch_module(xg), backward((xg,), g)),
            Call(lambda: our_module(xg), backward((xg,), g)),
        ),
        "cross-entropy fwd+bwd": (
            Call(lambda: F.cross_entropy(z, t), backward((z,), torch.ones((), device=device))),
            Call(lambda: dr.ops.cross_entropy_sample_grad(z, t)[0], backward((z,), g_rows)),
        ),
        "site fwd+bwd": (
            Call(lambda: F.dropout(xg, P), backward((xg,), g)),
            Call(lambda: dr.ops.site_penalty(h, g_e, g_i, P, "rademacher"), backward((h, g_e, g_i), g_site)),
        ),
    }


def _round_us(call: Call, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / CALLS * 1e6


def time_pair(theirs: Call, ours: Call, device: torch.device, rounds: int) -> tuple:
    """Median µs per call of each side over interleaved rounds (after one warm-up round each)."""
    calls, samples = (theirs, ours), ([], [])
    for r in range(rounds + 1):
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            us = _round_us(calls[side], device)
            if r > 0:
                samples[side].append(us)
    return statistics.median(samples[0]), statistics.median(samples[1])


def case_keys(cfg: Config) -> list:
    return list(pairs(torch.device("cpu")))


def run(cfg: Config, progress: Callable[[str], None]) -> list:
    """One row per pair: µs per call of each side, their ratio, the ops each side dispatched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for name, (theirs, ours) in pairs(cfg.device).items():
            progress(f"overhead {name}")
            torch_us, our_us = time_pair(theirs, ours, cfg.device, ROUNDS[cfg.preset])
            (torch_fwd, torch_bwd), (our_fwd, our_bwd) = theirs.count(), ours.count()
            rows.append({
                "section": "overhead", "case": name, "numel": NUMEL, "threads": 1,
                "torch_us": torch_us, "ours_us": our_us, "ratio": our_us / torch_us,
                "torch_ops_fwd": len(torch_fwd), "torch_ops_bwd": len(torch_bwd),
                "ours_ops_fwd": len(our_fwd), "ours_ops_bwd": len(our_bwd),
                "ours_ops": " ".join(our_fwd) + (" | " + " ".join(our_bwd) if our_bwd else ""),
            })  # fmt: skip
        return rows
    finally:
        torch.set_num_threads(threads)
