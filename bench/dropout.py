"""Per-op dropout benchmark: forward, backward and forward+backward of one tensor of n elements.

Providers (:func:`providers`): ``eager`` (``torch.nn.functional.dropout``), ``compile``
(``torch.compile`` of the same call, static shapes, recompiled for each case; not in the ``--check``
preset, :attr:`bench.config.Config.compile_baseline`) and each backend of
ours that runs natively on the device (``dr.ops.available_backends`` minus ``reference``, and
minus ``triton`` on CPU, where it would only run under the interpreter).

Modes: ``fwd`` times ``y = dropout(x)`` with ``x`` not requiring grad (an inference-style forward
in training mode); ``bwd`` times ``torch.autograd.grad(y, x, g, retain_graph=True)`` for a fixed
``y``; ``fwd+bwd`` times both from scratch. ``peak memory`` is taken on ``fwd+bwd``.

Bytes moved, counted by hand per element of itemsize s:

* ``bytes_min``: the least any dropout can move, read x + write y (2s), and read g + write dx (2s)
  in backward. All GB/s called *effective* divide this same count by each provider's time, so
  they compare like with like.
* ``bytes_own``: what the provider really moves (:func:`own_bytes_per_elem`), for its own GB/s.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

import dropreg_ext as dr

from .checks import size_label
from .config import Config, dtype_name
from .measure import ElementwiseCase, Timing, peak_bytes, run_cases, seeded_randn, time_fns, timed_row

MODES = ("fwd", "bwd", "fwd+bwd", "inplace")
BASELINES = ("eager", "compile")
FLOOR = "floor"


@dataclasses.dataclass(frozen=True)
class Provider:
    """A dropout implementation under test: ``make(p)`` returns ``fn(x) -> y`` in training mode."""

    name: str
    make: Callable[[float], Callable[[torch.Tensor], torch.Tensor]]


def _eager(p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x, inplace=False: F.dropout(x, p, training=True, inplace=inplace)


def fresh_compile(fn: Callable) -> Callable:
    """``torch.compile(fn)`` with a fresh dynamo state, so that every case gets its own static-shape
    graph (the best case for the baseline) and the recompile limit is never hit."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _compiled(p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return fresh_compile(lambda x: F.dropout(x, p, training=True))


def _ours(backend: str) -> Callable[[float], Callable[[torch.Tensor], torch.Tensor]]:
    def make(p: float) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
            with dr.use_backend(backend):
                return dr.functional.dropout(x, p, training=True, inplace=inplace)

        return fn

    return make


def our_backends(device: torch.device) -> list:
    """Our backends that run natively on ``device`` (no reference, no interpreted Triton)."""
    names = [b for b in dr.ops.available_backends(device) if b != "reference"]
    if device.type == "cpu":
        names = [b for b in names if b != "triton"]
    return names


def providers(device: torch.device, with_compile: bool = True) -> list:
    baselines = [Provider("eager", _eager)] + ([Provider("compile", _compiled)] if with_compile else [])
    return baselines + [Provider(b, _ours(b)) for b in our_backends(device)]


def own_bytes_per_elem(provider: str, mode: str, itemsize: int, device: torch.device) -> int:
    """Bytes a provider really moves per element (read + written), from how each one is built.

    * ours (and the copy): 2s per pass; ours regenerates the mask from (seed, offset), never stores it.
    * eager on CUDA: ``native_dropout`` also writes a 1-byte bool mask, which backward reads.
    * eager on CPU: ``aten::dropout`` draws a noise tensor of x's dtype (bernoulli_ writes s,
      div_ by 1-p reads and writes s, x * noise reads 2s and writes s: 6s); backward is
      g * noise (3s).
    * compile: Inductor reads x and writes y; when x requires grad it also saves a 1-byte mask,
      which backward reads (``fwd`` is timed without grad, so there it stores none).
    """
    s = itemsize
    if provider == "eager" and device.type == "cpu":
        fwd = fwd_grad = 6 * s
        bwd = 3 * s
    elif provider == "eager":
        fwd = fwd_grad = bwd = 2 * s + 1
    elif provider == "compile":
        fwd, fwd_grad, bwd = 2 * s, 2 * s + 1, 2 * s + 1
    else:
        fwd = fwd_grad = bwd = 2 * s
    return {"copy": fwd, "fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_grad + bwd, "inplace": fwd}[mode]


def min_bytes_per_elem(mode: str, itemsize: int) -> int:
    """Read the input and write the output once per pass (``copy`` moves exactly that too)."""
    return {"copy": 2, "fwd": 2, "bwd": 2, "fwd+bwd": 4, "inplace": 2}[mode] * itemsize


@dataclasses.dataclass
class Case(ElementwiseCase):
    """One (dtype, n) point: the tensors every provider shares."""

    def __post_init__(self) -> None:
        self.x, self.g = seeded_randn(2, self.numel, self.dtype, self.device)
        self.x_grad = self.x.clone().requires_grad_()
        self.x_inplace = self.x.clone()


def floor_fns(x: torch.Tensor, g: torch.Tensor, inplace: torch.Tensor) -> dict:
    """The cheapest ops moving the bytes each mode must move, the floor of every provider's time:
    a fresh-output ``torch.mul`` per pass (on a CPU its page faults dominate, as they do for any
    fresh output), ``mul_`` in place (cache-resident where the tensor fits)."""
    return {
        "fwd": lambda: torch.mul(x, 2.0),
        "bwd": lambda: torch.mul(g, 2.0),
        "fwd+bwd": lambda: (torch.mul(x, 2.0), torch.mul(g, 2.0)),
        "inplace": lambda: inplace.mul_(1.0),
    }


def add_floor_ratios(rows: list) -> None:
    """``of_floor`` = floor median / provider median of the same mode (1.0: at the floor)."""
    floors = {r["mode"]: r for r in rows if r["provider"] == FLOOR}
    for row in rows:
        if row["mode"] in floors:
            row["of_floor"] = floors[row["mode"]]["median_ms"] / row["median_ms"]


def mode_fn(fn: Callable, mode: str, case: Case) -> Callable[[], None]:
    """A zero-argument closure doing one ``mode`` pass of ``fn`` on the case's tensors
    (``fn(x, inplace=False)``; in place on a buffer of its own that needs no gradient)."""
    x, g = case.x_grad, case.g

    def fwd() -> None:
        fn(case.x)

    def fwd_bwd() -> None:
        torch.autograd.grad(fn(x), x, g)

    def bwd(y: torch.Tensor) -> Callable[[], None]:
        def call() -> None:
            torch.autograd.grad(y, x, g, retain_graph=True)

        return call

    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return fwd_bwd
    if mode == "bwd":
        return bwd(fn(x))
    if mode == "inplace":
        return lambda: fn(case.x_inplace, inplace=True)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def case_keys(cfg: Config) -> list:
    """(dtype, n) of every case, in run order."""
    return [(dtype, numel) for dtype in cfg.dtypes for numel in cfg.sizes[dtype_name(dtype)]]


def _row(case: Case, provider: str, mode: str, timing: Timing, copy_gbps: float) -> dict:
    s = case.x.element_size()
    bytes_own = own_bytes_per_elem(provider, mode, s, case.device) * case.numel
    return timed_row("dropout", "dropout", provider, mode, case.dtype, timing,
                     min_bytes_per_elem(mode, s) * case.numel, copy_gbps, numel=case.numel, bytes_own=bytes_own,
                     gbps_own=bytes_own / (timing.median_ms / 1e3) / 1e9)


def run_case(case: Case, cfg: Config) -> list:
    """Every provider and mode on one case, timed in interleaved rounds with the device copy
    ``y.copy_(x)`` of the same size (the bandwidth reference); ratios come from this run."""
    out = torch.empty_like(case.x)
    calls = {("copy", "copy"): lambda: out.copy_(case.x)}
    calls.update({(FLOOR, mode): fn for mode, fn in floor_fns(case.x, case.g, case.x_inplace).items()})
    for provider in providers(cfg.device, cfg.compile_baseline):
        fn = provider.make(cfg.p)
        # torch.compile of an in-place call recompiles for the mutated input: compile is timed out of place.
        modes = [m for m in MODES if not (provider.name == "compile" and m == "inplace")]
        calls.update({(provider.name, mode): mode_fn(fn, mode, case) for mode in modes})
    timings = time_fns(calls, cfg.device, cfg.op_reps)
    copy = timings[("copy", "copy")]
    copy_gbps = min_bytes_per_elem("copy", case.x.element_size()) * case.numel / (copy.median_ms / 1e3) / 1e9
    return case_rows(timings, calls, lambda key, timing: _row(case, *key, timing, copy_gbps),
                     lambda key: key[1] == "fwd+bwd" and key[0] != FLOOR, cfg.device)


def add_ratios(rows: list) -> None:
    """``speedup_vs_eager`` and ``speedup_vs_compile``: baseline median / provider median, same mode.
    ``rows`` are the rows of one case (also used by :mod:`bench.ce` and :mod:`bench.site_penalty`)."""
    by_key = {(r["provider"], r["mode"]): r for r in rows}
    for row in rows:
        for base in BASELINES:
            ref = by_key.get((base, row["mode"]))
            if ref is not None:
                row[f"speedup_vs_{base}"] = ref["median_ms"] / row["median_ms"]


def case_rows(timings: dict, calls: dict, make_row: Callable[[object, Timing], dict],
              with_peak: Callable[[object], bool], device: torch.device) -> list:
    """The rows of one case, in timing order: ``make_row(key, timing)`` for each timed call, with
    ``peak_bytes`` of ``calls[key]`` where ``with_peak(key)``, then the ratios (:func:`add_ratios`,
    :func:`add_floor_ratios`). Used by every section that times calls against the copy."""
    rows = []
    for key, timing in timings.items():
        row = make_row(key, timing)
        if with_peak(key):
            row["peak_bytes"] = peak_bytes(calls[key], device)
        rows.append(row)
    add_ratios(rows)
    add_floor_ratios(rows)
    return rows


def run(cfg: Config, progress: Callable[[str], None]) -> list:
    """All dropout cases of ``cfg``; ``progress(label)`` is called before each case."""
    return run_cases(case_keys(cfg), lambda dtype, numel: f"dropout {dtype_name(dtype)} n={size_label(numel)}",
                     lambda dtype, numel: run_case(Case(dtype, numel, cfg.device), cfg), progress)
