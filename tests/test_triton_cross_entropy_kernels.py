"""The launch paths of the Triton cross-entropy kernels (``triton_kernels/cross_entropy.py``).

The launch plan picks a path from the shape: one chunk per row held in registers, several rows per
program (small C), several chunks per row, rows split over programs with a merge kernel (long rows,
few of them), and for ``ce_grad_backward`` one or two passes. At the sizes the interpreter can run
most shapes take the first path, so each test lowers the plan's constants (monkeypatch) to force
its path at a small size, then checks against the reference:

- ``cross_entropy_sample``: ŷ exactly (float ties aside, see conftest.assert_yhat_matches), loss and
  lse within the error bound of test_cross_entropy.py;
- ``cross_entropy_sample_grad``: loss, lse and ŷ bit-identical to ``cross_entropy_sample``, and G
  bit-identical to this backend's ``ce_grad(z, lse, sampled_label, 1)`` and within ce_grad's
  bound of the reference;
- NaN and ±inf logits placed across chunk and split boundaries, and an ``ignore_index`` that is a
  real class.

tests/test_triton_compile.py compiles every kernel for sm_90 at the launchers' plans (without a GPU).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import TOL, acc_dtype, acc_eps, assert_bitwise_equal, assert_within, assert_yhat_matches

import dropreg_ext as dr
from dropreg_ext import reference as R

ce = pytest.importorskip("dropreg_ext.triton_kernels.cross_entropy")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1"),
    # NumPy (the Triton interpreter) warns about the inf - inf and log(0) of the special rows.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]
IGNORE = -100
NAN, INF = float("nan"), float("inf")

MULTI_CHUNK = dict(MAX_BLOCK_C=64)  # rows of more than 64 columns take several chunks
SPLIT = dict(MAX_BLOCK_C=64, SPLIT_PROGRAMS=64, SPLIT_MIN_CHUNKS=1)  # and are split when N < 64


@pytest.fixture
def plan(monkeypatch):
    """``plan(**constants)`` sets the launch plan's module constants for this test."""

    def set_constants(**constants):
        for name, value in constants.items():
            monkeypatch.setattr(ce, name, value)

    return set_constants


def _logits(n, c, dtype, seed, scale=3.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    z = offset + scale * torch.randn(n, c, generator=gen, dtype=torch.float64)
    t = torch.randint(0, c, (n,), generator=gen)
    if n > 1:
        t[1::3] = IGNORE
    return z.to(dtype).to(DEVICE), t.to(DEVICE), dr.ops.make_rng(DEVICE, seed * 7919 + 1)


def _lse_bound(z, t, lse_ref, ignore_index=IGNORE):
    """4u·(√C + |lse| + |z_y|): the bound of test_cross_entropy.py."""
    za = z.cpu().double()
    z_y = za.gather(1, torch.where(t.cpu() == ignore_index, 0, t.cpu())[:, None]).squeeze(1).abs()
    return 4 * acc_eps(z.dtype) * (math.sqrt(z.shape[1]) + lse_ref.cpu().double().abs() + z_y)


def _check(z, t, rng, what, ignore_index=IGNORE):
    """cross_entropy_sample against the reference, and the fused op against both."""
    loss, lse, yhat = ce.cross_entropy_sample(z, t, rng, ignore_index)
    rloss, rlse, ryhat = R.cross_entropy_sample(z.cpu(), t.cpu(), rng.cpu(), ignore_index)
    bound = _lse_bound(z, t, rlse, ignore_index)
    assert_within(lse, rlse, bound, f"{what} lse")
    assert_within(loss, rloss, bound, f"{what} loss")
    assert_yhat_matches(yhat, ryhat, z, rng, what)
    valid = t != ignore_index
    assert (yhat[~valid] == ignore_index).all() and (loss[~valid] == 0).all()

    fused = ce.cross_entropy_sample_grad(z, t, rng, ignore_index)[:4]
    for got, want, name in zip(fused, (loss, lse, yhat), ("loss", "lse", "yhat")):
        assert_bitwise_equal(got, want, f"{what} fused {name}")
    g = fused[3]
    assert g.dtype == z.dtype and g.shape == z.shape and g.is_contiguous()
    label = R.sampled_label(t, yhat, ignore_index)
    ones = torch.ones_like(lse)
    assert_bitwise_equal(g, ce.ce_grad(z, lse, label, ones, -1), f"{what} G vs this backend's ce_grad")
    expected = R.ce_grad(z.cpu(), lse.cpu(), label.cpu(), ones.cpu(), -1)
    arg = (z.cpu().double() - lse.cpu().double()[:, None])
    tol = TOL[z.dtype]
    g_bound = tol["rtol"] * expected.double().abs() + tol["atol"] + 4 * acc_eps(z.dtype) * arg.exp() * (2 + arg.abs())
    assert_within(g, expected, g_bound, f"{what} G")
    assert (g[~valid] == 0).all()
    return loss, lse, yhat, g


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------


def test_plan_depends_on_the_shape_only():
    small = ce._sample_plan(1000, 3)
    assert small.one_chunk and small.rows > 1 and small.splits == 1 and not small.aligned
    row = ce._sample_plan(1000, 1000)
    assert row.one_chunk and row.rows == 1 and row.aligned
    gpt2 = ce._sample_plan(4096, 50257)
    assert not gpt2.one_chunk and gpt2.block == ce.MAX_BLOCK_C and gpt2.splits == 1 and not gpt2.aligned
    few = ce._sample_plan(8, 131072)
    assert few.splits > 1 and few.aligned and few.split_cols % few.block == 0
    assert (few.splits - 1) * few.split_cols < 131072 <= few.splits * few.split_cols
    assert ce._sample_plan(ce.SPLIT_PROGRAMS, 131072).splits == 1
    assert ce._sample_plan(8, 131072) == few  # a pure function of (N, C)


# ------------------------------------------------------------------------------------------------
# Each path against the reference
# ------------------------------------------------------------------------------------------------

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float64, id="f64")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1, 3, 6, 16, 37, 130])
def test_several_rows_per_program(dtype, c):
    """Small C: a (rows, groups, 8) tile per program, the last one partly past N."""
    n = 2 * max(1, ce.ROW_TILE // ce._sample_plan(70, c).block) + 3
    assert ce._sample_plan(n, c).rows > 1
    _check(*_logits(n, c, dtype, seed=c), f"{dtype} ({n}, {c})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [304, 301, 258], ids=["C304-aligned", "C301", "C258"])
def test_several_chunks_per_row(plan, dtype, c):
    """Rows of 5-6 chunks: the candidate filter across chunks and G by a second loop."""
    plan(**MULTI_CHUNK)
    p = ce._sample_plan(5, c)
    assert not p.one_chunk and p.splits == 1 and p.aligned == (c % 8 == 0)
    _check(*_logits(5, c, dtype, seed=c), f"{dtype} (5, {c})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1000, 1001], ids=["C1000-aligned", "C1001"])
def test_rows_split_over_programs(plan, dtype, c):
    """Few long rows: a row's chunks over several programs, partial states merged in split order."""
    plan(**SPLIT)
    p = ce._sample_plan(3, c)
    assert p.splits > 2
    _check(*_logits(3, c, dtype, seed=c), f"{dtype} (3, {c}) split {p.splits}")


@pytest.mark.parametrize("scale, offset", [(0.01, 0.0), (1.0, 0.0), (8.0, 0.0), (1.0, 3e4), (30.0, -1e4)],
                         ids=["flat", "unit", "wide", "offset3e4", "wide-offset-1e4"])
def test_filter_keeps_the_sample_exact(plan, scale, offset):
    """Many chunks per row, so most are filtered: ŷ stays the reference's on flat rows (many
    elements near the top), peaked ones, and logits so large that z + G rounds coarsely."""
    plan(**MULTI_CHUNK)
    z, t, rng = _logits(4, 800, torch.float32, seed=int(scale * 10) + 1, scale=scale, offset=offset)
    t[:] = 0
    _check(z, t, rng, f"scale {scale} offset {offset}")


PATHS = [pytest.param({}, 5, id="rows-per-program"), pytest.param(MULTI_CHUNK, 150, id="chunks"),
         pytest.param(SPLIT, 300, id="split")]


@pytest.mark.parametrize("constants, c", PATHS)
def test_ignore_index_that_is_a_class(plan, constants, c):
    """ignore_index = 2, a real class that most valid rows sample: their G keeps the -1 at column 2,
    ignored rows (target 2) are 0 and sample nothing."""
    plan(**constants)
    n = 9
    gen = torch.Generator().manual_seed(c)
    z = torch.randn(n, c, generator=gen)
    z[:, 2] += 8.0
    t = torch.tensor([0, 2, 1, 0, 2, 1, 0, 1, 0])
    z, t, rng = z.to(DEVICE), t.to(DEVICE), dr.ops.make_rng(DEVICE, 5)
    _, _, yhat, g = _check(z, t, rng, f"ignore_index=2 {constants}", ignore_index=2)
    sampled_2 = (t != 2) & (yhat == 2)
    assert sampled_2.sum() >= 3, "the case this test is about did not occur: change the seed"
    assert (g[sampled_2, 2] < 0).all()
    assert (yhat[t == 2] == 2).all()


def _special_rows(c: int) -> torch.Tensor:
    """Rows with NaN and ±inf at both ends and around chunk boundaries (every 64 columns)."""
    z = torch.randn(12, c, generator=torch.Generator().manual_seed(c), dtype=torch.float64)
    z[1] = NAN
    z[2, c // 3], z[2, c - 2] = INF, NAN  # +inf, then a NaN in a later chunk
    z[3, c - 1] = INF  # one +inf, in the last chunk
    z[4, 5], z[4, c // 2] = INF, INF  # two +inf in different chunks: the first wins
    z[5] = -INF
    z[6, ::2] = -INF
    z[7, 70] = NAN  # one NaN, not in the first chunk
    z[8, 0] = -INF  # the target's logit: loss +inf
    z[9, : c - 3] = -INF  # all -inf but the last chunk's tail
    z[10, 63], z[10, 64] = NAN, NAN  # two NaN across a chunk boundary: the first wins
    z[11, 64:] = 50.0  # the max jumps in the second chunk (rescaled sums, a stale best score)
    return z.float().to(DEVICE)


@pytest.mark.parametrize("constants, c", [pytest.param({}, 300, id="one-chunk"), *PATHS[1:]])
def test_non_finite_logits(plan, constants, c):
    """torch.logsumexp's lse (NaN, ±inf, finite), lse - z[target], torch.argmax(z + G) for ŷ, and G
    the reference's ce_grad(z, lse, ŷ, 1) with the same NaN and ±inf entries."""
    plan(**constants)
    z = _special_rows(c)
    t = torch.zeros(z.shape[0], dtype=torch.int64, device=DEVICE)
    rng = dr.ops.make_rng(DEVICE, 11)
    loss, lse, yhat, g, _ = ce.cross_entropy_sample_grad(z, t, rng, IGNORE)
    for got, want, name in zip((loss, lse, yhat), ce.cross_entropy_sample(z, t, rng, IGNORE), ("loss", "lse", "yhat")):
        assert_bitwise_equal(got, want, f"fused {name}")
    zd = z.cpu().double()
    want_lse = torch.logsumexp(zd, -1)
    want_loss = want_lse - zd[:, 0]
    want_yhat = (z.cpu() + R.gumbel_noise(rng.cpu(), *z.shape)).argmax(-1)
    for name, got, want in (("lse", lse, want_lse), ("loss", loss, want_loss)):
        got = got.cpu().double()
        assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN rows {got.isnan()} vs {want.isnan()}"
        special = ~want.isfinite() & ~want.isnan()
        assert torch.equal(got[special], want[special]), f"{name}: ±inf rows"
        torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], rtol=1e-5, atol=1e-5)
    assert yhat.cpu().tolist() == want_yhat.tolist()
    want_g = R.ce_grad(z.cpu(), lse.cpu(), yhat.cpu(), torch.ones_like(lse.cpu()), IGNORE).double()
    got_g = g.cpu().double()
    assert torch.equal(got_g.isnan(), want_g.isnan()), "G: NaN entries"
    special = ~want_g.isfinite() & ~want_g.isnan()
    assert torch.equal(got_g[special], want_g[special]), "G: ±inf entries"
    torch.testing.assert_close(got_g[want_g.isfinite()], want_g[want_g.isfinite()], rtol=1e-5, atol=1e-6)


def test_ignored_rows_only(plan):
    """Programs whose rows are all ignored skip the Gumbel draw; outputs as the reference."""
    plan(**SPLIT)
    z, _, rng = _logits(3, 700, torch.float32, seed=3)
    _check(z, torch.full((3,), IGNORE, device=DEVICE), rng, "all ignored")


# ------------------------------------------------------------------------------------------------
# ce_grad and ce_grad_backward: several rows per program, one and two passes
# ------------------------------------------------------------------------------------------------


def _grad_inputs(n, c, dtype, seed):
    z, label, _ = _logits(n, c, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    acc = acc_dtype(dtype)
    lse = torch.logsumexp(z.to(acc), -1)
    scale = torch.randn(n, generator=gen, dtype=torch.float64).to(acc).to(DEVICE)
    u = torch.randn(n, c, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    return u, z, lse, label, scale


GRAD_SHAPES = [pytest.param({}, 70, 5, id="rows-per-program"), pytest.param({}, 3, 1000, id="one-row"),
               pytest.param(MULTI_CHUNK, 4, 300, id="two-pass")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("constants, n, c", GRAD_SHAPES)
def test_ce_grad_and_backward_paths(plan, constants, n, c, dtype):
    plan(**constants)
    u, z, lse, label, scale = _grad_inputs(n, c, dtype, seed=c)
    p = (z.cpu().double() - lse.cpu().double()[:, None]).exp()
    arg = (z.cpu().double() - lse.cpu().double()[:, None]).abs()
    eps, tol = acc_eps(dtype), TOL[dtype]
    s = scale.cpu().double().abs()[:, None]

    g = ce.ce_grad(z, lse, label, scale, IGNORE)
    want = R.ce_grad(z.cpu(), lse.cpu(), label.cpu(), scale.cpu(), IGNORE)
    assert_within(g, want, tol["rtol"] * want.double().abs() + tol["atol"] + 4 * eps * s * p * (2 + arg), "ce_grad")

    grad_z, grad_s = ce.ce_grad_backward(u, z, lse, label, scale, IGNORE)
    ez, es = R.ce_grad_backward(u.cpu(), z.cpu(), lse.cpu(), label.cpu(), scale.cpu(), IGNORE)
    ua = u.cpu().double()
    pu = (p * ua).sum(-1, keepdim=True)
    pu_err = 4 * eps * (2 + math.sqrt(c)) * (p * ua.abs() * (2 + arg)).sum(-1, keepdim=True)
    bound_z = tol["rtol"] * ez.double().abs() + tol["atol"] + s * p * (4 * eps * (ua - pu).abs() * (2 + arg) + pu_err)
    assert_within(grad_z, ez, bound_z, "ce_grad_backward grad_z")
    u_y = ua.gather(1, torch.where(label.cpu() == IGNORE, 0, label.cpu())[:, None])
    assert_within(grad_s, es, (pu_err + 4 * eps * u_y.abs()).squeeze(1), "ce_grad_backward grad_row_scale")


@pytest.mark.parametrize("constants, c", [pytest.param({}, 5, id="one-pass"),
                                          pytest.param(MULTI_CHUNK, 300, id="two-pass")])
def test_ce_grad_backward_label_out_of_range(plan, constants, c):
    """No host check: a valid label outside [0, C) gives a NaN grad_row_scale and row (0 on ignored)."""
    plan(**constants)
    u, z, lse, _, scale = _grad_inputs(3, c, torch.float32, seed=1)
    label = torch.tensor([0, c, IGNORE], device=DEVICE)
    try:
        grad_z, grad_s = ce.ce_grad_backward(u, z, lse, label, scale, IGNORE)
    except (AssertionError, RuntimeError) as err:  # a device assert is fine too
        assert "label" in str(err)
        return
    assert grad_s[1].isnan() and grad_z[1].isnan().all()
    assert grad_s[0].isfinite() and grad_s[2] == 0 and (grad_z[2] == 0).all()
