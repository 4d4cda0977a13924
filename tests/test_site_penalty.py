"""Site penalty: ``site_penalty`` = [Σ (g_e ⊙ h)², Σ g_i ⊙ η ⊙ h] and its backward.

The reference is checked against the textbook formulas and the noise against its distribution
(Rademacher balance, dropout-noise drop fraction, mean and variance, with stated bounds). Every
backend is compared with the reference: the forward within an error bound for a reordered sum, the
backward (elementwise, η regenerated from the seed) bit for bit. Then determinism (also across
thread counts), autograd (gradcheck, gradgradcheck, opcheck of every registered op) and bad input.
"""

from __future__ import annotations

import math

import pytest
import textbook
import torch
from conftest import (
    CPU_BACKENDS,
    DTYPES,
    acc_dtype,
    acc_eps,
    assert_bitwise_equal,
    assert_within,
    op_backends,
    reordered_sum_bound,
    rounded_once_bound,
    sized_cases,
)

import dropreg_ext as dr
from dropreg_ext import reference as R

SP_BACKENDS = op_backends("site_penalty")
SP_BW_BACKENDS = op_backends("site_penalty_backward")
NOISES = ["rademacher", "dropout"]

SHAPES = [
    pytest.param((1,), id="n1"),
    pytest.param((3,), id="n3"),
    pytest.param((5, 7), id="5x7"),
    pytest.param((2, 3, 5), id="2x3x5"),
    pytest.param((4099,), id="n4099"),  # crosses the C++ kernel's 4096-element chunk
]

# which of g_e / g_i are given
GIVEN = [
    pytest.param((True, True), id="ge-gi"),
    pytest.param((True, False), id="ge-only"),
    pytest.param((False, True), id="gi-only"),
    pytest.param((False, False), id="none"),
]


def _ops(be):
    return dr.ops.BACKEND_OPS[be.name]


def _inputs(shape, dtype, device, seed, given=(True, True)):
    gen = torch.Generator().manual_seed(seed)

    def rnd():
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    h, g_e, g_i = rnd(), rnd(), rnd()
    rng = dr.ops.make_rng(device, seed * 31 + 7)
    return h, (g_e if given[0] else None), (g_i if given[1] else None), rng


def _terms(h, g_e, g_i, q, noise, rng):
    """The per-element terms (g_e h)² and g_i η h in float64, η the textbook's (tests/textbook.py)."""
    hd = h.detach().cpu().double()
    eta = textbook.site_noise(h.shape, q, noise, rng)
    te = (g_e.detach().cpu().double() * hd) ** 2 if g_e is not None else torch.zeros_like(hd)
    ti = g_i.detach().cpu().double() * eta * hd if g_i is not None else torch.zeros_like(hd)
    return te, ti


def _check_backward(be, got, grad, h, g_e, g_i, q, noise, rng, what):
    """The backend's (dh, dg_e, dg_i) bit for bit against the reference's; the reference backend's
    against the textbook's autograd in float64, within the rounding of the formulas
    (8u·Σ|products| per element, then one rounding to the input dtype)."""
    if be.name != "reference":
        want = R.site_penalty_backward(grad, h, g_e, g_i, q, noise, rng)
        for a, b, g, name in zip(got, want, (h, g_e, g_i), ("dh", "dg_e", "dg_i")):
            if g is None:
                assert b is None and a.numel() == 0, f"{what} {name}: empty tensor for a missing input"
            else:
                assert_bitwise_equal(a, b, f"{what} {name}")
        return
    _, want = textbook.site_penalty_and_grads(grad, h, g_e, g_i, q, noise, rng)
    a, b = grad.cpu().double().abs().tolist()
    hd = h.cpu().double().abs()
    eta = textbook.site_noise(h.shape, q, noise, rng).abs()
    term_e = 2 * a * g_e.cpu().double() ** 2 * hd if g_e is not None else torch.zeros_like(hd)
    term_i = b * g_i.cpu().double().abs() * eta if g_i is not None else torch.zeros_like(hd)
    rounding = {"dh": term_e + term_i,
                "dg_e": 2 * a * g_e.cpu().double().abs() * hd * hd if g_e is not None else None,
                "dg_i": b * eta * hd}
    for out, ref, g, name in zip(got, want, (h, g_e, g_i), ("dh", "dg_e", "dg_i")):
        if g is None:
            assert out.numel() == 0, f"{what} {name}: empty tensor for a missing input"
            continue
        bound = rounded_once_bound(ref, h.dtype, 8 * acc_eps(h.dtype) * rounding[name])
        assert_within(out, ref, bound, f"{what} {name} (reference vs textbook)")


# ------------------------------------------------------------------------------------------------
# The reference against textbook formulas; the noise against its distribution
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", NOISES)
def test_reference_against_textbook(noise):
    h, g_e, g_i, rng = _inputs((4, 6), torch.float64, "cpu", 1)
    q = 0.3
    eta = textbook.site_noise(h.shape, q, noise, rng)
    out = R.site_penalty(h, g_e, g_i, q, noise, rng)
    torch.testing.assert_close(out, torch.stack([((g_e * h) ** 2).sum(), (g_i * eta * h).sum()]),
                               rtol=1e-14, atol=1e-14)
    # backward by autograd on the textbook formula
    leaves = [t.clone().requires_grad_() for t in (h, g_e, g_i)]
    a, b = 0.7, -1.3
    value = a * ((leaves[1] * leaves[0]) ** 2).sum() + b * (leaves[2] * eta * leaves[0]).sum()
    expected = torch.autograd.grad(value, leaves)
    got = R.site_penalty_backward(torch.tensor([a, b], dtype=torch.float64), h, g_e, g_i, q, noise, rng)
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("noise, q", [("rademacher", 0.3), ("dropout", 0.1), ("dropout", 0.8)])
def test_noise_distribution(noise, q):
    """n = 30000 draws, bounds at 5 standard deviations: Rademacher balance P(+) = 1/2, dropout
    noise P(-1) = q' (q quantized to 2^-16, within 2^-17 of q); exact values; mean 0 and variance
    q/(1-q) (q'/(1-q') for dropout noise)."""
    n = 30_000
    eta = R.site_noise((n,), q, noise, torch.tensor([123, 456]), torch.float64)
    if noise == "rademacher":
        r = q / (1 - q)
        values, p_low = (-math.sqrt(r), math.sqrt(r)), 0.5
    else:
        q_quantized = R.dropout_threshold(q) / 2**16
        assert abs(q_quantized - q) <= 2**-17
        r = q_quantized / (1 - q_quantized)
        values, p_low = (-1.0, r), q_quantized
    assert set(torch.unique(eta).tolist()) <= set(values)
    frac_low = float((eta == values[0]).double().mean())
    assert abs(frac_low - p_low) < 5 * math.sqrt(p_low * (1 - p_low) / n), (frac_low, p_low)
    assert abs(float(eta.mean())) < 5 * math.sqrt(r / n)
    # E[η²] = r; the sample mean of η² has sd sqrt((E[η⁴] - r²)/n) (0 for Rademacher: η² = r exactly)
    fourth = p_low * values[0] ** 4 + (1 - p_low) * values[1] ** 4
    sd = math.sqrt(max(fourth - r * r, 0.0) / n)
    assert abs(float((eta**2).mean()) - r) <= 5 * sd + 1e-12 * r


def test_noise_q0_is_zero_and_dtypes():
    for noise in NOISES:
        assert (R.site_noise((7,), 0.0, noise, torch.tensor([1, 2])) == 0).all()
        assert R.site_noise((2, 3), 0.2, noise, torch.tensor([1, 2]), torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="argument 'noise'"):
        R.site_noise((3,), 0.2, "gauss", torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------------
# Every backend against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("be", SP_BACKENDS)
def test_matches_reference(be, dtype, noise, shape):
    seed = 97 * len(shape) + shape[-1]
    h, g_e, g_i, rng = _inputs(shape, dtype, be.device, seed)
    q = 0.35
    out = dr.ops.site_penalty(h, g_e, g_i, q, noise, rng, backend=be.name)
    expected = R.site_penalty(h, g_e, g_i, q, noise, rng)
    assert out.dtype == acc_dtype(dtype) and out.shape == (2,) and out.device == h.device
    te, ti = _terms(h, g_e, g_i, q, noise, rng)
    what = f"{be} {dtype} {noise} {shape}"
    assert_within(out[0], expected[0], reordered_sum_bound(te, dtype), f"{what} explicit")
    assert_within(out[1], expected[1], reordered_sum_bound(ti, dtype), f"{what} implicit")
    # the reference itself against the float64 sums of the same terms
    assert_within(expected[0], te.sum(), reordered_sum_bound(te, dtype), f"{what} reference explicit")
    assert_within(expected[1], ti.sum(), reordered_sum_bound(ti, dtype), f"{what} reference implicit")

    grad = torch.tensor([0.75, -1.25], dtype=acc_dtype(dtype), device=be.device)
    got = _ops(be)["site_penalty_backward"](grad, h, g_e, g_i, q, noise, rng)
    _check_backward(be, got, grad, h, g_e, g_i, q, noise, rng, what)


# The forward's reduction with all its partial sums (CUDA: 1024 stage-1 blocks from n >= 2^22, each
# thread over several chunks; CPU: 4096-element chunks, the last one partial) and the backward's
# grid-stride loop past one resident wave (2^25 + 5).
LARGE_N_CASES = sized_cases("site_penalty", {
    "cpu": [2**22 + 4097],
    "cuda": [2**22 + 4097, 2**25 + 5],
    "triton-cuda": [2**22 + 4097, 2**25 + 5],
})


@pytest.mark.parametrize("be, n", LARGE_N_CASES)
def test_large_site_matches_reference(be, n):
    h, g_e, g_i, rng = _inputs((n,), torch.float32, be.device, n % 1009)
    q, noise = 0.35, "dropout"
    out = dr.ops.site_penalty(h, g_e, g_i, q, noise, rng, backend=be.name)
    te, ti = _terms(h, g_e, g_i, q, noise, rng)
    assert_within(out[0], te.sum(), reordered_sum_bound(te, h.dtype), f"{be} n={n} explicit")
    assert_within(out[1], ti.sum(), reordered_sum_bound(ti, h.dtype), f"{be} n={n} implicit")
    grad = torch.tensor([0.75, -1.25], device=be.device)
    got = _ops(be)["site_penalty_backward"](grad, h, g_e, g_i, q, noise, rng)
    _check_backward(be, got, grad, h, g_e, g_i, q, noise, rng, f"{be} n={n}")


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("given", GIVEN)
@pytest.mark.parametrize("be", SP_BACKENDS)
def test_missing_g(be, given, noise):
    """A missing g_e or g_i contributes 0; its gradient slot is an empty tensor (registered op) and
    None through autograd."""
    h, g_e, g_i, rng = _inputs((5, 7), torch.float32, be.device, 3, given)
    out = dr.ops.site_penalty(h, g_e, g_i, 0.2, noise, rng, backend=be.name)
    te, ti = _terms(h, g_e, g_i, 0.2, noise, rng)
    assert_within(out, torch.stack([te.sum(), ti.sum()]),
                  torch.stack([reordered_sum_bound(te, h.dtype), reordered_sum_bound(ti, h.dtype)]), f"{be} {given}")
    if g_e is None:
        assert out[0] == 0
    if g_i is None:
        assert out[1] == 0
    grad = torch.tensor([1.5, 0.5], device=be.device)
    got = _ops(be)["site_penalty_backward"](grad, h, g_e, g_i, 0.2, noise, rng)
    _check_backward(be, got, grad, h, g_e, g_i, 0.2, noise, rng, f"{be} {given}")
    # through autograd: None gradients for the missing inputs
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (h, g_e, g_i)]
    out = dr.ops.site_penalty(*leaves, 0.2, noise, rng, backend=be.name)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out.sum(), wrt, allow_unused=True)
    assert grads[0] is not None


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("be", SP_BW_BACKENDS)
def test_backend_noise_is_the_reference_stream(be, noise):
    """dg_i = b·η·h with b = 1 and h = 1 is η itself: the backend's noise equals the reference's bit
    for bit (the RNG contract), at an odd size and nonzero offset."""
    h = torch.ones(1031, device=be.device)
    rng = torch.tensor([2**62 + 5, -(2**33) + 3], dtype=torch.int64, device=be.device)
    grad = torch.tensor([0.0, 1.0], device=be.device)
    _, _, dg_i = _ops(be)["site_penalty_backward"](grad, h, None, h, 0.3, noise, rng)
    assert_bitwise_equal(dg_i, R.site_noise(h.shape, 0.3, noise, rng.cpu()).to(be.device), f"{be} {noise}")
    # and both are the textbook stream (raw Philox on the contract's counters), rounded to float32
    assert_bitwise_equal(dg_i.cpu(), textbook.site_noise(h.shape, 0.3, noise, rng).float(), f"{be} {noise} textbook")


@pytest.mark.parametrize("be", SP_BW_BACKENDS)
def test_backward_zero_explicit_weight_signed_zero(be):
    """grad = [0, b] with g_i missing: dh = 2·0·g_e²·h is a zero; the reference computes it as
    0 + (±0) = +0, and the contract is bit equality (signed zeros included)."""
    h = -torch.rand(6, device=be.device) - 0.5
    g_e = torch.randn(6, device=be.device)
    rng = dr.ops.make_rng(be.device, 1)
    grad = torch.tensor([0.0, 1.0], device=be.device)
    got = _ops(be)["site_penalty_backward"](grad, h, g_e, None, 0.3, "dropout", rng)
    want = R.site_penalty_backward(grad, h, g_e, None, 0.3, "dropout", rng)
    assert_bitwise_equal(got[0], want[0], f"{be} dh")
    assert_bitwise_equal(got[1], want[1], f"{be} dg_e")


@pytest.mark.parametrize("shape", [pytest.param((0,), id="n0"), pytest.param((0, 3), id="0x3")])
@pytest.mark.parametrize("be", SP_BACKENDS)
def test_empty(be, shape):
    h, g_e, g_i, rng = _inputs(shape, torch.float32, be.device, 0)
    out = dr.ops.site_penalty(h, g_e, g_i, 0.5, "rademacher", rng, backend=be.name)
    assert out.tolist() == [0.0, 0.0] and out.dtype == torch.float32
    dh, dge, dgi = _ops(be)["site_penalty_backward"](torch.ones(2, device=be.device), h, g_e, g_i, 0.5,
                                                     "rademacher", rng)
    assert dh.shape == dge.shape == dgi.shape == shape


@pytest.mark.parametrize("be", SP_BACKENDS)
def test_noncontiguous(be):
    """Strided inputs give the result of their contiguous copies (η keyed by logical index): bit for
    bit for the kernels (they read the logical order), within the sum bound for the reference (torch's
    sum of a strided tensor may add in memory order)."""
    gen = torch.Generator().manual_seed(9)
    h, g_e, g_i = (torch.randn(8, 6, generator=gen).to(be.device).t() for _ in range(3))
    rng = dr.ops.make_rng(be.device, 5)
    got = dr.ops.site_penalty(h, g_e, g_i, 0.4, "dropout", rng, backend=be.name)
    want = dr.ops.site_penalty(h.contiguous(), g_e.contiguous(), g_i.contiguous(), 0.4, "dropout", rng,
                               backend=be.name)
    if be.name == "reference":
        te, ti = _terms(h, g_e, g_i, 0.4, "dropout", rng)
        bound = torch.stack([reordered_sum_bound(te, h.dtype), reordered_sum_bound(ti, h.dtype)])
        assert_within(got, want, bound, f"{be}")
    else:
        assert_bitwise_equal(got, want, f"{be} forward")
    grad = torch.tensor([0.5, 2.0], device=be.device)
    op = _ops(be)["site_penalty_backward"]
    for a, b in zip(op(grad, h, g_e, g_i, 0.4, "dropout", rng),
                    op(grad, h.contiguous(), g_e.contiguous(), g_i.contiguous(), 0.4, "dropout", rng)):
        assert_bitwise_equal(a, b, f"{be} backward")


@pytest.mark.parametrize("be", SP_BACKENDS)
def test_deterministic(be):
    """Same inputs twice: bit-identical sums (fixed-order reduction, no float atomics)."""
    n = 3000 if be.name == "triton" and be.device == "cpu" else 9000
    h, g_e, g_i, rng = _inputs((n,), torch.float32, be.device, 4)
    first = dr.ops.site_penalty(h, g_e, g_i, 0.3, "rademacher", rng, backend=be.name)
    assert_bitwise_equal(first, dr.ops.site_penalty(h, g_e, g_i, 0.3, "rademacher", rng, backend=be.name))
    grad = torch.tensor([0.3, 0.7], device=be.device)
    op = _ops(be)["site_penalty_backward"]
    for a, b in zip(op(grad, h, g_e, g_i, 0.3, "rademacher", rng), op(grad, h, g_e, g_i, 0.3, "rademacher", rng)):
        assert_bitwise_equal(a, b, f"{be}")


@pytest.mark.skipif(not dr._ext.HAS_CPU, reason="dropreg_ext._C not loaded")
def test_cpu_sum_independent_of_thread_count():
    """The C++ reduction cuts fixed 4096-element chunks: the result must not depend on threads."""
    h, g_e, g_i, rng = _inputs((20011,), torch.float32, "cpu", 6)
    threads = torch.get_num_threads()
    try:
        outs = []
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            outs.append(dr.ops.site_penalty(h, g_e, g_i, 0.3, "dropout", rng, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert_bitwise_equal(out, outs[0], "threads")


# ------------------------------------------------------------------------------------------------
# Autograd: gradcheck / gradgradcheck (float64) and opcheck of every registered op
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("given", GIVEN[:3])
@pytest.mark.parametrize("be", SP_BACKENDS)
def test_gradcheck(be, given, noise):
    """Wrt h, g_e, g_i (those given). Interpreted Triton: one case, gradcheck's fast mode."""
    fast = be.name == "triton" and be.device == "cpu"
    if fast and (given != (True, True) or noise != "rademacher"):
        pytest.skip("interpreted Triton: one gradcheck case (slow launches)")
    h, g_e, g_i, rng = _inputs((2, 3), torch.float64, be.device, 12, given)
    inputs = [t.requires_grad_() for t in (h, g_e, g_i) if t is not None]

    def f(*args):
        it = iter(args)
        h_ = next(it)
        ge = next(it) if given[0] else None
        gi = next(it) if given[1] else None
        return dr.ops.site_penalty(h_, ge, gi, 0.3, noise, rng, backend=be.name)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=fast)


def _opcheck_samples(name, device, small):
    gen = torch.Generator().manual_seed(5)
    rng = torch.tensor([3, -(2**40)], dtype=torch.int64, device=device)

    def rnd(*shape, dtype=torch.float64, grad=False):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_(grad)

    if name == "site_penalty":
        samples = [
            (rnd(3, 4, grad=True), rnd(3, 4, grad=True), rnd(3, 4, grad=True), 0.3, "rademacher", rng),
            (rnd(5, grad=True), None, rnd(5, grad=True), 0.5, "dropout", rng),
            (rnd(2, 3, dtype=torch.bfloat16), rnd(2, 3, dtype=torch.bfloat16), None, 0.1, "rademacher", rng),
            (rnd(0, 3, dtype=torch.float32), None, None, 0.2, "dropout", rng),
        ]
    else:
        samples = [
            (rnd(2, grad=True), rnd(3, 4, grad=True), rnd(3, 4, grad=True), rnd(3, 4, grad=True), 0.3,
             "rademacher", rng),
            (rnd(2, dtype=torch.float32), rnd(7, dtype=torch.float16), None, rnd(7, dtype=torch.float16), 0.6,
             "dropout", rng),
            (rnd(2, dtype=torch.float32), rnd(4, dtype=torch.float32), rnd(4, dtype=torch.float32), None, 0.2,
             "dropout", rng),
        ]
    return samples[:2] if small else samples


@pytest.mark.parametrize("name", ["site_penalty", "site_penalty_backward"])
@pytest.mark.parametrize("be", SP_BACKENDS)
def test_opcheck(be, name):
    if name not in _ops(be):
        pytest.skip(f"backend {be.name!r} registers no {name!r} op")
    for args in _opcheck_samples(name, be.device, small=be.name == "triton" and be.device == "cpu"):
        torch.library.opcheck(_ops(be)[name], args)


def test_registered_op_names():
    for name in ("site_penalty", "site_penalty_backward"):
        assert dr.ops.BACKEND_OPS["reference"][name] is getattr(torch.ops.dropreg, f"{name}_reference")
        if "cpu" in dr.ops.BACKEND_OPS:
            assert dr.ops.BACKEND_OPS["cpu"][name] is getattr(torch.ops.dropreg, name)
        if name in dr.ops.BACKEND_OPS.get("triton", {}):
            assert dr.ops.BACKEND_OPS["triton"][name] is getattr(torch.ops.dropreg, f"{name}_triton")


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ------------------------------------------------------------------------------------------------

H = torch.randn(4, 3)
G = torch.randn(4, 3)
RNG = dr.ops.make_rng("cpu", 0)
SP = dr.ops.site_penalty

BAD_CALLS = [
    ("g_e-shape", lambda b: SP(H, G[:2], None, 0.3, "dropout", RNG, backend=b), ValueError,
     r"argument 'g_e'.*\(4, 3\).*\(2, 3\)"),
    ("g_i-shape", lambda b: SP(H, None, G.t(), 0.3, "dropout", RNG, backend=b), ValueError, r"argument 'g_i'"),
    ("g_i-flat", lambda b: SP(H, G, G.flatten(), 0.3, "dropout", RNG, backend=b), ValueError, r"argument 'g_i'"),
    ("g_e-int", lambda b: SP(H, G.long(), None, 0.3, "dropout", RNG, backend=b), TypeError, r"argument 'g_e'"),
    ("h-int", lambda b: SP(H.long(), None, None, 0.3, "dropout", RNG, backend=b), TypeError, r"argument 'h'"),
    ("h-list", lambda b: SP([1.0], None, None, 0.3, "dropout", RNG, backend=b), TypeError, r"argument 'h'"),
    ("noise-bogus", lambda b: SP(H, G, G, 0.3, "gauss", RNG, backend=b), ValueError,
     r"argument 'noise'.*gauss"),
    ("noise-none", lambda b: SP(H, G, G, 0.3, None, RNG, backend=b), ValueError, r"argument 'noise'"),
    ("q-1", lambda b: SP(H, G, G, 1.0, "dropout", RNG, backend=b), ValueError, r"argument 'q'.*\[0, 1\)"),
    ("q-negative", lambda b: SP(H, G, G, -0.1, "dropout", RNG, backend=b), ValueError, r"argument 'q'"),
    ("q-1.5", lambda b: SP(H, G, G, 1.5, "rademacher", RNG, backend=b), ValueError, r"argument 'q'"),
    ("q-nan", lambda b: SP(H, G, G, float("nan"), "rademacher", RNG, backend=b), ValueError, r"argument 'q'"),
    ("q-bool", lambda b: SP(H, G, G, True, "rademacher", RNG, backend=b), TypeError, r"argument 'q'"),
    ("rng-float", lambda b: SP(H, G, G, 0.3, "dropout", torch.tensor([1.0, 2.0]), backend=b), TypeError,
     r"argument 'rng'"),
    ("rng-shape", lambda b: SP(H, G, G, 0.3, "dropout", torch.tensor([[1, 2]]), backend=b), TypeError,
     r"argument 'rng'"),
]


@pytest.mark.parametrize("call, exc, match", [pytest.param(*c[1:], id=c[0]) for c in BAD_CALLS])
@pytest.mark.parametrize("be", op_backends("site_penalty", CPU_BACKENDS))
def test_bad_input_raises_clear_error(be, call, exc, match):
    with pytest.raises(exc, match=match):
        call(be.name)


@pytest.mark.parametrize("be", op_backends("site_penalty_backward", CPU_BACKENDS))
def test_backward_op_rejects_bad_grad(be):
    """The registered backward ops are public (dr.ops.BACKEND_OPS): a wrong output gradient must be
    rejected naming 'grad', not unpacked or broadcast."""
    op = _ops(be)["site_penalty_backward"]
    for grad in (torch.ones(3), torch.ones(1, 2)):
        with pytest.raises((TypeError, ValueError, RuntimeError), match=r"argument 'grad'"):
            op(grad, H, G, G, 0.3, "dropout", RNG)
