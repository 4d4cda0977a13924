"""Site penalty in Triton (docs/design.md §2, fused op 3): the explicit and implicit terms of one dropout site

    forward:   [Σ (g_e ⊙ h)²,  Σ g_i ⊙ η ⊙ h]                         one pass, deterministic sum
    backward:  dh = 2a·g_e²·h + b·g_i·η,  dg_e = 2a·g_e·h²,  dg_i = b·η·h    for grad = [a, b]

η is regenerated from the site-noise stream at the logical element index (``reference.site_noise``):
rademacher η = ±sqrt(q/(1-q)) (+ iff the element's bit is 1; 128 elements per Philox call, a program
tile of rows of 128), dropout η = q'/(1-q') if u16 >= round(q·2^16) else -1 (8 per call, rows of 8).
Math in float32 (float64 for float64 h). A missing g_e / g_i is a constexpr flag: its loads, its
Philox calls and its term are compiled out.

The forward sum is deterministic and independent of the device: BLOCK is fixed, each program writes
its two partial sums, and one program adds the partials in a fixed order (no atomics).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import STREAM_SITE_NOISE as _STREAM_SITE_NOISE
from ..reference import acc_dtype, dropout_threshold, site_noise_amplitude
from ._launch import float_bits, float_from_bits, kernel_launcher, reduction_input
from .philox import philox_bits_tile, philox_tile16, program_tile
from .rounding import add_rn, round_to

STREAM_SITE_NOISE = tl.constexpr(_STREAM_SITE_NOISE)
BLOCK_FORWARD = 4096
BLOCK_PARTIALS = 1024
BLOCK_BACKWARD = 1024


@triton.jit
def _site_eta(rng_ptr, group, up_bits, threshold, RADEMACHER: tl.constexpr, FLOAT64: tl.constexpr):
    """η of the elements of ``group``'s Philox calls, as a (len(group), ROW) tile (ROW = 128 for
    rademacher, 8 for dropout noise): up or -up by the element's bit (rademacher), up if
    u16 >= threshold else -1 (dropout). ``up``: the accumulation dtype's bits (float_bits)."""
    up = float_from_bits(up_bits, FLOAT64)
    if RADEMACHER:
        bits = philox_bits_tile(rng_ptr, STREAM_SITE_NOISE, group)
        # up·(-1), not -up: Triton 3.6 lowers negation to 0 - up, which turns up = +0 (q = 0) into +0
        # where the reference's -a is -0.
        return tl.where(bits == 1, up, up * -1.0).to(up.dtype)
    else:
        u16 = philox_tile16(rng_ptr, STREAM_SITE_NOISE, group)
        return tl.where(u16 >= threshold, up, -1.0).to(up.dtype)


@triton.jit
def _site_penalty_kernel(
    h_ptr,
    ge_ptr,
    gi_ptr,
    up_bits,
    rng_ptr,
    partial_ptr,
    n,
    threshold,
    HAS_GE: tl.constexpr,
    HAS_GI: tl.constexpr,
    RADEMACHER: tl.constexpr,
    BLOCK: tl.constexpr,
    ROW: tl.constexpr,
):
    """Partial sums of program p over elements [p·BLOCK, (p+1)·BLOCK):

        partial[p] = (Σ (g_e·h)², Σ g_i·η·h)

    Bytes per element: read h, g_e, g_i (6 for bf16 with both terms); per program: write 2 partials.
    """
    group, offs, mask = program_tile(n, BLOCK, ROW)
    acc_ty: tl.constexpr = partial_ptr.dtype.element_ty
    h = tl.load(h_ptr + offs, mask=mask, other=0).to(acc_ty)
    explicit = 0.0
    implicit = 0.0
    if HAS_GE:
        t = tl.load(ge_ptr + offs, mask=mask, other=0).to(acc_ty) * h
        explicit = tl.sum(t * t)
    if HAS_GI:
        g_i = tl.load(gi_ptr + offs, mask=mask, other=0).to(acc_ty)
        eta = _site_eta(rng_ptr, group, up_bits, threshold, RADEMACHER, acc_ty == tl.float64)
        implicit = tl.sum(g_i * eta * h)
    pid = tl.program_id(0)
    tl.store(partial_ptr + 2 * pid, explicit)
    tl.store(partial_ptr + 2 * pid + 1, implicit)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_programs, BLOCK: tl.constexpr):
    """out = Σ_p partial[p] by one program: per-lane sums over chunks of BLOCK partials in order,
    then one tree reduction; the order depends only on n_programs."""
    rows = tl.arange(0, BLOCK)[:, None]
    cols = tl.arange(0, 2)[None, :]
    acc = tl.zeros((BLOCK, 2), partial_ptr.dtype.element_ty)
    for r0 in range(0, n_programs, BLOCK):
        r = r0 + rows
        acc += tl.load(partial_ptr + r * 2 + cols, mask=r < n_programs, other=0)
    tl.store(out_ptr + tl.arange(0, 2), tl.sum(acc, axis=0))


@triton.jit
def _site_penalty_backward_kernel(
    grad_ptr,
    h_ptr,
    ge_ptr,
    gi_ptr,
    up_bits,
    rng_ptr,
    dh_ptr,
    dge_ptr,
    dgi_ptr,
    n,
    threshold,
    HAS_GE: tl.constexpr,
    HAS_GI: tl.constexpr,
    RADEMACHER: tl.constexpr,
    BLOCK: tl.constexpr,
    ROW: tl.constexpr,
):
    """dh = 2a·g_e²·h + b·g_i·η,  dg_e = 2a·g_e·h²,  dg_i = b·η·h, with [a, b] read from grad_ptr
    (no host sync). Bytes per element with both terms: read h, g_e, g_i, write dh, dg_e, dg_i (12 for
    bf16)."""
    group, offs, mask = program_tile(n, BLOCK, ROW)
    acc_ty: tl.constexpr = grad_ptr.dtype.element_ty
    h = tl.load(h_ptr + offs, mask=mask, other=0).to(acc_ty)
    dh = tl.zeros((BLOCK // ROW, ROW), acc_ty)
    if HAS_GE:
        a = tl.load(grad_ptr).to(acc_ty)
        g_e = tl.load(ge_ptr + offs, mask=mask, other=0).to(acc_ty)
        dh = add_rn(dh, 2 * a * g_e * g_e * h)
        tl.store(dge_ptr + offs, round_to(2 * a * g_e * h * h, dge_ptr.dtype.element_ty), mask=mask)
    if HAS_GI:
        b = tl.load(grad_ptr + 1).to(acc_ty)
        g_i = tl.load(gi_ptr + offs, mask=mask, other=0).to(acc_ty)
        eta = _site_eta(rng_ptr, group, up_bits, threshold, RADEMACHER, acc_ty == tl.float64)
        dh = add_rn(dh, b * g_i * eta)  # not an FMA: the product is rounded first, as in the reference
        tl.store(dgi_ptr + offs, round_to(b * eta * h, dgi_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + offs, round_to(dh, dh_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers: allocation, grid (the registered ops check the arguments). They never read device
# values on the host.
# ---------------------------------------------------------------------------------------------


_launch_site_penalty = kernel_launcher(_site_penalty_kernel)
_launch_sum_partials = kernel_launcher(_sum_partials_kernel)
_launch_site_penalty_backward = kernel_launcher(_site_penalty_backward_kernel)


def _contiguous(*tensors) -> tuple:
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _noise_params(q: float, noise: str, acc: torch.dtype) -> tuple:
    """(up_bits, threshold, rademacher, row): η = up if kept (bit 1, or u16 >= threshold) else (-up
    or -1), ``row`` the elements per Philox call of the noise kind. ``up`` is computed in double on
    the host, exactly as the reference does, and rounded once to the accumulation dtype, whose bits
    the kernels take (float_bits: no tensor and no fill kernel per call)."""
    rademacher = noise == "rademacher"
    return float_bits(site_noise_amplitude(q, noise), acc), dropout_threshold(q), rademacher, 128 if rademacher else 8


def site_penalty(
    h: torch.Tensor,
    g_e: Optional[torch.Tensor],
    g_i: Optional[torch.Tensor],
    q: float,
    noise: str,
    rng: torch.Tensor,
) -> torch.Tensor:
    """Launcher: [Σ (g_e ⊙ h)², Σ g_i ⊙ η ⊙ h] as a (2,) tensor, float32 (float64 for float64 h).

    Args:
        h: site activation, any shape, float64/float32/float16/bfloat16 (made contiguous).
        g_e, g_i: None (term is 0) or tensors of h's shape, dtype and device.
        q: drop probability in [0, 1).
        noise: "rademacher" or "dropout".
        rng: int64 [seed, offset] on h's device.
    """
    h, g_e, g_i = (None if t is None else reduction_input(t) for t in (h, g_e, g_i))
    acc = acc_dtype(h.dtype)
    n = h.numel()
    if n == 0 or (g_e is None and g_i is None):
        return torch.zeros(2, dtype=acc, device=h.device)
    up_bits, threshold, rademacher, row = _noise_params(q, noise, acc)
    n_programs = triton.cdiv(n, BLOCK_FORWARD)
    partials = torch.empty((n_programs, 2), dtype=acc, device=h.device)
    _launch_site_penalty[(n_programs,)](
        h,
        h if g_e is None else g_e,
        h if g_i is None else g_i,
        up_bits,
        rng.contiguous(),
        partials,
        n,
        threshold,
        HAS_GE=g_e is not None,
        HAS_GI=g_i is not None,
        RADEMACHER=rademacher,
        BLOCK=BLOCK_FORWARD,
        ROW=row,
        num_warps=16,  # 8 elements a thread: 63 registers (ptxas, sm_90) vs 110 with 8 warps
    )
    out = torch.empty(2, dtype=acc, device=h.device)
    block = min(BLOCK_PARTIALS, max(16, triton.next_power_of_2(n_programs)))
    _launch_sum_partials[(1,)](partials, out, n_programs, BLOCK=block)
    return out


def site_penalty_backward(
    grad: torch.Tensor,
    h: torch.Tensor,
    g_e: Optional[torch.Tensor],
    g_i: Optional[torch.Tensor],
    q: float,
    noise: str,
    rng: torch.Tensor,
) -> tuple:
    """Launcher: gradients of ``a·Σ (g_e h)² + b·Σ g_i η h`` for grad = [a, b] (a (2,) float tensor on
    h's device, read by the kernel).

    Returns:
        (dh, dg_e, dg_i) in the dtypes of h, g_e, g_i, with h's shape; None for a missing input.
    """
    h, g_e, g_i = _contiguous(h, g_e, g_i)
    dh = torch.empty_like(h)
    dg_e = None if g_e is None else torch.empty_like(g_e)
    dg_i = None if g_i is None else torch.empty_like(g_i)
    n = h.numel()
    if n == 0:
        return dh, dg_e, dg_i
    up_bits, threshold, rademacher, row = _noise_params(q, noise, acc_dtype(h.dtype))
    _launch_site_penalty_backward[(triton.cdiv(n, BLOCK_BACKWARD),)](
        grad.contiguous(),
        h,
        h if g_e is None else g_e,
        h if g_i is None else g_i,
        up_bits,
        rng.contiguous(),
        dh,
        dh if dg_e is None else dg_e,
        dh if dg_i is None else dg_i,
        n,
        threshold,
        HAS_GE=g_e is not None,
        HAS_GI=g_i is not None,
        RADEMACHER=rademacher,
        BLOCK=BLOCK_BACKWARD,
        ROW=row,
    )
    return dh, dg_e, dg_i
