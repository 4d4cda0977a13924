"""NaN and ±inf inputs on every backend: the NaN policy of docs/numerics.md.

- Dropout: a kept NaN or ±inf stays NaN or ±inf (scaled); a dropped element is exactly 0 whatever
  its value (y = m ⊙ x / (1 - p) never forms 0·NaN).
- Cross-entropy: lse is NaN if the row holds a NaN, else +inf if it holds a +inf, else -inf for an
  all -inf row, else finite: torch.logsumexp's values. loss = lse - z[target]. ŷ follows
  torch.argmax on the scores z + G: the first NaN wins, then the largest, ties to the smallest column.
- Site penalty: a NaN or inf term makes its sum NaN or inf, as a float sum does.
- A NaN's sign and payload are unspecified (GPUs return the canonical NaN, CPUs keep the input's):
  ``assert_bitwise_equal`` compares every other value bit for bit, signed zeros included.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, assert_bitwise_equal, op_backends

import dropreg_ext as dr
from dropreg_ext import reference as R

NAN, INF = float("nan"), float("inf")
IGNORE = -100


def _special(n: int, dtype, device) -> torch.Tensor:
    """randn with NaN, +inf, -inf and signed zeros at fixed places."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    x[::7] = NAN
    x[1::11] = INF
    x[2::13] = -INF
    x[3::17] = -0.0
    x[4::19] = 0.0
    return x.to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("be", op_backends("dropout"))
def test_dropout_special_values(be, dtype):
    x = _special(1031, dtype, be.device)
    rng = dr.ops.make_rng(be.device, 3)
    y = dr.ops.fused_dropout(x, 0.3, rng, backend=be.name)
    keep = R.dropout_keep(x.shape, 0.3, rng).to(be.device)
    assert bool((y[~keep] == 0).all()) and not bool(y[~keep].signbit().any()), "dropped elements are +0"
    assert bool((y[keep].isnan() == x[keep].isnan()).all()), "kept NaN stays NaN, nothing else becomes NaN"
    assert bool((y[keep].isinf() == x[keep].isinf()).all()) and bool((y[keep].sign() == x[keep].sign())[
        ~x[keep].isnan()].all())
    assert_bitwise_equal(y, R.dropout(x, 0.3, rng), f"{be} {dtype} vs reference")


# One row per case; C columns, the special values placed inside the row.
def _special_logits(c: int, device) -> torch.Tensor:
    z = torch.randn(9, c, generator=torch.Generator().manual_seed(c), dtype=torch.float64)
    z[1] = NAN  # all NaN
    z[2, c // 3], z[2, c // 2] = NAN, INF  # NaN with +inf
    z[3, c - 1] = INF  # one +inf, at the end
    z[4, 0], z[4, c // 2] = INF, INF  # two +inf: the first wins ŷ
    z[5] = -INF  # all -inf
    z[6, ::2] = -INF  # -inf mixed with finite values
    z[7, c // 2] = NAN  # one NaN
    z[8, 0] = -INF  # the target's logit is -inf: loss +inf
    return z.to(device)


def _textbook(z: torch.Tensor, t: torch.Tensor, rng: torch.Tensor):
    """torch.logsumexp and lse - z[t] in float64; torch.argmax of the float32 scores z + G."""
    zd = z.double().cpu()
    lse = torch.logsumexp(zd, -1)
    loss = lse - zd.gather(1, t.cpu()[:, None]).squeeze(1)
    g = R.gumbel_noise(rng.cpu(), z.shape[0], z.shape[1])
    return lse, loss, (z.float().cpu() + g).argmax(-1)


# NumPy (the Triton interpreter) warns about the inf - inf and log(0) these rows are made of.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("c", [7, 1500, 5000], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("be", op_backends("cross_entropy_sample"))
def test_cross_entropy_special_values(be, c):
    """Every backend gives torch.logsumexp's lse (NaN, ±inf and finite rows alike), the textbook loss
    and torch.argmax's ŷ. Finite values within float32 rounding, special ones exactly."""
    if be.name == "triton" and be.device == "cpu" and c == 7:
        pytest.skip("interpreted Triton: the chunked cases only (slow launches)")
    z = _special_logits(c, be.device).float()
    t = torch.zeros(z.shape[0], dtype=torch.int64, device=be.device)
    rng = dr.ops.make_rng(be.device, 11)
    loss, lse, yhat = dr.ops.cross_entropy_sample(z, t, rng, IGNORE, backend=be.name)
    want_lse, want_loss, want_yhat = _textbook(z, t, rng)
    for name, got, want in (("lse", lse, want_lse), ("loss", loss, want_loss)):
        got = got.double().cpu()
        assert bool((got.isnan() == want.isnan()).all()), f"{be} {name}: NaN rows {got.isnan()} vs {want.isnan()}"
        finite = want.isfinite()
        assert bool((got[~finite & ~want.isnan()] == want[~finite & ~want.isnan()]).all()), f"{be} {name}: ±inf rows"
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert yhat.cpu().tolist() == want_yhat.tolist(), f"{be} yhat vs torch.argmax(z + G)"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("c", [7, 1500], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("be", op_backends("cross_entropy_sample_grad"))
def test_cross_entropy_sample_grad_special_values(be, c):
    """The fused op on the same rows: loss, lse and ŷ those of cross_entropy_sample (bit for bit, NaN
    included), and G the reference's ce_grad(z, lse, ŷ, 1): the same NaN and ±inf entries, finite
    ones within float32 rounding."""
    if be.name == "triton" and be.device == "cpu" and c == 7:
        pytest.skip("interpreted Triton: the chunked case only (slow launches)")
    z = _special_logits(c, be.device).float()
    t = torch.zeros(z.shape[0], dtype=torch.int64, device=be.device)
    rng = dr.ops.make_rng(be.device, 11)
    loss, lse, yhat, g = dr.ops.cross_entropy_sample_grad(z, t, rng, IGNORE, backend=be.name)
    for name, got, want in zip(("loss", "lse", "yhat"), (loss, lse, yhat),
                               dr.ops.cross_entropy_sample(z, t, rng, IGNORE, backend=be.name)):
        assert_bitwise_equal(got, want, f"{be} {name}")
    want_g = R.ce_grad(z.cpu(), lse.cpu(), yhat.cpu(), torch.ones_like(lse.cpu()), IGNORE).double()
    got_g = g.double().cpu()
    assert bool((got_g.isnan() == want_g.isnan()).all()), f"{be} G: NaN entries differ"
    special = ~want_g.isfinite() & ~want_g.isnan()
    assert bool((got_g[special] == want_g[special]).all()), f"{be} G: ±inf entries differ"
    finite = want_g.isfinite()
    torch.testing.assert_close(got_g[finite], want_g[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("be", op_backends("site_penalty"))
def test_site_penalty_special_values(be):
    """A NaN in h makes both sums NaN; an inf makes the explicit sum inf; the backward equals the
    reference's elementwise formulas (NaN where they give NaN)."""
    rng = dr.ops.make_rng(be.device, 5)
    g = torch.randn(257, generator=torch.Generator().manual_seed(1)).to(be.device)
    for name, value, want in (("nan", NAN, (True, True)), ("inf", INF, (False, None))):
        h = torch.randn(257, generator=torch.Generator().manual_seed(2)).to(be.device)
        h[100] = value
        out = dr.ops.site_penalty(h, g, g, 0.3, "dropout", rng, backend=be.name).cpu()
        ref = R.site_penalty(h, g, g, 0.3, "dropout", rng).cpu()
        assert bool(out.isnan()[0]) == want[0] and (want[0] or out[0] == INF), f"{be} {name}: explicit {out}"
        assert bool((out.isnan() == ref.isnan()).all()) and bool((out.isinf() == ref.isinf()).all()), (
            f"{be} {name}: {out} vs reference {ref}")
        grad = torch.tensor([0.5, -1.5], device=be.device)
        got = dr.ops.BACKEND_OPS[be.name]["site_penalty_backward"](grad, h, g, g, 0.3, "dropout", rng)
        for a, b, part in zip(got, R.site_penalty_backward(grad, h, g, g, 0.3, "dropout", rng), ("dh", "dg_e", "dg_i")):
            assert_bitwise_equal(a, b, f"{be} {name} {part}")


def test_nan_policy_of_the_bitwise_helper():
    """assert_bitwise_equal: any NaN matches any NaN (payload and sign free); everything else bit
    for bit (here: -0 vs +0 fails)."""
    canonical = torch.tensor([0x7FC0], dtype=torch.int16).view(torch.bfloat16)
    payload = torch.tensor([0x7FC1 | -0x8000], dtype=torch.int16).view(torch.bfloat16)
    assert_bitwise_equal(payload, canonical)
    with pytest.raises(pytest.fail.Exception):
        assert_bitwise_equal(torch.tensor([-0.0]), torch.tensor([0.0]))
    with pytest.raises(pytest.fail.Exception):
        assert_bitwise_equal(torch.tensor([NAN]), torch.tensor([1.0]))
