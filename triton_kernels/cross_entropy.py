"""Cross-entropy with a sampled label in Triton (docs/design.md §2, fused op 2), on rows of logits z (N, C):

    lse_r  = log Σ_c exp(z_rc)                       one read pass, online (max, Σ exp) per row
    loss_r = lse_r - z_r[y_r]                        0 on rows with y_r = ignore_index
    ŷ_r    = argmax_c (z_rc + G_rc)                  Gumbel-max sample of softmax(z_r), same pass
    G      = p - onehot(label), scaled per row       ce_grad, one more pass
    VJP    = row_scale·p ⊙ (u - ⟨p, u⟩)              ce_grad_backward, so G can sit in a create_graph graph

with p = exp(z - lse). Math in float32 (float64 for float64 logits), rounded once to the output dtype.
G_rc = -log(-log(u)), u = ((u32(i) >> 9) + 1/2)·2^-23, u32 from the Gumbel stream at the logical index
i = r·C + c (``reference.gumbel_noise``), so ŷ does not depend on the tiling.
"""

import torch
import triton
import triton.language as tl

from ..reference import STREAM_GUMBEL as _STREAM_GUMBEL
from ..reference import acc_dtype
from ._launch import kernel_launcher, reduction_input
from .philox import philox_tile
from .rounding import round_to

STREAM_GUMBEL = tl.constexpr(_STREAM_GUMBEL)
# float32 spacing of the Gumbel uniforms: u = (k + 1/2)·2^-23, k < 2^23, is exact and in (0, 1).
TWO_POW_M23 = tl.constexpr(1.1920928955078125e-07)
MAX_BLOCK_C = 2048  # 4096 with 8 warps needs ~200 registers a thread (ptxas, sm_90): half the occupancy


@triton.jit
def _cross_entropy_sample_kernel(
    z_ptr,
    target_ptr,
    rng_ptr,
    loss_ptr,
    lse_ptr,
    yhat_ptr,
    n_cols,
    stride_row,
    ignore_index,
    BLOCK_C: tl.constexpr,
):
    """One program per row; the row is read once, in chunks of BLOCK_C elements.

    Each chunk updates an online log-sum-exp (a running max m and per-lane sums of exp(z - m)) and a
    per-lane Gumbel-max pair (best score, its column). A chunk is a (BLOCK_C/4, 4) tile of Philox
    groups of the *logical* index i = row·C + c, so one Philox call serves four elements; the tile
    starts at the group holding z[row, 0] and masks the columns outside [0, C).

    Ties go to the smallest column (torch.argmax): a lane sees its columns in increasing order and
    keeps the first strict maximum; the final reduction takes the smallest column among the lanes
    at the maximum. A NaN score wins, as in torch.argmax. Ignored rows skip the Gumbel draw.

    Bytes per element: read z (2 for bf16); per row: read target, write loss, lse, yhat.
    """
    BLOCK_G: tl.constexpr = BLOCK_C // 4
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_row
    start = row * n_cols  # logical index of z[row, 0]: the Gumbel counter
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    tl.device_assert(in_range | ~valid, "target must be in [0, C) or ignore_index")
    acc_ty: tl.constexpr = lse_ptr.dtype.element_ty

    m = tl.full((), float("-inf"), acc_ty)
    # A NaN anywhere makes the lse NaN and a +inf (without NaN) makes it +inf, as torch.logsumexp;
    # the online sum below cannot tell (exp(inf - inf) is NaN), so these flags decide at the end.
    has_nan = tl.zeros((), tl.int32)
    has_pinf = tl.zeros((), tl.int32)
    sum_exp = tl.zeros((BLOCK_G, 4), acc_ty)
    best = tl.full((BLOCK_G, 4), float("-inf"), acc_ty)
    best_col = tl.zeros((BLOCK_G, 4), tl.int32)
    lane = tl.arange(0, 4)[None, :]
    for g0 in range(start >> 2, (start + n_cols + 3) >> 2, BLOCK_G):
        group = g0 + tl.arange(0, BLOCK_G)
        col = (group[:, None] * 4 + lane - start).to(tl.int32)
        mask = (col >= 0) & (col < n_cols)
        x = tl.load(z_row + col, mask=mask, other=float("-inf")).to(acc_ty)

        has_nan = tl.maximum(has_nan, tl.max((x != x).to(tl.int32)))
        has_pinf = tl.maximum(has_pinf, tl.max((x == float("inf")).to(tl.int32)))
        m_new = tl.maximum(m, tl.max(x))
        # An all -inf prefix keeps m = -inf: shift by 0 there so exp never sees -inf - (-inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(acc_ty)
        sum_exp = sum_exp * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new

        if valid:
            bits = philox_tile(rng_ptr, STREAM_GUMBEL, group)
            u = ((bits >> 9).to(tl.float32) + 0.5) * TWO_POW_M23
            score = x + (-tl.log(-tl.log(u))).to(acc_ty)
            better = (score > best) | ((score != score) & (best == best))
            best = tl.where(better, score, best)
            best_col = tl.where(better, col, best_col)

    shift = tl.where(m == float("-inf"), 0.0, m).to(acc_ty)
    lse = shift + tl.log(tl.sum(sum_exp))
    lse = tl.where(has_pinf != 0, float("inf"), lse)
    lse = tl.where(has_nan != 0, float("nan"), lse).to(acc_ty)

    is_nan = best != best
    nan_col = tl.min(tl.where(is_nan, best_col, n_cols))
    top = tl.max(tl.where(is_nan, float("-inf"), best))
    top_col = tl.min(tl.where(best == top, best_col, n_cols))
    yhat = tl.where(nan_col < n_cols, nan_col, top_col).to(tl.int64)

    z_target = tl.load(z_row + target, mask=valid & in_range, other=0).to(acc_ty)
    # A valid target outside [0, C) (only caught by device_assert in debug builds) poisons the loss.
    loss = tl.where(in_range, lse - z_target, float("nan"))
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0).to(acc_ty))
    tl.store(yhat_ptr + row, tl.where(valid, yhat, ignore_index))


@triton.jit
def _ce_grad_kernel(
    z_ptr, lse_ptr, label_ptr, scale_ptr, g_ptr, n_cols, stride_z, ignore_index, BLOCK: tl.constexpr
):
    """G[r, c] = row_scale_r · (exp(z_rc - lse_r) - [c == label_r]), 0 on ignored rows.

    Grid (N, cdiv(C, BLOCK)): elementwise given lse. A valid label outside [0, C) fills its row with
    NaN (and trips device_assert in debug builds). Bytes per element: read z, write G (4 for bf16).
    """
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < n_cols
    label = tl.load(label_ptr + row)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < n_cols)
    tl.device_assert(in_range | ~valid, "label must be in [0, C) or ignore_index")
    acc_ty: tl.constexpr = lse_ptr.dtype.element_ty  # the launcher's accumulation dtype

    z = tl.load(z_ptr + row * stride_z + col, mask=mask, other=0).to(acc_ty)
    lse = tl.load(lse_ptr + row).to(acc_ty)
    scale = tl.load(scale_ptr + row).to(acc_ty)
    p = tl.exp(z - lse)
    g = (p - tl.where(col == label, 1.0, 0.0).to(acc_ty)) * scale
    g = tl.where(valid, tl.where(in_range, g, float("nan")), 0.0).to(acc_ty)
    tl.store(g_ptr + row * n_cols + col, round_to(g, g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_grad_backward_kernel(
    u_ptr,
    z_ptr,
    lse_ptr,
    label_ptr,
    scale_ptr,
    grad_z_ptr,
    grad_scale_ptr,
    n_cols,
    stride_u,
    stride_z,
    ignore_index,
    BLOCK: tl.constexpr,
):
    """VJP of ce_grad for cotangent u, one program per row, two passes over the row:

        pass 1:  ⟨p, u⟩ = Σ_c p_c·u_c                   (per-lane partial sums, then one reduction)
        pass 2:  grad_z = row_scale · p ⊙ (u - ⟨p, u⟩)
        grad_row_scale = ⟨p, u⟩ - u[label]

    both 0 on ignored rows; a valid label outside [0, C) gives NaN. Bytes per element: read z and u
    twice, write grad_z (10 for bf16; the second reads hit L2 for rows that fit).
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(label_ptr + row)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < n_cols)
    tl.device_assert(in_range | ~valid, "label must be in [0, C) or ignore_index")
    z_row = z_ptr + row * stride_z
    u_row = u_ptr + row * stride_u
    acc_ty: tl.constexpr = lse_ptr.dtype.element_ty  # the launcher's accumulation dtype
    lse = tl.load(lse_ptr + row).to(acc_ty)

    pu_lanes = tl.zeros((BLOCK,), acc_ty)
    for c0 in range(0, n_cols, BLOCK):
        col = c0 + tl.arange(0, BLOCK)
        mask = col < n_cols
        z = tl.load(z_row + col, mask=mask, other=0).to(acc_ty)
        u = tl.load(u_row + col, mask=mask, other=0).to(acc_ty)
        pu_lanes += tl.where(mask, tl.exp(z - lse) * u, 0.0)
    pu = tl.sum(pu_lanes)

    scale = tl.load(scale_ptr + row).to(acc_ty)
    scale = tl.where(valid, tl.where(in_range, scale, float("nan")), 0.0).to(acc_ty)
    for c0 in range(0, n_cols, BLOCK):
        col = c0 + tl.arange(0, BLOCK)
        mask = col < n_cols
        z = tl.load(z_row + col, mask=mask, other=0).to(acc_ty)
        u = tl.load(u_row + col, mask=mask, other=0).to(acc_ty)
        grad = scale * tl.exp(z - lse) * (u - pu)
        tl.store(grad_z_ptr + row * n_cols + col, round_to(grad, grad_z_ptr.dtype.element_ty), mask=mask)

    u_label = tl.load(u_row + label, mask=valid & in_range, other=0).to(acc_ty)
    grad_scale = tl.where(in_range, pu - u_label, float("nan"))
    grad_scale = tl.where(valid, grad_scale, 0.0).to(acc_ty)
    tl.store(grad_scale_ptr + row, round_to(grad_scale, grad_scale_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Launchers: allocation, grid (the registered ops check the arguments). They never read device
# values on the host.
# ---------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (any row stride), copying only when needed."""
    return t if t.stride(1) == 1 else t.contiguous()


def _block(n_cols: int) -> int:
    return max(16, min(MAX_BLOCK_C, triton.next_power_of_2(max(n_cols, 1))))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def cross_entropy_sample(
    z: torch.Tensor, target: torch.Tensor, rng: torch.Tensor, ignore_index: int = -100
) -> tuple:
    """Launcher: per-row loss, log-sum-exp and Gumbel-max sample ŷ ~ softmax(z) in one read of z.

    Args:
        z: logits (N, C), float64/float32/float16/bfloat16, C >= 1 when N >= 1.
        target: int64 (N,) class indices in [0, C) or ``ignore_index`` (not checked on the host:
            that would sync; an out-of-range target gives a NaN loss, and trips device_assert in
            Triton debug mode).
        rng: int64 [seed, offset] on z's device.

    Returns:
        loss (N,), lse (N,) float32 (float64 for float64 z), yhat (N,) int64.
    """
    n, c = z.shape
    acc = acc_dtype(z.dtype)
    loss = torch.empty(n, dtype=acc, device=z.device)
    lse = torch.empty(n, dtype=acc, device=z.device)
    yhat = torch.empty(n, dtype=torch.int64, device=z.device)
    if n == 0:
        return loss, lse, yhat
    z = reduction_input(z)
    # Rows start at index r·C: unless C % 4 == 0 a row may straddle one extra Philox group.
    block = _block(c if c % 4 == 0 else c + 3)
    kernel_launcher(_cross_entropy_sample_kernel)[(n,)](
        z,
        target.contiguous(),
        rng.contiguous(),
        loss,
        lse,
        yhat,
        c,
        z.stride(0),
        ignore_index,
        BLOCK_C=block,
        num_warps=_num_warps(block),
    )
    return loss, lse, yhat


def ce_grad(
    z: torch.Tensor, lse: torch.Tensor, label: torch.Tensor, row_scale: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Launcher: G = row_scale ⊙ (exp(z - lse) - onehot(label)) (N, C) in z's dtype, 0 on ignored rows.

    Args:
        z: logits (N, C), float64/float32/float16/bfloat16.
        lse: (N,) log-sum-exp of z in z's accumulation dtype, taken as given.
        label: int64 (N,) in [0, C) or ``ignore_index`` (out of range: a NaN row, see above).
        row_scale: (N,) in z's accumulation dtype.
    """
    n, c = z.shape
    g = torch.empty((n, c), dtype=z.dtype, device=z.device)
    if g.numel() == 0:
        return g
    z = _rows(z)
    block = _block(c)
    kernel_launcher(_ce_grad_kernel)[(n, triton.cdiv(c, block))](
        z,
        lse.contiguous(),
        label.contiguous(),
        row_scale.contiguous(),
        g,
        c,
        z.stride(0),
        ignore_index,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return g


def ce_grad_backward(
    u: torch.Tensor,
    z: torch.Tensor,
    lse: torch.Tensor,
    label: torch.Tensor,
    row_scale: torch.Tensor,
    ignore_index: int = -100,
) -> tuple:
    """Launcher: VJP of :func:`ce_grad` with cotangent u (N, C) (u matches z).

    Returns:
        grad_z (N, C) in z's dtype, grad_row_scale (N,) in row_scale's dtype; 0 on ignored rows.
    """
    n, c = z.shape
    grad_z = torch.empty((n, c), dtype=z.dtype, device=z.device)
    grad_scale = torch.empty(n, dtype=row_scale.dtype, device=z.device)
    if n == 0:
        return grad_z, grad_scale
    if c == 0:
        # ⟨p, u⟩ = 0 and no label can be valid (ignored rows give 0; others are out of range).
        bad = label != ignore_index
        return grad_z, torch.where(bad, float("nan"), 0.0).to(row_scale.dtype)
    z, u = reduction_input(z), reduction_input(u)
    block = _block(c)
    kernel_launcher(_ce_grad_backward_kernel)[(n,)](
        u,
        z,
        lse.contiguous(),
        label.contiguous(),
        row_scale.contiguous(),
        grad_z,
        grad_scale,
        c,
        u.stride(0),
        z.stride(0),
        ignore_index,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return grad_z, grad_scale
