"""Shared test setup: Triton interpreter switch, backend fixtures, the tolerance table, and assertion
helpers that print the first mismatches.

This file is imported before any test module, so the environment is fixed here, *before*
``dropreg_ext`` (and with it Triton) is imported: without a CUDA device the Triton kernels run under
the interpreter (``TRITON_INTERPRET=1``). Nothing here allocates CUDA memory or creates a CUDA
context, so the suite collects on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import torch

CUDA_AVAILABLE = torch.cuda.is_available()  # driver query only: no CUDA context is created
if not CUDA_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dropreg_ext as dr  # noqa: E402  (must follow the TRITON_INTERPRET switch)
from dropreg_ext import _ext  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Markers and skips
# ------------------------------------------------------------------------------------------------

_skip_no_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device")
CUDA_MARKS = (pytest.mark.cuda, _skip_no_cuda)


def requires_cuda(obj):
    """Decorator for GPU tests: marked ``cuda`` (select with ``-m cuda``) and skipped without a GPU."""
    for mark in CUDA_MARKS:
        obj = mark(obj)
    return obj


# A test parametrized over devices: "cpu", and "cuda" marked and skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=list(CUDA_MARKS))]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped cleanly without one)")


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend name and the device its tensors live on."""

    name: str
    device: str

    def __str__(self) -> str:
        return f"{self.name}@{self.device}"


TRITON_ON_CPU = "triton" in dr.ops.available_backends("cpu")

CPU_BACKENDS = [
    pytest.param(
        Backend("cpu", "cpu"),
        id="cpu",
        marks=pytest.mark.skipif(not _ext.HAS_CPU, reason="dropreg_ext._C not loaded"),
    ),
    pytest.param(Backend("reference", "cpu"), id="reference"),
    pytest.param(
        Backend("triton", "cpu"),
        id="triton-interp",
        marks=pytest.mark.skipif(
            not TRITON_ON_CPU, reason="triton on CPU tensors needs triton and TRITON_INTERPRET=1"
        ),
    ),
]

CUDA_BACKENDS = [
    pytest.param(
        Backend("cuda", "cuda"),
        id="cuda",
        marks=[*CUDA_MARKS, pytest.mark.skipif(not _ext.HAS_CUDA, reason="extension built without CUDA")],
    ),
    pytest.param(
        Backend("triton", "cuda"),
        id="triton-cuda",
        marks=[*CUDA_MARKS, pytest.mark.skipif(not _ext.HAS_TRITON, reason="triton not importable")],
    ),
    pytest.param(Backend("reference", "cuda"), id="reference-cuda", marks=list(CUDA_MARKS)),
]

ALL_BACKENDS = CPU_BACKENDS + CUDA_BACKENDS


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> Backend:
    """Every backend on every device: CPU ones run here, CUDA ones skip without a GPU."""
    return request.param


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request) -> Backend:
    """Backends runnable on CPU tensors: cpu (C++), reference, triton (interpreter, if available)."""
    return request.param


@pytest.fixture(autouse=True)
def _isolate_global_state():
    """Every test starts from backend "auto" and a fixed global seed, and leaves them as found."""
    previous = dr.get_backend()
    dr.set_backend("auto")
    torch.manual_seed(0)
    yield
    dr.set_backend(previous)


# ------------------------------------------------------------------------------------------------
# Dtypes and the one tolerance table
# ------------------------------------------------------------------------------------------------

DTYPES = [
    pytest.param(torch.float64, id="f64"),
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.float16, id="f16"),
    pytest.param(torch.bfloat16, id="bf16"),
]

# Comparisons against exact (float64) math: about two units in the last place of each dtype
# (one for the float32 scale, one for the final rounding). Bit-exact comparisons between backends
# use assert_bitwise_equal, never these.
TOL = {
    torch.float64: dict(rtol=1e-14, atol=1e-300),
    torch.float32: dict(rtol=3e-7, atol=1e-30),
    torch.float16: dict(rtol=1.5e-3, atol=1e-7),
    torch.bfloat16: dict(rtol=1.2e-2, atol=1e-30),
}

_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


acc_dtype = dr.reference.acc_dtype  # the compute dtype of the kernels (the package's one rule)


def scaled_like_kernels(x: torch.Tensor, p: float) -> torch.Tensor:
    """x · 1/(1-p) by the dtype rule of the contract: the scale rounded to the compute dtype, the
    product taken there and rounded once to x's dtype."""
    acc = acc_dtype(x.dtype)
    scale = torch.tensor(dr.reference.dropout_scale(p), dtype=acc, device=x.device)
    return (x.to(acc) * scale).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Assertion helpers that show the first mismatches
# ------------------------------------------------------------------------------------------------


def _mismatch_report(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, limit: int = 8) -> str:
    idx = bad.nonzero()
    lines = [f"{idx.shape[0]} of {bad.numel()} elements differ; first {min(limit, idx.shape[0])}:"]
    a, e = actual.detach().cpu(), expected.detach().cpu()
    for row in idx[:limit].tolist():
        pos = tuple(row)
        lines.append(f"  at {pos}: actual {a[pos].item()!r}  expected {e[pos].item()!r}")
    return "\n".join(lines)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same shape, dtype and bits (signed zeros included), under the NaN policy (docs/numerics.md): NaN where
    the expected value is NaN, with any sign and payload (GPUs return the canonical NaN, CPUs keep
    the input's payload)."""
    prefix = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{prefix}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{prefix}dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu().contiguous(), expected.detach().cpu().contiguous()
    if a.dtype in _BITS:
        bad = (a.view(_BITS[a.dtype]) != e.view(_BITS[e.dtype])) & ~(a.isnan() & e.isnan())
    else:
        bad = a != e
    if bool(bad.any()):
        pytest.fail(prefix + _mismatch_report(a, e, bad), pytrace=False)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = "") -> None:
    """|actual - expected| <= atol + rtol·|expected| with the TOL entry of ``dtype`` (default: actual's)."""
    tol = TOL[dtype or actual.dtype]
    prefix = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{prefix}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    bad = (a - e).abs() > tol["atol"] + tol["rtol"] * e.abs()
    bad |= a.isnan() != e.isnan()
    if bool(bad.any()):
        pytest.fail(f"{prefix}(rtol={tol['rtol']}, atol={tol['atol']}) " + _mismatch_report(a, e, bad),
                    pytrace=False)


# ------------------------------------------------------------------------------------------------
# Regularizer ops: backends that register a given op, and tolerances of reductions
# ------------------------------------------------------------------------------------------------


def op_backends(op: str, params=None) -> list:
    """``params`` (default ALL_BACKENDS) with a skip added to every backend whose ``dr.ops.BACKEND_OPS``
    entry lacks the registered op ``op``: new launchers are picked up as soon as they land."""
    out = []
    for param in ALL_BACKENDS if params is None else params:
        (be,) = param.values
        marks = list(param.marks)
        if op not in dr.ops.BACKEND_OPS.get(be.name, {}):
            marks.append(pytest.mark.skip(reason=f"backend {be.name!r} registers no {op!r} op"))
        out.append(pytest.param(be, id=param.id, marks=marks))
    return out


def acc_eps(dtype: torch.dtype) -> float:
    """Unit roundoff of the compute dtype of ``dtype`` inputs (float64 or float32)."""
    return torch.finfo(acc_dtype(dtype)).eps / 2


def assert_within(actual: torch.Tensor, expected: torch.Tensor, atol, what: str = "") -> None:
    """|actual - expected| <= atol elementwise (``atol`` a number or a tensor broadcastable to the
    shape, e.g. an error bound built from the inputs); NaN must match NaN."""
    prefix = f"{what}: " if what else ""
    assert actual.shape == expected.shape, f"{prefix}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    bound = torch.as_tensor(atol, dtype=torch.float64).cpu()
    bad = ((a - e).abs() > bound) & ~(a.isnan() & e.isnan())
    bad |= a.isnan() != e.isnan()
    if bool(bad.any()):
        pytest.fail(f"{prefix}(error bound exceeded) " + _mismatch_report(a, e, bad), pytrace=False)


def assert_yhat_matches(yhat: torch.Tensor, yhat_ref: torch.Tensor, z: torch.Tensor, rng: torch.Tensor,
                        what: str = "") -> None:
    """ŷ equal to the reference's, except on rows where the reference's two best Gumbel scores are
    within the rounding of the noise: there the backend must have picked one of those two columns,
    and the row is reported as a warning.

    The noise G = -log(-log u) is float32 on every backend, and a backend's logf may differ from
    the reference's by 1 ulp in each of the two logs: |ΔG| <= 2·eps32·(1 + |G|). So the bound is
    2·eps32·(2 + |G_1| + |G_2|) for the two columns plus the rounding of z + G in the compute dtype,
    2·eps·|score| -- sized from float32 even for float64 logits.
    """
    assert yhat.dtype == torch.int64 and yhat.shape == yhat_ref.shape, what
    bad = (yhat.cpu() != yhat_ref.cpu()).nonzero().flatten().tolist()
    if not bad:
        return
    acc = acc_dtype(z.dtype)
    noise = dr.reference.gumbel_noise(rng.cpu(), z.shape[0], z.shape[1]).double()
    scores = (z.detach().cpu().to(acc) + noise.to(acc)).double()
    eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(acc).eps
    for r in bad:
        top = scores[r].topk(2)
        cols = top.indices.tolist()
        gap = float(top.values[0] - top.values[1])
        allowed = (2 * eps32 * (2 + float(noise[r, cols].abs().sum()))
                   + 2 * eps * float(top.values.abs().max()))
        picked = int(yhat[r])
        assert picked in cols and gap <= allowed, (
            f"{what}: row {r}: yhat {picked} != reference {int(yhat_ref[r])}, and the reference's best two "
            f"scores {top.values.tolist()} (columns {cols}) are {gap:.3g} apart (> {allowed:.3g})"
        )
        warnings.warn(f"{what}: yhat row {r} differs from the reference on a float tie (gap {gap:.3g})")


# ------------------------------------------------------------------------------------------------
# Error bounds built from the inputs (u = acc_eps(dtype), the unit roundoff of the compute dtype), float64
# ------------------------------------------------------------------------------------------------


def rounded_once_bound(expected: torch.Tensor, dtype: torch.dtype, compute_error) -> torch.Tensor:
    """Error bound of a value computed within ``compute_error`` in the compute dtype and then rounded
    once to ``dtype``: compute_error + rtol·|expected| + atol (the TOL entry of ``dtype``)."""
    tol = TOL[dtype]
    return compute_error + tol["rtol"] * expected.detach().cpu().double().abs() + tol["atol"]


def reordered_sum_bound(terms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Error bound of a sum of n terms computed in the compute dtype of ``dtype`` in another order:
    4u·(1 + √n)·Σ|t| (the products' own roundings are in the 1)."""
    return 4 * acc_eps(dtype) * (1 + math.sqrt(terms.numel())) * terms.abs().sum()


def lse_bound(z: torch.Tensor, t: torch.Tensor, lse_ref: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Error bound of cross-entropy's lse and loss per row: 4u·(√C + |lse| + |z_y|) -- √C for the
    reordered sum of C exponentials (relative error of the sum = absolute error of its log), |lse| and
    |z_y| for the roundings of m + log(s) and lse - z_y (z_y read at column 0 on ignored rows)."""
    za, t = z.detach().cpu().double(), t.cpu()
    z_y = za.gather(1, torch.where(t == ignore_index, 0, t)[:, None]).squeeze(1).abs()
    return 4 * acc_eps(z.dtype) * (math.sqrt(z.shape[1]) + lse_ref.detach().cpu().double().abs() + z_y)


def ce_grad_bound(z: torch.Tensor, lse: torch.Tensor, row_scale: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Error bound of ce_grad: p = exp(z - lse) in the compute dtype, 4u·|s|·p·(2 + |z - lse|) (the
    exp's argument has an error relative to its size), then one rounding to z's dtype."""
    arg = z.detach().cpu().double() - lse.detach().cpu().double()[:, None]
    s = row_scale.detach().cpu().double().abs()[:, None]
    return rounded_once_bound(expected, z.dtype, 4 * acc_eps(z.dtype) * s * arg.exp() * (2 + arg.abs()))


# ------------------------------------------------------------------------------------------------
# Sizes GPU users run: C > 1024 (CUDA block mode), C > 2048 (Triton chunks), grid-stride loops past one
# resident wave, every partial sum of a reduction
# ------------------------------------------------------------------------------------------------


def sized_cases(op: str, sizes: dict) -> list:
    """pytest params (backend, size) for the kernel backends that register ``op`` (the reference is
    what they are compared with). ``sizes`` maps a backend id (``cpu``, ``triton-interp``, ``cuda``,
    ``triton-cuda``) to the sizes it runs: the full GPU sizes on CUDA devices, the ones that fit CI's
    time on the CPU; an id missing from ``sizes`` runs none."""
    out = []
    for param in op_backends(op):
        (be,) = param.values
        for size in sizes.get(param.id, ()):
            label = "x".join(map(str, size)) if isinstance(size, tuple) else str(size)
            out.append(pytest.param(be, size, id=f"{param.id}-{label}", marks=param.marks))
    return out
