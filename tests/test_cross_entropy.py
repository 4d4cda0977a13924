"""Cross-entropy with a sampled label: ``cross_entropy_sample``, ``cross_entropy_sample_grad``,
``ce_grad`` and ``ce_grad_backward``.

Every backend is compared with ``reference.py``: loss and log-sum-exp within an error bound built from
the inputs (the row sum is reordered: C exponentials summed in another order), ŷ exactly — a mismatch
is accepted only where the reference's two best Gumbel scores of that row tie to rounding, and then
it is reported as a warning. ce_grad / ce_grad_backward are compared elementwise with bounds that
follow the formulas. The reference itself is compared with textbook formulas (torch cross-entropy,
logsumexp, Gumbel-max with the documented noise). Then: autograd (gradcheck, gradgradcheck, opcheck
of every registered op of every backend), ŷ frequencies against softmax (chi-square, seeded), and
bad input.

Triton runs under the interpreter on CPU: one program per row costs ~60 ms there, so its cases use
a few rows only.
"""

from __future__ import annotations

import math

import pytest
import textbook
import torch
import torch.nn.functional as F
from conftest import (
    CPU_BACKENDS,
    DTYPES,
    TOL,
    acc_dtype,
    acc_eps,
    assert_bitwise_equal,
    assert_within,
    assert_yhat_matches,
    op_backends,
    sized_cases,
)

import dropreg_ext as dr
from dropreg_ext import reference as R

IGNORE = -100

CE_BACKENDS = op_backends("cross_entropy_sample")
FUSED_BACKENDS = op_backends("cross_entropy_sample_grad")
GRAD_BACKENDS = op_backends("ce_grad")
GRAD_BW_BACKENDS = op_backends("ce_grad_backward")
CE_CPU_BACKENDS = op_backends("cross_entropy_sample", CPU_BACKENDS)

# (N, C): one row of one class, a column, odd C, C just above a power of two and a 128-block, C = 1000.
SHAPES = [
    pytest.param((1, 1), id="N1-C1"),
    pytest.param((4, 1), id="N4-C1"),
    pytest.param((6, 3), id="N6-C3"),
    pytest.param((3, 257), id="N3-C257"),
    pytest.param((2, 1000), id="N2-C1000"),
    pytest.param((0, 4), id="N0-C4"),
]


def _ops(be):
    return dr.ops.BACKEND_OPS[be.name]


def _expected(be):
    """What ``be`` is compared with: the reference, and for the reference backend itself the
    textbook forms (tests/textbook.py: F.cross_entropy, logsumexp, argmax, autograd, the Jacobian)."""
    return textbook if be.name == "reference" else R


def _inputs(shape, dtype, device, seed, scale=3.0, ignore_every=3):
    """Logits (N, C) of spread ``scale``, targets with every ``ignore_every``-th row (from row 1)
    set to IGNORE, and an RNG state."""
    n, c = shape
    gen = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(n, c, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    t = torch.randint(0, max(c, 1), (n,), generator=gen)
    if n > 1:
        t[1::ignore_every] = IGNORE
    return z, t.to(device), dr.ops.make_rng(device, seed * 7919 + 1)


def _lse_bound(z, t, lse_ref):
    """Error bound of lse and loss: 4u·(√C + |lse| + |z_y|) — √C for the reordered sum of C
    exponentials (relative error of the sum = absolute error of its log), |lse| and |z_y| for the
    roundings of m + log(s) and lse - z_y (u = unit roundoff of the compute dtype)."""
    za = z.detach().cpu().double()
    c = z.shape[1]
    z_y = za.gather(1, torch.where(t.cpu() == IGNORE, 0, t.cpu())[:, None]).squeeze(1).abs()
    return 4 * acc_eps(z.dtype) * (math.sqrt(c) + lse_ref.detach().cpu().double().abs() + z_y)


# ------------------------------------------------------------------------------------------------
# The reference against textbook formulas
# ------------------------------------------------------------------------------------------------


def test_reference_against_textbook():
    z, t, rng = _inputs((9, 7), torch.float64, "cpu", 1)
    loss, lse, yhat = R.cross_entropy_sample(z, t, rng, IGNORE)
    valid = t != IGNORE
    torch.testing.assert_close(loss, F.cross_entropy(z, t, ignore_index=IGNORE, reduction="none"),
                               rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), rtol=1e-15, atol=0)
    # Gumbel-max with G = -log(-log u), u = (k + 1/2)·2^-23 at i = r·C + c (contract v3): k's top 16 bits
    # are the u16 h of the Gumbel stream, its low 7 the top 7 bits of the refinement stream's u32 v
    h = R.philox_uint16(rng, R.STREAM_GUMBEL, z.numel()).reshape(z.shape)
    v = R.philox_uint32(rng, R.STREAM_GUMBEL_REFINE, z.numel()).reshape(z.shape)
    u = ((h * 2**7 + v // 2**25).double() + 0.5) * 2.0**-23
    assert float(u.min()) > 0 and float(u.max()) < 1
    g = (-torch.log(-torch.log(u.float()))).double()
    assert torch.equal(yhat[valid], (z + g).argmax(-1)[valid])
    assert (yhat[~valid] == IGNORE).all() and (loss[~valid] == 0).all()
    # the draw does not depend on the target's value (only on whether the row is ignored)
    t2 = torch.where(valid, (t + 1) % z.shape[1], t)
    assert torch.equal(R.cross_entropy_sample(z, t2, rng, IGNORE)[2], yhat)


def _refinement_pairs(rng: torch.Tensor, rows: int, c: int) -> list:
    """Per row, columns (i, j), i < j, whose 16 filter bits h are equal while the refinement's top 7
    bits make u_j > u_i: a sampler that ignored the refinement would tie them and pick i."""
    n = rows * c
    h = R.philox_uint16(rng, R.STREAM_GUMBEL, n).reshape(rows, c)
    top7 = (R.philox_uint32(rng, R.STREAM_GUMBEL_REFINE, n) >> 25).reshape(rows, c)
    pairs = []
    for r in range(rows):
        first = {}
        for col in range(c):
            i = first.setdefault(int(h[r, col]), col)
            if i != col and int(top7[r, col]) > int(top7[r, i]) and col >= 200:
                pairs.append((i, col))
                break
        assert len(pairs) == r + 1, f"no pair of equal filter bits in row {r}"
    return pairs


@pytest.mark.parametrize("be", CE_BACKENDS)
def test_cross_entropy_sample_uses_refinement(be):
    """Two equal logits whose filter bits are equal (the rest of the row far below): only the
    refinement's 7 bits tell their uniforms apart, so every backend must pick the later column, the
    one with the larger u, past the row's first block (where the filter lets it through)."""
    rows, c = 4, 3000
    rng = dr.ops.make_rng("cpu", 314)
    pairs = _refinement_pairs(rng, rows, c)
    z = torch.full((rows, c), -100.0)
    for r, (i, j) in enumerate(pairs):
        z[r, i] = z[r, j] = 1.5
    g = R.gumbel_noise(rng, rows, c)
    assert all(float(g[r, j]) > float(g[r, i]) for r, (i, j) in enumerate(pairs))
    t = torch.zeros(rows, dtype=torch.int64)
    _, _, yhat = dr.ops.cross_entropy_sample(z.to(be.device), t.to(be.device), rng.to(be.device), backend=be.name)
    assert yhat.cpu().tolist() == [j for _, j in pairs], f"{be}: pairs (i, j) {pairs}"


def test_reference_ce_grad_against_autograd():
    z, t, _ = _inputs((5, 6), torch.float64, "cpu", 2)
    scale = torch.randn(5, dtype=torch.float64)
    lse = torch.logsumexp(z, -1)
    zz = z.clone().requires_grad_()
    ce = F.cross_entropy(zz, t, ignore_index=IGNORE, reduction="none")
    (expected,) = torch.autograd.grad((ce * scale).sum(), zz)
    g = R.ce_grad(z, lse, t, scale, IGNORE)
    torch.testing.assert_close(g, expected, rtol=1e-13, atol=1e-15)
    # its VJP: the softmax Jacobian diag(p) - ppᵀ applied to u, times the row scale
    u = torch.randn(5, 6, dtype=torch.float64)
    gz, gs = R.ce_grad_backward(u, z, lse, t, scale, IGNORE)
    p = torch.softmax(z, -1)
    for r in range(5):
        if t[r] == IGNORE:
            assert (gz[r] == 0).all() and gs[r] == 0
            continue
        hess = torch.diag(p[r]) - torch.outer(p[r], p[r])
        torch.testing.assert_close(gz[r], scale[r] * hess @ u[r], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(gs[r], p[r] @ u[r] - u[r, t[r]], rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# Every backend against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("be", CE_BACKENDS)
def test_cross_entropy_sample_matches_reference(be, dtype, shape):
    z, t, rng = _inputs(shape, dtype, be.device, seed=11 * shape[0] + shape[1])
    _check_cross_entropy_sample(be, z, t, rng, f"{be} {dtype} {shape}")


FILTER_CASES = sized_cases("cross_entropy_sample", {"cpu": [(8, 3000)], "cuda": [(64, 50257)],
                                                    "triton-cuda": [(64, 50257)]})


@pytest.mark.parametrize("scale, offset", [(1.0, 3e4), (30.0, -1e4), (1.0, 1e6)],
                         ids=["offset3e4", "wide-offset-1e4", "offset1e6"])
@pytest.mark.parametrize("be, shape", FILTER_CASES)
def test_cross_entropy_sample_filter_at_large_logits(be, shape, scale, offset):
    """Logits so large that z + G rounds to a coarse grid (ulp 2^-8 at 3e4, 2^-4 at 1e6): the
    candidate filter's margin (docs/numerics.md) still lets every element that can win through."""
    z, t, rng = _inputs(shape, torch.float32, be.device, seed=shape[1] + int(offset) % 97, scale=scale)
    _check_cross_entropy_sample(be, z + offset, t, rng, f"{be} {shape} scale {scale} offset {offset}")


def _check_cross_entropy_sample(be, z, t, rng, what):
    """loss, lse (within _lse_bound) and ŷ (exact but for float ties) of ``be`` against the reference."""
    loss, lse, yhat = dr.ops.cross_entropy_sample(z, t, rng, IGNORE, backend=be.name)
    rloss, rlse, ryhat = _expected(be).cross_entropy_sample(z, t, rng, IGNORE)
    acc = acc_dtype(z.dtype)
    for out in (loss, lse):
        assert out.dtype == acc and out.shape == (z.shape[0],) and out.device == z.device
    bound = _lse_bound(z, t, rlse)
    assert_within(lse, rlse, bound, f"{what} lse")
    assert_within(loss, rloss, bound, f"{what} loss")
    ignored = t == IGNORE
    assert (loss[ignored] == 0).all() and (yhat[ignored] == IGNORE).all()
    assert_yhat_matches(yhat, ryhat, z, rng, what)


@pytest.mark.parametrize("ignore_index", [-100, -1, 2], ids=["ii-100", "ii-1", "ii-class2"])
@pytest.mark.parametrize("be", CE_BACKENDS)
def test_cross_entropy_sample_ignore_index_values(be, ignore_index):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(6, 4, generator=gen).to(be.device)
    t = torch.tensor([0, ignore_index, 3, ignore_index, 1, 2 if ignore_index != 2 else 0], device=be.device)
    rng = dr.ops.make_rng(be.device, 99)
    loss, lse, yhat = dr.ops.cross_entropy_sample(z, t, rng, ignore_index, backend=be.name)
    rloss, rlse, ryhat = _expected(be).cross_entropy_sample(z, t, rng, ignore_index)
    assert (yhat[t == ignore_index] == ignore_index).all() and (loss[t == ignore_index] == 0).all()
    bound = _lse_bound(z, torch.where(t == ignore_index, 0, t), rlse)
    assert_within(loss, rloss, bound, f"{be} loss")
    assert_within(lse, rlse, bound, f"{be} lse")
    assert_yhat_matches(yhat, ryhat, z, rng, f"{be} ignore_index={ignore_index}")


@pytest.mark.parametrize("shape", [pytest.param((0, 4), id="N0-C4"), pytest.param((0, 0), id="N0-C0")])
@pytest.mark.parametrize("be", CE_BACKENDS)
def test_cross_entropy_sample_empty(be, shape):
    """No rows: empty outputs (the public op accepts C = 0 when N = 0)."""
    z = torch.randn(shape, device=be.device)
    t = torch.zeros(0, dtype=torch.int64, device=be.device)
    loss, lse, yhat = dr.ops.cross_entropy_sample(z, t, dr.ops.make_rng(be.device, 0), backend=be.name)
    assert loss.shape == lse.shape == yhat.shape == (0,)
    assert loss.dtype == lse.dtype == torch.float32 and yhat.dtype == torch.int64


@pytest.mark.parametrize("be", CE_BACKENDS)
def test_cross_entropy_sample_noncontiguous(be):
    """Strided logits give the result of their contiguous copy (Gumbel counter = logical index)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(10, 9, generator=gen).to(be.device)
    t = torch.tensor([0, 4, IGNORE, 1, 2], device=be.device)
    rng = dr.ops.make_rng(be.device, 4)
    layouts = {"transposed": base.t()[:5], "column-slice": base[:5, ::2], "row-slice": base[::2]}
    for layout, z in layouts.items():
        got = dr.ops.cross_entropy_sample(z, t, rng, IGNORE, backend=be.name)
        want = dr.ops.cross_entropy_sample(z.contiguous(), t, rng, IGNORE, backend=be.name)
        for a, b, name in zip(got, want, ("loss", "lse", "yhat")):
            assert_bitwise_equal(a, b, f"{be} {layout} {name}")
        lse, scale = want[1], torch.linspace(-1, 1, 5, device=be.device)
        assert_bitwise_equal(dr.ops.ce_grad(z, lse, t, scale, IGNORE, backend=be.name),
                             dr.ops.ce_grad(z.contiguous(), lse, t, scale, IGNORE, backend=be.name),
                             f"{be} {layout} ce_grad")


@pytest.mark.parametrize("be", CE_BACKENDS)
def test_cross_entropy_sample_deterministic(be):
    """Same inputs twice: bit-identical outputs (fixed-order row reductions)."""
    shape = (3, 300) if _fast(be) or be.name == "reference" else (256, 513)  # rows split over threads
    z, t, rng = _inputs(shape, torch.float32, be.device, seed=8)
    first = dr.ops.cross_entropy_sample(z, t, rng, IGNORE, backend=be.name)
    second = dr.ops.cross_entropy_sample(z, t, rng, IGNORE, backend=be.name)
    for a, b, name in zip(first, second, ("loss", "lse", "yhat")):
        assert_bitwise_equal(a, b, f"{be} {name}")
    lse, scale = first[1], torch.randn(shape[0], device=be.device)
    g1 = dr.ops.ce_grad(z, lse, first[2], scale, IGNORE, backend=be.name)
    assert_bitwise_equal(g1, dr.ops.ce_grad(z, lse, first[2], scale, IGNORE, backend=be.name), f"{be} ce_grad")
    u = torch.randn(shape, device=be.device)
    bw = _ops(be)["ce_grad_backward"]
    for a, b in zip(bw(u, z, lse, t, scale, IGNORE), bw(u, z, lse, t, scale, IGNORE)):
        assert_bitwise_equal(a, b, f"{be} ce_grad_backward")


def _grad_inputs(shape, dtype, device, seed):
    z, label, _ = _inputs(shape, dtype, device, seed)
    acc = acc_dtype(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    lse = torch.logsumexp(z.to(acc), -1)
    scale = torch.randn(shape[0], generator=gen, dtype=torch.float64).to(acc).to(device)
    u = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return z, lse, label, scale, u


def _softmax_terms(z, lse):
    """p = exp(z - lse) and |z - lse| in float64 (the argument of the exp: its rounding error is
    relative to its size)."""
    arg = z.detach().cpu().double() - lse.detach().cpu().double()[:, None]
    return arg.exp(), arg.abs()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("be", GRAD_BACKENDS)
def test_ce_grad_matches_reference(be, dtype, shape):
    z, lse, label, scale, _ = _grad_inputs(shape, dtype, be.device, seed=3 * shape[0] + shape[1])
    _check_ce_grad(be, z, lse, label, scale, f"{be} {dtype} {shape}")


def _check_ce_grad(be, z, lse, label, scale, what):
    g = dr.ops.ce_grad(z, lse, label, scale, IGNORE, backend=be.name)
    expected = _expected(be).ce_grad(z, lse, label, scale, IGNORE)
    assert g.dtype == z.dtype and g.shape == z.shape
    # exp(z - lse) in the compute dtype: 4u·|s|·p·(2 + |z - lse|); then one rounding to z's dtype (TOL)
    p, arg = _softmax_terms(z, lse)
    s = scale.cpu().double().abs()[:, None]
    tol = TOL[z.dtype]
    bound = tol["rtol"] * expected.cpu().double().abs() + tol["atol"] + 4 * acc_eps(z.dtype) * s * p * (2 + arg)
    assert_within(g, expected, bound, what)
    assert (g[label == IGNORE] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("be", GRAD_BW_BACKENDS)
def test_ce_grad_backward_matches_reference(be, dtype, shape):
    """The registered op itself (called directly): grad_z = s·p ⊙ (u - ⟨p, u⟩), grad_s = ⟨p, u⟩ - u_y."""
    z, lse, label, scale, u = _grad_inputs(shape, dtype, be.device, seed=5 * shape[0] + shape[1])
    _check_ce_grad_backward(be, u, z, lse, label, scale, f"{be} {dtype} {shape}")


def _check_ce_grad_backward(be, u, z, lse, label, scale, what):
    grad_z, grad_s = _ops(be)["ce_grad_backward"](u, z, lse, label, scale, IGNORE)
    ez, es = _expected(be).ce_grad_backward(u, z, lse, label, scale, IGNORE)
    dtype, shape = z.dtype, tuple(z.shape)
    assert grad_z.dtype == dtype and grad_z.shape == z.shape
    assert grad_s.dtype == scale.dtype and grad_s.shape == scale.shape
    # ⟨p, u⟩ is a reordered sum of C terms with relative errors ~(2 + |z - lse|)u each:
    # error of ⟨p, u⟩ <= 4u·(2 + √C)·B, B = Σ p|u|(2 + |z - lse|)
    p, arg = _softmax_terms(z, lse)
    ua = u.cpu().double()
    b = (p * ua.abs() * (2 + arg)).sum(-1, keepdim=True)
    eps, c = acc_eps(dtype), shape[1]
    pu_err = 4 * eps * (2 + math.sqrt(c)) * b
    s = scale.cpu().double().abs()[:, None]
    pu = (p * ua).sum(-1, keepdim=True)
    tol = TOL[dtype]
    bound_z = (tol["rtol"] * ez.cpu().double().abs() + tol["atol"]
               + s * p * (4 * eps * (ua - pu).abs() * (2 + arg) + pu_err))
    assert_within(grad_z, ez, bound_z, f"{what} grad_z")
    safe = torch.where(label.cpu() == IGNORE, 0, label.cpu())
    u_y = ua.gather(1, safe[:, None]) if c else torch.zeros(shape[0], 1, dtype=torch.float64)
    bound_s = (pu_err + 4 * eps * u_y.abs()).squeeze(1)
    assert_within(grad_s, es, bound_s, f"{what} grad_row_scale")
    ignored = label == IGNORE
    assert (grad_z[ignored] == 0).all() and (grad_s[ignored] == 0).all()


# ------------------------------------------------------------------------------------------------
# cross_entropy_sample_grad: the sample and G = softmax(z) - onehot(ŷ) in one op
# ------------------------------------------------------------------------------------------------


def _check_fused(be, z, t, rng, what, ignore_index=IGNORE):
    """loss, lse and ŷ bit-identical to the same backend's cross_entropy_sample, G against the
    reference ce_grad(z, lse, ŷ, 1) and G_true (with a true_scale) against ce_grad(z, lse, y,
    true_scale), on the valid rows within ce_grad's bound (0 on ignored rows)."""
    loss, lse, yhat, g = dr.ops.cross_entropy_sample_grad(z, t, rng, ignore_index, backend=be.name)
    scale = torch.linspace(0.5, 2.0, z.shape[0], dtype=acc_dtype(z.dtype), device=z.device)
    with_true = dr.ops.cross_entropy_sample_grad(z, t, rng, ignore_index, true_scale=scale, backend=be.name)
    sample = dr.ops.cross_entropy_sample(z, t, rng, ignore_index, backend=be.name)
    for a, b, c, name in zip((loss, lse, yhat, g), sample + (g,), with_true, ("loss", "lse", "yhat", "G")):
        assert_bitwise_equal(a, b, f"{what} {name} vs cross_entropy_sample")
        assert_bitwise_equal(a, c, f"{what} {name} with true_scale")
    g_true = with_true[4]
    valid = t != ignore_index
    for out, label, row_scale, name in ((g, torch.where(valid, yhat, -1), torch.ones_like(lse), "G"),
                                        (g_true, torch.where(valid, t, -1), scale, "G_true")):
        assert out.dtype == z.dtype and out.shape == z.shape and out.is_contiguous(), name
        if z.numel():
            expected = R.ce_grad(z, lse, label, row_scale, -1)
            p, arg = _softmax_terms(z, lse)
            s = row_scale.cpu().double().abs()[:, None]
            tol = TOL[z.dtype]
            bound = (tol["rtol"] * expected.cpu().double().abs() + tol["atol"]
                     + 4 * acc_eps(z.dtype) * s * p * (2 + arg))
            assert_within(out, expected, bound, f"{what} {name}")
        assert (out[~valid] == 0).all(), f"{what} {name} on ignored rows"
    return loss, lse, yhat, g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("be", FUSED_BACKENDS)
def test_cross_entropy_sample_grad_matches_reference(be, dtype, shape):
    z, t, rng = _inputs(shape, dtype, be.device, seed=13 * shape[0] + shape[1])
    what = f"{be} {dtype} {shape}"
    _check_fused(be, z, t, rng, what)
    _check_cross_entropy_sample(be, z, t, rng, what)


@pytest.mark.parametrize("ignore_index", [-100, -1, 2], ids=["ii-100", "ii-1", "ii-class2"])
@pytest.mark.parametrize("be", FUSED_BACKENDS)
def test_cross_entropy_sample_grad_ignore_index_values(be, ignore_index):
    """An ignore_index that is a real class: a valid row whose ŷ equals it keeps its one-hot."""
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(8, 3, generator=gen).to(be.device)
    z[:, 2] += 6.0  # ŷ = 2 on most rows (softmax ≈ 0.995 there)
    t = torch.tensor([0, ignore_index, 1, 0, 1, 0, ignore_index, 1], device=be.device)
    rng = dr.ops.make_rng(be.device, 5)
    _, _, yhat, g = _check_fused(be, z, t, rng, f"{be} ignore_index={ignore_index}", ignore_index)
    hit = (t != ignore_index) & (yhat == 2)
    assert hit.any(), "the case this test is about did not occur: change the seed"
    assert (g[hit, 2] < 0).all()  # p - 1: the one-hot is there


@pytest.mark.parametrize("be", FUSED_BACKENDS)
def test_cross_entropy_sample_grad_deterministic_and_strided(be):
    """Twice the same bits (rows split over threads on the CPU); for the kernels, strided logits give
    the result of their contiguous copy (torch's own reductions, the reference's, reorder by layout)."""
    shape = (3, 300) if _fast(be) or be.name == "reference" else (256, 513)
    z, t, rng = _inputs(shape, torch.float32, be.device, seed=9)
    first = dr.ops.cross_entropy_sample_grad(z, t, rng, IGNORE, backend=be.name)
    second = dr.ops.cross_entropy_sample_grad(z, t, rng, IGNORE, backend=be.name)
    for a, b, name in zip(first, second, ("loss", "lse", "yhat", "G")):
        assert_bitwise_equal(a, b, f"{be} {name}")
    if be.name == "reference":
        return
    strided = torch.empty(shape[1], shape[0], device=be.device).t().copy_(z)
    for a, b, name in zip(dr.ops.cross_entropy_sample_grad(strided, t, rng, IGNORE, backend=be.name), first,
                          ("loss", "lse", "yhat", "G")):
        assert_bitwise_equal(a, b, f"{be} transposed {name}")


FUSED_BW_BACKENDS = op_backends("cross_entropy_sample_grad_backward")


@pytest.mark.parametrize("parts", ["all", "loss", "g", "g_true", "g+g_true"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("be", FUSED_BW_BACKENDS)
def test_cross_entropy_sample_grad_backward_matches_reference(be, dtype, parts):
    """The registered backward op: p ⊙ (w - ⟨p, w⟩) + grad_loss ⊙ (p - onehot(y)), w = grad_g +
    true_scale ⊙ grad_g_true, with any of the cotangents missing, within the bound of
    ce_grad_backward (its ⟨p, w⟩ is the same reordered sum) plus ce_grad's for the loss part; plus
    the roundings in z's dtype of the backends that compose the op from ce_grad_backward and
    ce_grad: of w (so ⟨p, w⟩ moves by up to Σ p|w| of them) and of the two parts before their sum."""
    shape = (5, 257)
    z, lse, target, scale, u = _grad_inputs(shape, dtype, be.device, seed=17)
    gen = torch.Generator().manual_seed(18)
    u_true = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(be.device)
    grad_loss = torch.randn(shape[0], generator=gen, dtype=torch.float64).to(lse.dtype).to(be.device)
    use = {"loss": parts in ("all", "loss"), "g": parts in ("all", "g", "g+g_true"),
           "g_true": parts in ("all", "g_true", "g+g_true")}
    args = (grad_loss if use["loss"] else None, u if use["g"] else None, u_true if use["g_true"] else None, z, lse,
            target, scale, IGNORE)
    got = _ops(be)["cross_entropy_sample_grad_backward"](*args)
    want = R.cross_entropy_sample_grad_backward(*args)
    assert got.dtype == dtype and got.shape == z.shape
    p, arg = _softmax_terms(z, lse)
    w = torch.zeros(shape, dtype=torch.float64)
    if use["g"]:
        w += u.cpu().double()
    if use["g_true"]:
        w += scale.cpu().double()[:, None] * u_true.cpu().double()
    eps, c = acc_eps(dtype), shape[1]
    pw = (p * w).sum(-1, keepdim=True)
    pw_err = 4 * eps * (2 + math.sqrt(c)) * (p * w.abs() * (2 + arg)).sum(-1, keepdim=True)
    gl = grad_loss.cpu().double().abs()[:, None] if use["loss"] else 0.0
    tol = TOL[dtype]
    out_eps = torch.finfo(dtype).eps / 2
    vjp, from_loss = p * (w - pw), gl * p
    bound = (tol["rtol"] * want.cpu().double().abs() + tol["atol"]
             + p * (4 * eps * ((w - pw).abs() + w.abs()) * (2 + arg) + pw_err) + 4 * eps * from_loss * (2 + arg)
             + 2 * out_eps * (p * (w.abs() + (p * w.abs()).sum(-1, keepdim=True)) + vjp.abs() + from_loss + 1e-30))
    assert_within(got, want, bound, f"{be} {dtype} {parts}")
    assert (got[target == IGNORE] == 0).all()


@pytest.mark.parametrize("be", FUSED_BACKENDS)
def test_cross_entropy_sample_grad_empty(be):
    for shape in ((0, 4), (0, 0)):
        z = torch.randn(shape, device=be.device)
        t = torch.zeros(0, dtype=torch.int64, device=be.device)
        loss, lse, yhat, g = dr.ops.cross_entropy_sample_grad(z, t, dr.ops.make_rng(be.device, 0), backend=be.name)
        assert loss.shape == lse.shape == yhat.shape == (0,) and g.shape == shape


# The draw ops (the state drawn by the op itself, returned last) against the base op at that state:
# the same bits on every path of a backend's kernels (CUDA: group and block mode, rows split over
# blocks, the sample then ce_grad where a row does not fit on chip, and an empty z, where no sample
# kernel runs but the state is still written).
DRAW_CASES = sized_cases("cross_entropy_sample_draw", {
    "cpu": [(6, 3), (0, 4)],
    "triton-interp": [(6, 3), (0, 4)],
    "cuda": [(6, 3), (0, 4), (5, 4096), (4, 50257), (48, 32768)],
    "triton-cuda": [(6, 3), (0, 4), (4, 50257)],
})


@pytest.mark.parametrize("seed", [None, 2**62 + 11], ids=["generator", "seed"])
@pytest.mark.parametrize("op", ["cross_entropy_sample", "cross_entropy_sample_grad"])
@pytest.mark.parametrize("be, shape", DRAW_CASES)
def test_draw_is_the_op_at_the_state_it_returns(be, shape, op, seed):
    z, t, _ = _inputs(shape, torch.float32, be.device, seed=shape[1])
    true_scale = (None,) if op == "cross_entropy_sample_grad" else ()
    *out, rng = _ops(be)[f"{op}_draw"](z, t, IGNORE, *true_scale, seed)
    assert rng.dtype == torch.int64 and rng.shape == (2,) and rng.device == z.device
    if seed is not None:
        assert rng.tolist() == [seed, 0]
    want = _ops(be)[op](z, t, rng, IGNORE, *true_scale)
    for name, got, expected in zip(("loss", "lse", "yhat", "grad", "grad_true"), out, want):
        assert_bitwise_equal(got, expected, f"{be} {op}_draw {shape} {name}")

# ------------------------------------------------------------------------------------------------
# Sizes GPU users run: CUDA's block mode (C > 1024, one 512-thread block a row), Triton past one
# chunk (C > 2048), vocabularies of GPT-2 (50257) and of 128k-token models, and for ce_grad a
# grid-stride loop past one resident wave (N·C >= 2^25). The CPU runs the same C on fewer rows.
# ------------------------------------------------------------------------------------------------

LARGE_C = (4096, 32768, 50257, 131072)
LARGE_C_CASES = sized_cases("cross_entropy_sample", {
    "cpu": [(8, c) for c in LARGE_C],
    "triton-interp": [(3, 4099)],
    "cuda": [(48, c) for c in LARGE_C] + [(3, 131072), (256, 131072)],
    "triton-cuda": [(48, c) for c in LARGE_C] + [(3, 131072), (256, 131072)],
})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("be, shape", LARGE_C_CASES)
def test_large_vocabulary_matches_reference(be, shape, dtype):
    """cross_entropy_sample, cross_entropy_sample_grad, ce_grad and ce_grad_backward at large C against
    the reference, with the error bounds of the small-shape tests (they grow with √C and |lse|)."""
    what = f"{be} {dtype} {shape}"
    z, t, rng = _inputs(shape, dtype, be.device, seed=shape[1] % 1000 + shape[0])
    _check_cross_entropy_sample(be, z, t, rng, what)
    if "cross_entropy_sample_grad" in _ops(be):
        _check_fused(be, z, t, rng, f"{what} fused")
    z, lse, label, scale, u = _grad_inputs(shape, dtype, be.device, seed=shape[1] % 997 + shape[0])
    _check_ce_grad(be, z, lse, label, scale, f"{what} ce_grad")
    _check_ce_grad_backward(be, u, z, lse, label, scale, f"{what} ce_grad_backward")


# ------------------------------------------------------------------------------------------------
# Autograd: gradcheck / gradgradcheck (float64) and opcheck of every registered op
# ------------------------------------------------------------------------------------------------


def _fast(be) -> bool:
    """Interpreted Triton launches are slow: gradcheck's fast mode (one random direction) there."""
    return be.name == "triton" and be.device == "cpu"


@pytest.mark.parametrize("be", CE_BACKENDS)
def test_cross_entropy_sample_gradcheck(be):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(be.device).requires_grad_()
    t = torch.tensor([1, IGNORE, 3], device=be.device)
    rng = dr.ops.make_rng(be.device, 17)

    def loss_only(z):
        return dr.ops.cross_entropy_sample(z, t, rng, IGNORE, backend=be.name)[0]

    def loss_and_lse(z):
        loss, lse, _ = dr.ops.cross_entropy_sample(z, t, rng, IGNORE, backend=be.name)
        return loss, lse

    for f in (loss_and_lse,) if _fast(be) else (loss_only, loss_and_lse):
        assert torch.autograd.gradcheck(f, (z,), fast_mode=_fast(be))
        assert torch.autograd.gradgradcheck(f, (z,), fast_mode=_fast(be))


@pytest.mark.parametrize("be", FUSED_BACKENDS)
def test_cross_entropy_sample_grad_gradcheck(be):
    """loss, lse, G and G_true in z (ŷ fixed by the draw: G = ce_grad(z, lse(z), ŷ, 1)), all through
    the one backward op; its own derivative (gradgradcheck) through the composite third order."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(be.device).requires_grad_()
    t = torch.tensor([1, IGNORE, 3], device=be.device)
    rng = dr.ops.make_rng(be.device, 19)

    scale = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64, device=be.device)

    def outputs(z):
        loss, lse, _, g, g_true = dr.ops.cross_entropy_sample_grad(z, t, rng, IGNORE, true_scale=scale,
                                                                   backend=be.name)
        return loss, lse, g, g_true

    def grad_only(z):
        return dr.ops.cross_entropy_sample_grad(z, t, rng, IGNORE, backend=be.name)[3]

    for f in (outputs,) if _fast(be) else (grad_only, outputs):
        assert torch.autograd.gradcheck(f, (z,), fast_mode=_fast(be))
        assert torch.autograd.gradgradcheck(f, (z,), fast_mode=_fast(be))


@pytest.mark.parametrize("be", GRAD_BACKENDS)
def test_ce_grad_gradcheck(be):
    """Wrt z and row_scale; lse = logsumexp(z) is recomputed from the perturbed z and detached (the
    op's derivative already contains lse's dependence on z)."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(be.device).requires_grad_()
    scale = torch.randn(3, generator=gen, dtype=torch.float64).to(be.device).requires_grad_()
    label = torch.tensor([2, IGNORE, 0], device=be.device)

    def f(z, scale):
        return dr.ops.ce_grad(z, torch.logsumexp(z, -1).detach(), label, scale, IGNORE, backend=be.name)

    assert torch.autograd.gradcheck(f, (z, scale), fast_mode=_fast(be))
    assert torch.autograd.gradgradcheck(f, (z, scale), fast_mode=_fast(be))


@pytest.mark.parametrize("be", GRAD_BW_BACKENDS)
def test_ce_grad_backward_gradcheck(be):
    """The backward op is differentiable too (composite third-order formula), wrt u, z, row_scale."""
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(2, 3, generator=gen, dtype=torch.float64).to(be.device).requires_grad_()
    z = torch.randn(2, 3, generator=gen, dtype=torch.float64).to(be.device).requires_grad_()
    scale = torch.randn(2, generator=gen, dtype=torch.float64).to(be.device).requires_grad_()
    label = torch.tensor([1, 0], device=be.device)
    op = _ops(be)["ce_grad_backward"]

    def f(u, z, scale):
        return op(u, z, torch.logsumexp(z, -1).detach(), label, scale, IGNORE)

    assert torch.autograd.gradcheck(f, (u, z, scale), fast_mode=_fast(be))


def _opcheck_samples(name, device):
    """(id, args) samples of each op: float64 with gradients (forward, backward and double backward
    are checked), low-precision without, and empty where the op allows it."""
    f64 = dict(dtype=torch.float64, device=device)
    gen = torch.Generator().manual_seed(4)

    def rnd(*shape, dtype=torch.float64, grad=False):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_(grad)

    rng = torch.tensor([5, -(2**40)], dtype=torch.int64, device=device)
    t3 = torch.tensor([1, IGNORE, 3], device=device)
    t2 = torch.tensor([0, 2], device=device)
    return {
        "cross_entropy_sample": [
            ("f64-grad", (rnd(3, 4, grad=True), t3, rng, IGNORE)),
            ("f16", (rnd(2, 5, dtype=torch.float16), torch.tensor([4, 0], device=device), rng, IGNORE)),
            ("bf16-empty", (rnd(0, 3, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.int64, device=device),
                            rng, IGNORE)),
        ],
        "cross_entropy_sample_grad": [
            ("f64-grad", (rnd(3, 4, grad=True), t3, rng, IGNORE)),
            ("f64-grad-true", (rnd(3, 4, grad=True), t3, rng, IGNORE, rnd(3))),
            ("bf16", (rnd(2, 5, dtype=torch.bfloat16), torch.tensor([4, 0], device=device), rng, IGNORE)),
            ("f32-empty", (rnd(0, 3, dtype=torch.float32), torch.zeros(0, dtype=torch.int64, device=device),
                           rng, IGNORE)),
        ],
        "cross_entropy_sample_grad_backward": [
            ("f64-grad", (rnd(3, grad=True), rnd(3, 4, grad=True), rnd(3, 4, grad=True), rnd(3, 4, grad=True),
                          torch.zeros(3, **f64), t3, rnd(3), IGNORE)),
            ("f32-g-only", (None, rnd(2, 3, dtype=torch.float32), None, rnd(2, 3, dtype=torch.float32),
                            torch.zeros(2, device=device), t2, None, IGNORE)),
        ],
        "ce_grad": [
            ("f64-grad", (rnd(3, 4, grad=True), torch.zeros(3, **f64), t3, rnd(3, grad=True), IGNORE)),
            ("f32", (rnd(2, 3, dtype=torch.float32), torch.zeros(2, device=device), t2,
                     torch.ones(2, device=device), IGNORE)),
        ],
        "ce_grad_backward": [
            ("f64-grad", (rnd(3, 4, grad=True), rnd(3, 4, grad=True), torch.zeros(3, **f64), t3,
                          rnd(3, grad=True), IGNORE)),
            ("bf16", (rnd(2, 3, dtype=torch.bfloat16), rnd(2, 3, dtype=torch.bfloat16), torch.zeros(2, device=device),
                      t2, torch.ones(2, device=device), IGNORE)),
        ],
    }[name]


OPCHECK_CASES = [
    pytest.param(name, i, id=f"{name}-{sample_id}")
    for name in ("cross_entropy_sample", "cross_entropy_sample_grad", "cross_entropy_sample_grad_backward", "ce_grad",
                 "ce_grad_backward")
    for i, (sample_id, _) in enumerate(_opcheck_samples(name, "cpu"))
]


@pytest.mark.parametrize("name, index", OPCHECK_CASES)
@pytest.mark.parametrize("be", op_backends("cross_entropy_sample"))
def test_opcheck(be, name, index):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) of each
    backend's registered op. Interpreted Triton: the float64-with-gradients sample only."""
    if name not in _ops(be):
        pytest.skip(f"backend {be.name!r} registers no {name!r} op")
    if _fast(be) and index > 0:
        pytest.skip("interpreted Triton: one sample per op (slow launches)")
    _, args = _opcheck_samples(name, be.device)[index]
    torch.library.opcheck(_ops(be)[name], args)


def test_registered_op_names():
    """The documented qualified names: C++ ops for cpu/cuda, ``_reference`` / ``_triton`` twins."""
    for name in ("cross_entropy_sample", "cross_entropy_sample_grad", "cross_entropy_sample_grad_backward", "ce_grad",
                 "ce_grad_backward"):
        assert dr.ops.BACKEND_OPS["reference"][name] is getattr(torch.ops.dropreg, f"{name}_reference")
        if "cpu" in dr.ops.BACKEND_OPS:
            assert dr.ops.BACKEND_OPS["cpu"][name] is getattr(torch.ops.dropreg, name)
        if name in dr.ops.BACKEND_OPS.get("triton", {}):
            assert dr.ops.BACKEND_OPS["triton"][name] is getattr(torch.ops.dropreg, f"{name}_triton")


# ------------------------------------------------------------------------------------------------
# ŷ ~ softmax(z): chi-square goodness of fit
# ------------------------------------------------------------------------------------------------


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple:
    """(statistic, p-value) of Pearson's test; p-value = Q(df/2, x/2) (regularized upper gamma)."""
    n = counts.sum().double()
    expected = n * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    pvalue = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2)
    return float(stat), float(pvalue)


# Reject at p < 1e-6: a fixed-seed test that passes is far from the bound, and a real bias (a
# wrong Gumbel transform, a shifted column) gives p-values of 1e-100 at these sample sizes.
CHI2_PVALUE = 1e-6
CHI2_STATS: dict = {}


@pytest.mark.parametrize("be", CE_BACKENDS)
def test_yhat_frequencies_match_softmax(be):
    """One row of logits repeated N times: the Gumbel streams are keyed by element index, so the N rows
    are N independent draws. N = 20000, C = 5, df = 4 (bound: statistic < 33.4); interpreted Triton
    (~50 ms a row): N = 40, C = 3 with all expected counts >= 8."""
    if _fast(be):
        logits, n = torch.tensor([0.0, 0.4, 0.8]), 40
    else:
        logits, n = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3]), 20000
    z = logits.repeat(n, 1).to(be.device)
    t = torch.zeros(n, dtype=torch.int64, device=be.device)
    _, _, yhat = dr.ops.cross_entropy_sample(z, t, dr.ops.make_rng(be.device, 2024), backend=be.name)
    probs = torch.softmax(logits.double(), -1)
    counts = torch.bincount(yhat.cpu(), minlength=logits.numel())
    assert counts.numel() == logits.numel() and int(counts.sum()) == n
    assert float((n * probs).min()) >= 8, "chi-square needs expected counts >= ~5"
    stat, pvalue = chi_square(counts, probs)
    CHI2_STATS[be.name] = (n, stat, pvalue)
    print(f"chi-square {be}: N={n} counts={counts.tolist()} expected={(n * probs).tolist()} "
          f"stat={stat:.3f} p={pvalue:.3g}")
    assert pvalue > CHI2_PVALUE, f"{be}: counts {counts.tolist()} vs {(n * probs).tolist()}: chi2 {stat}"


VOCAB = 50257  # GPT-2's
FIRST_EXACT_COLUMNS = 2048  # a row's first CPU block (128) and first Triton chunk (2048) are scored exactly


def _concentrated_row(c: int, head: int = 300) -> tuple:
    """A row of C logits whose mass sits on ``head`` classes at columns >= FIRST_EXACT_COLUMNS
    (z ~ U(0, 3)), the rest a tail z ~ U(-5.5, -4) of about 20% of the mass: (logits, head columns)."""
    gen = torch.Generator().manual_seed(26)
    z = -5.5 + 1.5 * torch.rand(c, generator=gen)
    cols = FIRST_EXACT_COLUMNS + torch.randperm(c - FIRST_EXACT_COLUMNS, generator=gen)[:head]
    z[cols] = 3 * torch.rand(head, generator=gen)
    return z, cols


@pytest.mark.parametrize("be", CE_BACKENDS)
def test_yhat_frequencies_match_softmax_large_c(be):
    """C = 50257: one concentrated row repeated N times (N = 400; 48 for the reference and
    interpreted Triton, whose draws are slow at this width). Bins: the head classes in about
    N·P(head)/10 bins of nearly equal mass (in order of probability) and one tail bin, so every
    expected count is >= 5. Most draws land past the first 2048 columns, where every backend has a
    best score and its candidate filter (16 filter bits, then the refinement) decides."""
    n = 48 if be.name == "reference" or _fast(be) else 400
    logits, head = _concentrated_row(VOCAB)
    probs = torch.softmax(logits.double(), -1)
    head = head[probs[head].argsort()]
    head_mass = float(probs[head].sum())
    n_bins = int(n * head_mass // 10)
    bin_of = torch.full((VOCAB,), n_bins, dtype=torch.int64)  # the tail's bin
    mass_before = probs[head].cumsum(0) - probs[head]
    bin_of[head] = (mass_before / head_mass * n_bins).floor().long().clamp(max=n_bins - 1)
    bin_probs = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, bin_of, probs)
    assert float((n * bin_probs).min()) >= 5, "chi-square needs expected counts >= ~5"

    z = logits.repeat(n, 1).to(be.device)
    t = torch.zeros(n, dtype=torch.int64, device=be.device)
    _, _, yhat = dr.ops.cross_entropy_sample(z, t, dr.ops.make_rng(be.device, 2026), backend=be.name)
    yhat = yhat.cpu()
    assert int((yhat >= FIRST_EXACT_COLUMNS).sum()) >= n // 2, f"{be}: the filtered columns drew too few samples"
    counts = torch.bincount(bin_of[yhat], minlength=n_bins + 1)
    stat, pvalue = chi_square(counts, bin_probs)
    print(f"chi-square {be} C={VOCAB}: N={n} bins={n_bins + 1} counts={counts.tolist()} stat={stat:.3f} "
          f"p={pvalue:.3g}")
    assert pvalue > CHI2_PVALUE, f"{be}: counts {counts.tolist()} vs {(n * bin_probs).tolist()}: chi2 {stat}"


def test_chi_square_bound_df4():
    """The stated bound: the df = 4 statistic at p = 1e-6 is 33.4 (closed form e^(-x/2)(1 + x/2))."""
    x = 33.4
    assert abs(math.exp(-x / 2) * (1 + x / 2) - 1e-6) < 5e-8
    _, p = chi_square(torch.tensor([0, 0, 0, 0, 10]), torch.full((5,), 0.2))
    assert p < 1e-6


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ------------------------------------------------------------------------------------------------

Z = torch.randn(3, 4)
T = torch.tensor([0, 1, 2])
RNG = dr.ops.make_rng("cpu", 0)
LSE = torch.zeros(3)
ONES = torch.ones(3)
CE, GRAD = dr.ops.cross_entropy_sample, dr.ops.ce_grad

BAD_CALLS = [
    ("z-1d", lambda b: CE(torch.randn(4), torch.tensor(0), RNG, backend=b), ValueError, r"argument 'z'.*2-D"),
    ("z-3d", lambda b: CE(torch.randn(2, 3, 4), T[:2], RNG, backend=b), ValueError, r"argument 'z'"),
    ("z-int", lambda b: CE(Z.long(), T, RNG, backend=b), TypeError, r"argument 'z'"),
    ("z-no-class", lambda b: CE(torch.randn(3, 0), T, RNG, backend=b), ValueError, r"argument 'z'.*class"),
    ("target-shape", lambda b: CE(Z, T[:2], RNG, backend=b), TypeError, r"argument 'target'.*\(3,\)"),
    ("target-2d", lambda b: CE(Z, T[:, None], RNG, backend=b), TypeError, r"argument 'target'"),
    ("target-float", lambda b: CE(Z, T.float(), RNG, backend=b), TypeError, r"argument 'target'.*float32"),
    ("target-int32", lambda b: CE(Z, T.int(), RNG, backend=b), TypeError, r"argument 'target'.*int32"),
    ("target-list", lambda b: CE(Z, [0, 1, 2], RNG, backend=b), TypeError, r"argument 'target'"),
    ("rng-float", lambda b: CE(Z, T, torch.tensor([1.0, 2.0]), backend=b), TypeError, r"argument 'rng'"),
    ("rng-shape", lambda b: CE(Z, T, torch.tensor([1, 2, 3]), backend=b), TypeError, r"argument 'rng'"),
    ("label-shape", lambda b: GRAD(Z, LSE, T[:2], ONES, backend=b), TypeError, r"argument 'label'"),
    ("label-float", lambda b: GRAD(Z, LSE, T.double(), ONES, backend=b), TypeError, r"argument 'label'"),
    ("lse-dtype", lambda b: GRAD(Z, LSE.double(), T, ONES, backend=b), TypeError, r"argument 'lse'"),
    ("lse-shape", lambda b: GRAD(Z, LSE[:2], T, ONES, backend=b), TypeError, r"argument 'lse'"),
    ("row_scale-dtype", lambda b: GRAD(Z, LSE, T, ONES.half(), backend=b), TypeError, r"argument 'row_scale'"),
    ("row_scale-shape", lambda b: GRAD(Z, LSE, T, ONES[None], backend=b), TypeError, r"argument 'row_scale'"),
    ("backend-bogus", lambda b: CE(Z, T, RNG, backend="bogus"), ValueError, r"argument 'backend'"),
]


@pytest.mark.parametrize("call, exc, match", [pytest.param(*c[1:], id=c[0]) for c in BAD_CALLS])
@pytest.mark.parametrize("be", op_backends("cross_entropy_sample", CPU_BACKENDS))
def test_bad_input_raises_clear_error(be, call, exc, match):
    with pytest.raises(exc, match=match):
        call(be.name)


CHECKED_BACKENDS = [p for p in op_backends("cross_entropy_sample", CPU_BACKENDS) if p.id != "triton-interp"]


@pytest.mark.parametrize("bad", [4, -1, 2**40], ids=["C", "minus1", "huge"])
@pytest.mark.parametrize("be", CHECKED_BACKENDS)
def test_target_out_of_range_raises(be, bad):
    """cpu and reference check class indices (naming the argument); the Triton launcher documents
    that it does not (no host sync) — see test_triton_out_of_range_target_gives_nan."""
    t = torch.tensor([0, bad, 1])
    with pytest.raises((ValueError, RuntimeError), match=r"argument 'target'.*\[0, 4\)"):
        dr.ops.cross_entropy_sample(Z, t, RNG, backend=be.name)
    with pytest.raises((ValueError, RuntimeError), match=r"argument 'label'.*\[0, 4\)"):
        dr.ops.ce_grad(Z, LSE, t, ONES, backend=be.name)
    with pytest.raises((ValueError, RuntimeError), match=r"argument 'label'"):
        dr.ops.BACKEND_OPS[be.name]["ce_grad_backward"](torch.randn(3, 4), Z, LSE, t, ONES, -100)


@pytest.mark.parametrize("be", [p for p in CE_CPU_BACKENDS if p.id == "triton-interp"])
def test_triton_out_of_range_target_gives_nan(be):
    """Documented Triton behaviour: no host check; the row's loss is NaN (never a plausible number)."""
    t = torch.tensor([0, 7, 1])
    try:
        loss, _, _ = dr.ops.cross_entropy_sample(Z, t, RNG, backend=be.name)
    except (ValueError, RuntimeError, AssertionError) as err:  # a device assert is fine too
        assert "target" in str(err)
        return
    assert bool(loss[1].isnan()) and bool(loss[[0, 2]].isfinite().all())


@pytest.mark.parametrize("be", op_backends("ce_grad_backward", CPU_BACKENDS))
def test_backward_op_rejects_bad_cotangent(be):
    """The registered backward op is public (dr.ops.BACKEND_OPS): a cotangent u of the wrong shape
    must be rejected naming 'u', not broadcast or fail deep inside."""
    op = dr.ops.BACKEND_OPS[be.name]["ce_grad_backward"]
    for u in (torch.randn(1, 4), torch.randn(3, 5), torch.randn(12)):
        with pytest.raises((TypeError, ValueError, RuntimeError), match=r"argument 'u'"):
            op(u, Z, LSE, T, ONES, IGNORE)
