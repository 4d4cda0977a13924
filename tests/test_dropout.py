"""Fused mask-free dropout: registered ops, ``dr.functional.dropout`` and ``dr.Dropout``.

Backends are compared bit for bit with ``reference.dropout`` (the RNG contract promises identical
masks everywhere); the reference is compared with nn.Dropout semantics (fraction dropped within a
stated bound, kept values scaled by 1/(1-p), eval/p=0/p=1/in-place behaviour) and with autograd
(gradcheck, gradgradcheck, opcheck, saved tensors, torch.compile).
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import pytest
import textbook
import torch
from conftest import (
    DEVICES,
    DTYPES,
    TOL,
    acc_dtype,
    assert_bitwise_equal,
    assert_close,
    requires_cuda,
    scaled_like_kernels,
    sized_cases,
)

import dropreg_ext as dr
from dropreg_ext import reference as R
from dropreg_ext._checks import is_dense

ops = torch.ops.dropreg

SIZES = [pytest.param(n, id=f"n{n}") for n in (0, 1, 3, 5, 1023, 10007)]


def rng_for(seed: int, device="cpu") -> torch.Tensor:
    return dr.ops.make_rng(device, seed)


def run(backend, x, p, rng):
    """fused_dropout on ``backend`` (a conftest.Backend)."""
    return dr.ops.fused_dropout(x, p, rng, backend=backend.name)


def expected(backend, x, p, rng):
    """What ``backend`` must give: the reference's dropout, and for the reference backend itself the
    textbook form (tests/textbook.py: counters built from the contract, the raw Philox)."""
    return (textbook if backend.name == "reference" else R).dropout(x, p, rng)


def expected_keep(backend, shape, p, rng):
    return (textbook if backend.name == "reference" else R).dropout_keep(shape, p, rng).to(rng.device)


# ------------------------------------------------------------------------------------------------
# Every backend bit-identical to the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_matches_reference(backend, dtype, n):
    x = torch.randn(n, dtype=dtype, device=backend.device)
    rng = rng_for(2024 + n, backend.device)
    y = run(backend, x, 0.3, rng)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert_bitwise_equal(y, expected(backend, x, 0.3, rng), f"{backend} {dtype} n={n}")


# Past one resident wave of a grid-stride loop: on an H200 (132 SMs) the CUDA grid covers about 2^20
# float32 elements per pass, so 2^25 + 3 takes ~32 passes and ends in a partial chunk. The CPU runs
# 2^22 + 3 (the reference's int64 Philox costs seconds per 2^22 elements there).
LARGE_N_CASES = sized_cases("dropout", {"cpu": [2**22 + 3], "cuda": [2**25 + 3], "triton-cuda": [2**25 + 3]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("be, n", LARGE_N_CASES)
def test_large_tensor_matches_reference(be, n, dtype):
    x = torch.randn(n, dtype=dtype, device=be.device)
    rng = rng_for(n, be.device)
    assert_bitwise_equal(run(be, x, 0.3, rng), expected(be, x, 0.3, rng), f"{be} {dtype} n={n}")


PROBS = [
    pytest.param(0.0, id="p0"),
    pytest.param(1e-10, id="p1e-10"),  # threshold 0: the identity, exactly
    pytest.param(3 * 2**-17, id="p-3-half-quanta"),  # threshold 2 (a tie, rounded to even)
    pytest.param(0.1, id="p0.1"),
    pytest.param(0.5 + 2**-17, id="p-half-tie"),  # p·2^16 ends in .5: round half to even
    pytest.param(0.77, id="p0.77"),  # threshold above 2^15
    pytest.param(1 - 2**-30, id="p-near-1"),
    pytest.param(1.0, id="p1"),
]


@pytest.mark.parametrize("p", PROBS)
def test_backend_matches_reference_over_p(backend, p):
    x = torch.randn(1031, dtype=torch.float32, device=backend.device)
    rng = rng_for(77, backend.device)
    assert_bitwise_equal(run(backend, x, p, rng), expected(backend, x, p, rng), f"{backend} p={p}")


LAYOUTS = {
    "transposed": lambda t: t.reshape(37, 29).t(),
    "sliced": lambda t: t[::3],
    "row-slice": lambda t: t.reshape(37, 29)[5:30:2, 3:],
    "permuted-3d": lambda t: t[: 7 * 11 * 13].reshape(7, 11, 13).permute(2, 0, 1),
    "expanded": lambda t: t[:29].expand(37, 29),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_noncontiguous_input_uses_logical_index(backend, layout, dtype):
    base = torch.randn(37 * 29, dtype=dtype, device=backend.device)
    x = LAYOUTS[layout](base)
    assert not x.is_contiguous()
    rng = rng_for(5, backend.device)
    y = run(backend, x, 0.4, rng)
    assert_bitwise_equal(y, expected(backend, x.contiguous(), 0.4, rng), f"{backend} {layout}")
    assert y.stride() == torch.empty_like(x).stride(), f"{backend} {layout}: output layout {y.stride()}"


MEMORY_FORMATS = {
    "channels_last": lambda t: t.reshape(3, 5, 7, 9).contiguous(memory_format=torch.channels_last),
    "channels_last_3d": lambda t: t.reshape(3, 5, 7, 3, 3).contiguous(memory_format=torch.channels_last_3d),
    "permuted": lambda t: t.reshape(5, 7, 27).permute(2, 0, 1).contiguous().permute(1, 2, 0),
    "sliced-4d": lambda t: t.reshape(3, 5, 7, 9).contiguous(memory_format=torch.channels_last)[:, 1:4],
}


@pytest.mark.parametrize("layout", list(MEMORY_FORMATS))
def test_output_keeps_the_input_layout(backend, layout):
    """Like torch's dropout, the output (and the gradient) has the layout torch.empty_like gives:
    dense inputs keep their strides (channels_last, any permutation), others get a dense tensor in
    their stride order; the mask stays the logical index's, so values equal the contiguous case."""
    x = MEMORY_FORMATS[layout](torch.randn(3 * 5 * 7 * 9, device=backend.device)).requires_grad_()
    rng = rng_for(12, backend.device)
    y = run(backend, x, 0.4, rng)
    assert y.stride() == torch.empty_like(x).stride(), f"{layout}: {y.stride()} vs {torch.empty_like(x).stride()}"
    assert y.stride() == torch.nn.functional.dropout(x, 0.4).stride(), "torch's dropout lays it out the same"
    assert_bitwise_equal(y, expected(backend, x.detach().contiguous(), 0.4, rng), layout)
    g = MEMORY_FORMATS[layout](torch.randn(3 * 5 * 7 * 9, device=backend.device))
    (dx,) = torch.autograd.grad(y, x, g)
    assert dx.stride() == torch.empty_like(g).stride()
    assert_bitwise_equal(dx, expected(backend, g.contiguous(), 0.4, rng), f"{layout} backward")


# The CPU kernel walks a dense non-contiguous layout in memory order, tile by tile, after merging
# the dims that run on (channels_last's H and W): an AVX-512 register path when H·W is whole Philox
# calls (a multiple of 8) and C fills 32-call blocks, else tiles of draws transposed into memory
# order (whole dense blocks, rows, or single runs). These shapes take every path and cross tile edges.
def _cl(*shape):
    return lambda: torch.randn(shape).contiguous(memory_format=torch.channels_last)


MEMORY_ORDER_CASES = {
    "channels_last-registers": _cl(2, 64, 5, 72),  # H·W = 360: two l tiles, C = 64: two full blocks
    "channels_last-registers-tail": _cl(2, 90, 2, 8),  # C = 90: a 26-wide last block
    "channels_last-7x7": _cl(2, 70, 7, 7),  # H·W = 49: transposed tiles, each one dense block
    "channels_last-c65": _cl(1, 65, 2, 129),  # tiles 256 + 2 along L, 64 + 1 along C: rows, a single run
    "channels_last-rgb": _cl(2, 3, 40, 64),  # C = 3: one dense block per tile
    "channels_last_3d": lambda: torch.randn(2, 33, 2, 3, 16).contiguous(memory_format=torch.channels_last_3d),
    "outer-dim-innermost": lambda: torch.randn(40, 6, 16).permute(1, 2, 0).contiguous().permute(2, 0, 1),
    "last-dim-innermost": lambda: torch.randn(6, 5, 300).permute(1, 0, 2),  # M = L: runs along L
    "sliced-channels": lambda: _cl(2, 70, 3, 264)()[:, 3:60],
    "sliced-rows": lambda: _cl(2, 70, 6, 264)()[:, :, ::2],
    # 36 register-row tiles of 64 KiB (f32): several ~1 MiB groups of the fresh output's page mapping
    "channels_last-mapped-groups": _cl(2, 64, 64, 72),
}


@pytest.mark.parametrize("case", list(MEMORY_ORDER_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.4, 1.0], ids=["p0", "p0.4", "p1"])
@pytest.mark.parametrize("device", DEVICES)
def test_memory_order_layouts_match_the_logical_mask(device, case, dtype, p):
    x = MEMORY_ORDER_CASES[case]().to(device=device, dtype=dtype)
    assert not x.is_contiguous()
    rng = rng_for(21, device)
    want = R.dropout(x.contiguous(), p, rng)
    y = dr.ops.fused_dropout(x, p, rng, backend=device)
    assert y.stride() == torch.empty_like(x).stride()
    assert_bitwise_equal(y, want, f"{case} out of place")
    if device == "cpu" and is_dense(x):  # the CPU writes dense layouts in place
        xi = x.clone()
        ops.dropout_(xi, p, rng)
        assert xi.stride() == x.stride()
        assert_bitwise_equal(xi, want, f"{case} in place")


@requires_cuda
def test_cuda_inplace_rejects_noncontiguous():
    x = torch.randn(2, 3, 4, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="argument 'x' of dropout_ must be contiguous"):
        ops.dropout_(x, 0.5, rng_for(0, "cuda"))


def test_functional_inplace_keeps_dense_layouts(backend):
    x = torch.randn(2, 5, 3, 16, device=backend.device).contiguous(memory_format=torch.channels_last)
    want = R.dropout(x.contiguous(), 0.3, rng_for(4, backend.device))
    xi = x.clone()
    with torch.no_grad():
        out = dr.functional.dropout(xi, 0.3, inplace=True, seed=4)
    assert out is xi and xi.stride() == x.stride()
    assert_bitwise_equal(xi, want, f"{backend} in place")


@pytest.mark.parametrize(
    "shape", [(2, 3, 4, 5), (1, 1, 1), (3, 1, 7), (0, 4), (7, 0, 3)], ids=lambda s: "x".join(map(str, s))
)
def test_multidim_shapes(backend, shape):
    x = torch.randn(shape, dtype=torch.float32, device=backend.device)
    rng = rng_for(11, backend.device)
    y = run(backend, x, 0.5, rng)
    assert_bitwise_equal(y, expected(backend, x, 0.5, rng))
    # the mask depends on the row-major index only, not on the shape
    assert_bitwise_equal(y.flatten(), run(backend, x.flatten(), 0.5, rng))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_regenerates_forward_mask(backend, dtype):
    """grad of sum(y) is scale·keep with keep the forward mask: backward regenerates it from rng."""
    p = 0.3
    x = (torch.rand(517, dtype=dtype, device=backend.device) + 0.5).requires_grad_()
    rng = rng_for(31337, backend.device)
    y = run(backend, x, p, rng)
    y.sum().backward()
    keep = expected_keep(backend, x.shape, p, rng)
    assert_bitwise_equal(y != 0, keep, "forward mask")
    scale = scaled_like_kernels(torch.ones((), dtype=dtype, device=backend.device), p)
    want = torch.where(keep, scale, torch.zeros((), dtype=dtype, device=backend.device))
    assert_bitwise_equal(x.grad, want, "backward mask")


# ------------------------------------------------------------------------------------------------
# nn.Dropout semantics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9], ids=["p0.1", "p0.5", "p0.9"])
def test_fraction_dropped(p):
    """n = 1e6 elements: |fraction dropped - p| < 5σ, σ = sqrt(p(1-p)/n), overall and per Philox
    output word (i & 3), so a lane that reused a word would show. Seeded: cannot flake."""
    n = 1_000_000
    y = dr.functional.dropout(torch.ones(n), p, seed=8128)
    dropped = (y == 0).double()
    sigma = math.sqrt(p * (1 - p) / n)
    frac = dropped.mean().item()
    assert abs(frac - p) < 5 * sigma, f"fraction dropped {frac}, p={p}, 5σ={5 * sigma:.2e}"
    lane_sigma = math.sqrt(p * (1 - p) / (n // 4))
    for lane, f in enumerate(dropped.reshape(-1, 4).mean(0).tolist()):
        assert abs(f - p) < 5 * lane_sigma, f"lane {lane}: fraction {f}, p={p}"


def test_larger_p_drops_a_superset():
    """Integer keep test u32 >= round(p·2^32): for one rng the kept set shrinks monotonically in p."""
    x = torch.ones(20000)
    kept = [dr.functional.dropout(x, p, seed=3) != 0 for p in (0.1, 0.3, 0.6, 0.9)]
    for small_p, large_p in zip(kept, kept[1:]):
        assert bool((large_p <= small_p).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_values_are_scaled_input(backend, dtype):
    p = 0.3  # 1/(1-p) is not a dyadic fraction: catches x/(1-p) vs x·scale mix-ups in low precision
    x = torch.randn(4099, dtype=dtype, device=backend.device)
    rng = rng_for(9, backend.device)
    y = run(backend, x, p, rng)
    keep = expected_keep(backend, x.shape, p, rng)
    assert_bitwise_equal(y[keep], scaled_like_kernels(x, p)[keep], "kept values (dtype rule)")
    p_quantized = R.dropout_threshold(p) / 2**16
    assert_close(y[keep], x[keep].double() / (1 - p_quantized), dtype, "kept values vs exact x/(1-p')")
    # the quantized p is within 2^-17 of p, so the scale within 2^-17/(1-p)² of 1/(1-p)
    assert abs(1 / (1 - p_quantized) - 1 / (1 - p)) <= 2**-17 / (1 - p) ** 2
    assert bool((y[~keep] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_mode_returns_input_unchanged(cpu_backend, dtype):
    dr.set_backend(cpu_backend.name)
    x = torch.randn(64, dtype=dtype)
    module = dr.Dropout(0.5).eval()
    assert module(x) is x
    assert dr.functional.dropout(x, 0.5, training=False) is x


@pytest.mark.parametrize("dtype", DTYPES)
def test_p0_is_identity(backend, dtype):
    x = torch.randn(301, dtype=dtype, device=backend.device, requires_grad=True)
    y = run(backend, x, 0.0, rng_for(1, backend.device))
    assert_bitwise_equal(y, x.detach())
    y.backward(torch.full_like(y, 3.0))
    assert_bitwise_equal(x.grad, torch.full_like(x, 3.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_p1_drops_everything(backend, dtype):
    x = torch.randn(301, dtype=dtype, device=backend.device, requires_grad=True)
    y = run(backend, x, 1.0, rng_for(1, backend.device))
    assert_bitwise_equal(y, torch.zeros_like(x))
    y.backward(torch.randn_like(y))
    assert_bitwise_equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 2, 5)], ids=["0", "3x0", "0x2x5"])
def test_empty_tensors(backend, shape):
    dr.set_backend(backend.name)
    x = torch.empty(shape, device=backend.device, requires_grad=True)
    y = dr.Dropout(0.5)(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_forward_backward(cpu_backend, dtype):
    """dr.Dropout in training mode: y = keep·x·scale, grad = keep·scale, per dtype."""
    dr.set_backend(cpu_backend.name)
    torch.manual_seed(4)
    # Nonzero inputs, so that y != 0 is exactly the kept set (some torch versions' low-precision
    # randn gives exact zeros).
    x = (torch.rand(1000, dtype=dtype) + 0.5).requires_grad_()
    y = dr.Dropout(0.25)(x)
    keep = y != 0
    assert 0 < keep.sum() < x.numel()
    assert_bitwise_equal(y[keep], scaled_like_kernels(x.detach(), 0.25)[keep])
    y.sum().backward()
    one = scaled_like_kernels(torch.ones((), dtype=dtype), 0.25)
    assert_bitwise_equal(x.grad, torch.where(keep, one, torch.zeros((), dtype=dtype)))


# ------------------------------------------------------------------------------------------------
# In place
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed"])
def test_inplace_writes_into_input_and_bumps_version(cpu_backend, contiguous):
    dr.set_backend(cpu_backend.name)
    base = torch.randn(23, 19)
    original = base.clone()
    x = base if contiguous else base.t()
    version = base._version
    y = dr.functional.dropout(x, 0.5, inplace=True, seed=17)
    assert y is x
    want = expected(cpu_backend, original if contiguous else original.t(), 0.5, rng_for(17))
    assert_bitwise_equal(x.contiguous(), want, "in-place result")
    after = base._version
    assert after > version, f"an in-place write must bump the input's version counter ({version} -> {after})"


def test_inplace_module(cpu_backend):
    dr.set_backend(cpu_backend.name)
    x = torch.randn(100)
    x0 = x.clone()
    torch.manual_seed(5)
    y = dr.Dropout(0.5, inplace=True)(x)
    assert y is x
    torch.manual_seed(5)
    assert_bitwise_equal(x, dr.Dropout(0.5)(x0))


def test_inplace_on_tensor_saved_by_autograd_is_detected(cpu_backend):
    """x saved by x·w for dL/dw, then dropped out in place: like torch, backward must refuse (the
    saved value changed) instead of silently using the dropped-out x."""
    dr.set_backend(cpu_backend.name)
    x = torch.randn(8)
    w = torch.randn(8, requires_grad=True)
    loss = (x * w).sum()
    dr.functional.dropout(x, 0.5, inplace=True, seed=1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_torch_inplace_dropout_contrast():
    """The same sequence with torch.nn.functional.dropout raises: the test above can fail."""
    x = torch.randn(8)
    w = torch.randn(8, requires_grad=True)
    loss = (x * w).sum()
    torch.nn.functional.dropout(x, 0.5, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_inplace_autograd_through_non_leaf(cpu_backend, dtype):
    dr.set_backend(cpu_backend.name)
    x = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 5, dtype=dtype)
    h = x * 2
    version = h._version
    y = dr.functional.dropout(h, 0.5, inplace=True, seed=9)
    assert y is h and h._version > version
    (y * w).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    y_ref = expected(cpu_backend, x_ref * 2, 0.5, rng_for(9))
    (y_ref * w).sum().backward()
    assert_bitwise_equal(y.detach(), y_ref.detach(), "forward")
    assert_bitwise_equal(x.grad, x_ref.grad, "grad")


def test_inplace_on_leaf_requiring_grad_raises_like_torch(cpu_backend):
    dr.set_backend(cpu_backend.name)
    x = torch.randn(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        dr.functional.dropout(x, 0.5, inplace=True)


# ------------------------------------------------------------------------------------------------
# Seeds and reproducibility
# ------------------------------------------------------------------------------------------------


def test_manual_seed_reproduces(cpu_backend):
    dr.set_backend(cpu_backend.name)
    x = torch.randn(2000)
    torch.manual_seed(123)
    a = dr.functional.dropout(x, 0.5)
    torch.manual_seed(123)
    b = dr.functional.dropout(x, 0.5)
    torch.manual_seed(124)
    c = dr.functional.dropout(x, 0.5)
    assert_bitwise_equal(a, b)
    assert not torch.equal(a, c)


def test_manual_seed_gives_same_mask_on_every_backend():
    x = torch.randn(1500)
    outs = {}
    for name in dr.ops.available_backends("cpu"):
        with dr.use_backend(name):
            torch.manual_seed(99)
            outs[name] = dr.functional.dropout(x, 0.5)
    first = next(iter(outs.values()))
    for name, y in outs.items():
        assert_bitwise_equal(y, first, name)


def test_consecutive_calls_draw_fresh_masks():
    x = torch.ones(2000)
    a, b = dr.functional.dropout(x, 0.5), dr.functional.dropout(x, 0.5)
    assert not torch.equal(a, b)
    m = dr.Dropout(0.5)
    assert not torch.equal(m(x), m(x))


def test_explicit_seed_ignores_and_preserves_global_state():
    x = torch.randn(2000)
    torch.manual_seed(1)
    a = dr.functional.dropout(x, 0.5, seed=42)
    torch.manual_seed(2)
    torch.rand(10)
    state = torch.get_rng_state()
    b = dr.functional.dropout(x, 0.5, seed=42)
    assert_bitwise_equal(a, b)
    assert torch.equal(torch.get_rng_state(), state), "an explicit seed must not draw from torch's generator"
    assert not torch.equal(a, dr.functional.dropout(x, 0.5, seed=43))
    assert_bitwise_equal(a, R.dropout(x, 0.5, torch.tensor([42, 0])))


def test_make_rng():
    assert dr.ops.make_rng("cpu", 5).tolist() == [5, 0]
    assert dr.ops.make_rng("cpu", 2**64 - 1).tolist() == [-1, 0]
    assert dr.ops.make_rng("cpu", 2**63).tolist() == [-(2**63), 0]
    r = dr.ops.make_rng("cpu")
    assert r.dtype == torch.int64 and r.shape == (2,) and r.device.type == "cpu"
    draws = {tuple(dr.ops.make_rng("cpu").tolist()) for _ in range(20)}
    assert len(draws) == 20
    torch.manual_seed(7)
    first = dr.ops.make_rng("cpu")
    torch.manual_seed(7)
    assert torch.equal(first, dr.ops.make_rng("cpu"))


def test_seed_at_or_above_2_63_matches_negative_int64(cpu_backend):
    dr.set_backend(cpu_backend.name)
    x = torch.randn(333)
    y = dr.functional.dropout(x, 0.5, seed=2**64 - 3)
    assert_bitwise_equal(y, R.dropout(x, 0.5, torch.tensor([-3, 0])))


# ------------------------------------------------------------------------------------------------
# Autograd and op contract: gradcheck, gradgradcheck, opcheck, saved tensors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.4, 1.0], ids=["p0", "p0.4", "p1"])
def test_gradcheck_gradgradcheck(backend, p):
    x = torch.randn(2, 3, dtype=torch.float64, device=backend.device, requires_grad=True)
    rng = rng_for(2**63 + 11, backend.device)

    def f(t):
        return dr.ops.fused_dropout(t, p, rng, backend=backend.name)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_gradcheck_functional_with_seed(cpu_backend):
    dr.set_backend(cpu_backend.name)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)

    def f(t):
        return dr.functional.dropout(t, 0.3, seed=12)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


# registered op of each backend (cpu and cuda share the C++ op, dispatched on the device)
DROPOUT_OPS = {"cpu": "dropout", "cuda": "dropout", "reference": "dropout_reference",
               "triton": "dropout_triton"}
PHILOX_OPS = {"cpu": "philox", "cuda": "philox", "reference": "philox_reference", "triton": "philox_triton"}


def _dropout_samples(device):
    rng = torch.tensor([3, -(2**40)], dtype=torch.int64, device=device)
    return [
        (torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True), 0.3, rng),
        (torch.randn(6, 4, dtype=torch.float32, device=device).t(), 0.5, rng),
        (torch.randn(17, dtype=torch.float16, device=device), 0.9, rng),
        (torch.randn(0, 3, dtype=torch.bfloat16, device=device), 0.5, rng),
    ]


def test_opcheck_dropout(backend):
    op = getattr(ops, DROPOUT_OPS[backend.name])
    for args in _dropout_samples(backend.device):
        torch.library.opcheck(op, args)


def test_opcheck_philox(backend):
    op = getattr(ops, PHILOX_OPS[backend.name])
    gen = torch.Generator().manual_seed(0)
    for n in (0, 5):
        counter = torch.randint(0, 2**32, (n, 4), generator=gen).to(backend.device)
        key = torch.randint(0, 2**32, (n, 2), generator=gen).to(backend.device)
        torch.library.opcheck(op, (counter, key))


@pytest.mark.skipif(not dr._ext.HAS_CPU, reason="dropreg_ext._C not loaded")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_dropout_inplace(device):
    # dropout_ has no autograd formula (dr.functional.dropout only calls it when no graph is
    # needed), so it is checked with inputs that do not require grad; opcheck then runs the
    # schema (mutation declared), fake-tensor and AOT-dispatch tests on it.
    rng = torch.tensor([8, 1], dtype=torch.int64, device=device)
    for x in (torch.randn(4, 7, device=device), torch.randn(9, dtype=torch.bfloat16, device=device)):
        torch.library.opcheck(ops.dropout_, (x, 0.25, rng))


def _saved_numels(fn):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return numels, out


def test_no_activation_sized_tensor_saved(cpu_backend):
    dr.set_backend(cpu_backend.name)
    x = torch.randn(4096, requires_grad=True)
    numels, y = _saved_numels(lambda: dr.Dropout(0.3)(x))
    assert numels, "expected rng to be saved for backward"
    assert max(numels) <= 2, f"saved tensors of numel {numels}: a mask or activation was stored"
    y.sum().backward()
    assert x.grad is not None


def test_torch_dropout_saves_a_mask_contrast():
    """torch.nn.Dropout saves an n-element mask: shows the hook above does see such tensors."""
    x = torch.randn(4096, requires_grad=True)
    numels, _ = _saved_numels(lambda: torch.nn.Dropout(0.3)(x))
    assert max(numels) == 4096


# ------------------------------------------------------------------------------------------------
# torch.compile (few tests: each compiles for seconds)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_compile_fullgraph_matches_eager(backend_name):
    if backend_name not in dr.ops.available_backends("cpu"):
        pytest.skip(f"backend {backend_name} not available")
    dr.set_backend(backend_name)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).double()
    x = torch.randn(5, 8, dtype=torch.float64)

    def f(inp):
        h = dr.functional.dropout(model[0](inp), 0.3, seed=123)
        return h, model[1](h).pow(2).sum()

    def run_once(fn):
        model.zero_grad(set_to_none=True)
        h, loss = fn(x)
        loss.backward()
        return h.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]

    h_c, loss_c, grads_c = run_once(torch.compile(f, fullgraph=True))
    h_e, loss_e, grads_e = run_once(f)
    assert_bitwise_equal(h_c, h_e, "dropout output (same mask compiled and eager)")
    assert 0 < int((h_e == 0).sum()) < h_e.numel()
    assert_close(loss_c, loss_e, torch.float64, "loss")
    for g_c, g_e in zip(grads_c, grads_e):
        assert_close(g_c, g_e, torch.float64, "grad")


def test_compile_fullgraph_module_trains():
    if not dr._ext.HAS_CPU:
        pytest.skip("dropreg_ext._C not loaded")
    dr.set_backend("cpu")
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), dr.Dropout(0.5), torch.nn.Linear(32, 2))
    x = torch.randn(16, 8)
    out = torch.compile(model, fullgraph=True)(x)
    out.pow(2).mean().backward()
    for param in model.parameters():
        assert param.grad is not None and bool(torch.isfinite(param.grad).all())
    with torch.no_grad():
        assert not torch.allclose(out, model[2](model[0](x))), "dropout was not applied"


# ------------------------------------------------------------------------------------------------
# Bad input: a clear exception that names the argument
# ------------------------------------------------------------------------------------------------

X = torch.randn(4)
F = dr.functional.dropout
RNG0 = dr.ops.make_rng("cpu", 0)

# (id, call, exception, regex the message must match: it names the argument)
BAD_CALLS = [
    ("p>1", lambda: F(X, 1.5), ValueError, r"between 0 and 1, but got 1\.5 \(argument 'p'\)"),
    ("p<0", lambda: F(X, -0.1), ValueError, r"argument 'p'"),
    ("p-nan", lambda: F(X, float("nan")), ValueError, r"got nan \(argument 'p'\)"),
    ("p-inf", lambda: F(X, float("inf")), ValueError, r"argument 'p'"),
    ("p-bool", lambda: F(X, True), TypeError, r"argument 'p'.*bool"),
    ("p-str", lambda: F(X, "0.5"), TypeError, r"argument 'p'.*str"),
    ("p-none", lambda: F(X, None), TypeError, r"argument 'p'"),
    ("int-tensor", lambda: F(torch.ones(4, dtype=torch.int64)), TypeError, r"argument 'input'.*int64"),
    ("bool-tensor", lambda: F(torch.ones(4, dtype=torch.bool)), TypeError, r"argument 'input'.*bool"),
    ("complex-tensor", lambda: F(torch.ones(4, dtype=torch.complex64)), TypeError, r"argument 'input'"),
    ("list-input", lambda: F([1.0, 2.0]), TypeError, r"argument 'input'.*Tensor.*list"),
    ("seed-float", lambda: F(X, seed=1.0), TypeError, r"argument 'seed'.*float"),
    ("seed-str", lambda: F(X, seed="1"), TypeError, r"argument 'seed'.*str"),
    ("seed-bool", lambda: F(X, seed=True), TypeError, r"argument 'seed'.*bool"),
    ("seed-negative", lambda: F(X, seed=-1), ValueError, r"argument 'seed'.*2\*\*64"),
    ("seed-2^64", lambda: F(X, seed=2**64), ValueError, r"argument 'seed'"),
    ("training-int", lambda: F(X, training=1), TypeError, r"argument 'training'"),
    ("make_rng-seed", lambda: dr.ops.make_rng("cpu", seed=-5), ValueError, r"argument 'seed'"),
    ("module-p-nan", lambda: dr.Dropout(p=float("nan")), ValueError, r"argument 'p'"),
    ("module-p-1.5", lambda: dr.Dropout(p=1.5), ValueError, r"argument 'p'"),
    ("module-p-str", lambda: dr.Dropout(p="a"), TypeError, r"argument 'p'"),
    ("set_backend", lambda: dr.set_backend("bogus"), ValueError, r"argument 'name'.*bogus"),
    ("backend-bogus", lambda: dr.ops.fused_dropout(X, 0.5, RNG0, backend="bogus"), ValueError,
     r"argument 'backend'.*bogus"),
    ("cuda-on-cpu-tensor", lambda: dr.ops.fused_dropout(X, 0.5, RNG0, backend="cuda"), RuntimeError,
     r"backend 'cuda' cannot run on a cpu tensor"),
    ("fused-p", lambda: dr.ops.fused_dropout(X, 2.0, RNG0), ValueError, r"argument 'p'"),
    ("fused-int-tensor", lambda: dr.ops.fused_dropout(X.long(), 0.5, RNG0), TypeError, r"argument 'x'"),
]


@pytest.mark.parametrize("call, exc, match", [pytest.param(*c[1:], id=c[0]) for c in BAD_CALLS])
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cuda_backend_on_cpu_tensor_via_global_choice():
    dr.set_backend("cuda")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run on a cpu tensor"):
        dr.Dropout(0.5)(torch.randn(3))


def test_module_p_changed_after_construction_is_checked():
    m = dr.Dropout(0.5)
    m.p = 2.0
    with pytest.raises(ValueError, match=r"argument 'p'"):
        m(torch.randn(3))


BAD_RNGS = [
    pytest.param(torch.tensor([1, 2, 3]), id="shape-3"),
    pytest.param(torch.tensor([[1, 2]]), id="shape-1x2"),
    pytest.param(torch.tensor([1.0, 2.0]), id="float32"),
]


@pytest.mark.parametrize("rng", BAD_RNGS)
def test_fused_dropout_rejects_bad_rng(cpu_backend, rng):
    """rng must be an int64 [seed, offset] of shape (2,): the C++ op checks it; reference and triton
    must not silently read garbage (e.g. a float tensor's bits) instead."""
    with pytest.raises((TypeError, ValueError, RuntimeError), match="'rng'"):
        dr.ops.fused_dropout(torch.randn(16), 0.5, rng, backend=cpu_backend.name)


@requires_cuda
def test_rng_on_other_device_is_rejected():
    x = torch.randn(8, device="cuda")
    for name in dr.ops.available_backends("cuda"):
        with pytest.raises((ValueError, RuntimeError), match="'rng'"):
            dr.ops.fused_dropout(x, 0.5, torch.tensor([1, 2]), backend=name)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_bit_for_bit(dtype):
    x = torch.randn(100_003, dtype=dtype)
    rng = rng_for(2**63 + 99)
    want = dr.ops.fused_dropout(x, 0.37, rng, backend="cpu" if dr._ext.HAS_CPU else "reference")
    for name in dr.ops.available_backends("cuda"):
        y = dr.ops.fused_dropout(x.cuda(), 0.37, rng.cuda(), backend=name)
        assert_bitwise_equal(y.cpu(), want, f"{name} on cuda")


@requires_cuda
def test_cuda_unaligned_input():
    base = torch.randn(4099, dtype=torch.float16, device="cuda")
    x = base[1:]  # misaligned for the 16-byte vector path
    rng = rng_for(4, "cuda")
    for name in dr.ops.available_backends("cuda"):
        assert_bitwise_equal(dr.ops.fused_dropout(x, 0.5, rng, backend=name), R.dropout(x, 0.5, rng), name)


def test_tolerance_table_covers_every_dtype():
    assert set(TOL) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    assert acc_dtype(torch.float16) == torch.float32 and acc_dtype(torch.float64) == torch.float64


@pytest.mark.skipif(not dr._ext.HAS_CPU, reason="dropreg_ext._C not loaded")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_lower_cpu_paths_pass_the_cpu_kernel_tests(capability):
    """The tests run the widest vector loops this CPU has (AVX-512 or AVX2); this reruns the CPU cases
    of dropout, cross-entropy, the site penalty, the special values and the fuzz tests with
    DROPREG_CPU_CAPABILITY capped lower: the AVX2 loops (dropout, the cross-entropy sample and
    gradient, the site penalty) and the portable loops every other CPU takes (test_cpu_backend.py
    checks that every op then runs only the capped row of its table)."""
    order = ["default", "avx2", "avx512"]
    if order.index(dr._ext.C.cpu_capability()) <= order.index(capability):
        pytest.skip(f"this CPU takes the {dr._ext.C.cpu_capability()!r} path: the tests above ran it")
    env = {**os.environ, "DROPREG_CPU_CAPABILITY": capability}
    child = [sys.executable, "-c", "import dropreg_ext as dr; print(dr._ext.C.cpu_capability())"]
    assert subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout.strip() == capability
    here = pathlib.Path(__file__).parent
    names = ("test_dropout.py", "test_cross_entropy.py", "test_site_penalty.py", "test_special_values.py",
             "test_fuzz.py")
    files = [str(here / name) for name in names]
    run_tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
                 "-k", "cpu and not cuda and not lower_cpu_paths"]
    result = subprocess.run(run_tests, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
