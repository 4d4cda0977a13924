"""Cross-entropy with a sampled label in Triton (docs/design.md §2, fused op 2), on rows of logits z (N, C):

    lse_r  = log Σ_c exp(z_rc)                       one read pass, online (max, Σ exp) per row
    loss_r = lse_r - z_r[y_r]                        0 on rows with y_r = ignore_index
    ŷ_r    = argmax_c (z_rc + G_rc)                  Gumbel-max sample of softmax(z_r), same pass
    G      = p - onehot(label), scaled per row       ce_grad, one more pass (or fused, below)
    VJP    = row_scale·p ⊙ (u - ⟨p, u⟩)              ce_grad_backward, so G can sit in a create_graph graph

with p = exp(z - lse). Math in float32 (float64 for float64 logits), rounded once to the output dtype.
G_rc = -log(-log(u)), u = (((h << 7) | (v >> 25)) + 1/2)·2^-23 at the logical index i = r·C + c, h the
16 filter bits of the Gumbel stream and v the refinement stream's u32 (contract v3,
``reference.gumbel_noise``), so ŷ does not depend on the tiling.

The sample pass works on tiles of whole Philox groups of the filter bits at that flat index (8
elements per call): a row starts at i = r·C, so unless C % 8 == 0 its first and last group straddle
the previous and next rows, and the tile's mask cuts them. Addressing z by the flat index (z is
contiguous) keeps every group 8-element aligned whatever C is, so a thread owns whole groups and the
Philox words never move between threads. The two logs of a Gumbel score are paid only by the elements that can still win
(an exact filter, :func:`_sample_chunk`): on long rows most chunks need none.

Launch plans (:func:`_sample_plan`) depend on the shape only, never on the device:

- C ≤ MAX_BLOCK_C: a row is one chunk held in registers; ROW_TILE // chunk rows per program;
- longer rows: chunks of MAX_BLOCK_C, one program per row, or, when N is too small to fill the GPU
  (N < SPLIT_PROGRAMS), a row split over several programs whose partial states are merged in
  split order by a second kernel (so the lse bits of a split row may differ in the last place
  from the same row in a larger batch; ŷ never does).

ce_grad and ce_grad_backward also take several rows per program when C is small.
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..reference import STREAM_GUMBEL as _STREAM_GUMBEL
from ..reference import STREAM_GUMBEL_REFINE as _STREAM_GUMBEL_REFINE
from ..reference import acc_dtype, sampled_label
from ._launch import kernel_launcher, reduction_input
from .philox import philox_groups
from .rounding import round_to

STREAM_GUMBEL = tl.constexpr(_STREAM_GUMBEL)
STREAM_GUMBEL_REFINE = tl.constexpr(_STREAM_GUMBEL_REFINE)
# float32 spacing of the Gumbel uniforms: u = (k + 1/2)·2^-23, k < 2^23, is exact and in (0, 1).
TWO_POW_M23 = tl.constexpr(1.1920928955078125e-07)
# Relative margin of the candidate filter: covers the rounding of exp(z - m)·exp(m - S) and of the
# exact scores (float32: ~1e-6 relative), so no element that can win is filtered out.
FILTER_MARGIN = tl.constexpr(1.001)
NO_COLUMN = tl.constexpr(2147483647)  # larger than any column: the identity of a min over columns

MAX_BLOCK_C = 2048  # elements of a chunk (8 a thread at 8 warps); longer rows loop over chunks
ROW_TILE = 1024  # elements of a multi-row tile: rows of at most 512 columns share a program
# Below 4 programs per SM of an H100/H200 (132 SMs; 2 resident at a time), one program per long
# row leaves SMs idle or a ragged last wave: such rows are split.
SPLIT_PROGRAMS = 528
SPLIT_MIN_CHUNKS = 8  # chunks per split: its first chunk scores every element (S = -inf there)


# ---------------------------------------------------------------------------------------------
# Sample pass: helpers on (ROWS, BLOCK_G, 8) tiles, one tile row per Philox group of the filter bits
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rescale(m, shift):
    """exp(m - shift) for a sum kept relative to m, moved to shift ≥ m: 1 when m = shift, also at
    m = shift = +inf (where exp(inf - inf) would be NaN)."""
    return tl.where(m == shift, 1.0, tl.exp(m - shift)).to(shift.dtype)


@triton.jit
def _row_max(t):
    return tl.max(tl.max(t, 2), 1)


@triton.jit
def _row_min(t):
    return tl.min(tl.min(t, 2), 1)


@triton.jit
def _chunk_tile(start, lo, hi, k, row_ok, BLOCK_G: tl.constexpr, ALIGNED: tl.constexpr):
    """Chunk k of columns [lo, hi) of the rows starting at flat index ``start`` (ROWS,) int64, as
    whole Philox groups: (group (ROWS, BLOCK_G, 1), flat index i, column, in-row mask (ROWS, BLOCK_G, 8)).

    ALIGNED (C, lo and hi multiples of 8, or a chunk wholly inside [lo, hi): :func:`_chunk_inside`):
    a group lies wholly inside or outside [lo, hi), so the mask is built per group and is constant
    over its 8 elements: the load is whole vector accesses.
    """
    start = start[:, None, None]
    group = ((start + lo) >> 3) + k + tl.arange(0, BLOCK_G)[None, :, None]
    i = group * 8 + tl.arange(0, 8)[None, None, :]
    col = (i - start).to(tl.int32)
    if ALIGNED:
        first = (group * 8 - start).to(tl.int32)
        in_row = tl.broadcast_to((first >= lo) & (first < hi) & row_ok[:, None, None], i.shape)
    else:
        in_row = (col >= lo) & (col < hi) & row_ok[:, None, None]
    return group, i, col, in_row


@triton.jit
def _chunk_inside(start, lo, hi, k, BLOCK_G: tl.constexpr):
    """Whether chunk k of columns [lo, hi) lies wholly inside them in every row of the tile: then its
    groups can take the ALIGNED mask and whole vector loads even when C % 8 != 0, where only a row's
    first and last chunks straddle its edges."""
    first = ((start + lo) >> 3) + k
    inside = (first * 8 >= start + lo) & ((first + BLOCK_G) * 8 <= start + hi)
    return tl.min(inside.to(tl.int32), 0) > 0


@triton.jit
def _words_in_order(r0, r1, r2, r3):
    """The words of calls (R, G, K) as an (R, G, 4·K) tile in call order, by joins (no per-lane
    selects): join(join(r0, r2), join(r1, r3))[.., c, b] is word 2c + b."""
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    return tl.reshape(words, (r0.shape[0], r0.shape[1], 4 * r0.shape[2]))


@triton.jit
def _filter_bits(rng_ptr, group):
    """h, the u16 of the Gumbel stream at elements 8·group + (0..7) (half lane & 1, low first, of word
    lane >> 1): a (ROWS, BLOCK_G, 8) uint32 tile whose tile row is one Philox call."""
    r0, r1, r2, r3 = philox_groups(rng_ptr, STREAM_GUMBEL, group)
    words = _words_in_order(r0, r1, r2, r3)
    return tl.reshape(tl.join(words & 0xFFFF, words >> 16), (group.shape[0], group.shape[1], 8))


@triton.jit
def _refinement_bits(rng_ptr, group):
    """v, the u32 of the refinement stream at elements 8·group + (0..7) (word lane & 3 of call
    2·group + (lane >> 2)): a (ROWS, BLOCK_G, 8) uint32 tile, two Philox calls a tile row."""
    r0, r1, r2, r3 = philox_groups(rng_ptr, STREAM_GUMBEL_REFINE, group * 2 + tl.arange(0, 2)[None, None, :])
    return _words_in_order(r0, r1, r2, r3)


@triton.jit
def _argmax_combine(score_a, col_a, score_b, col_b):
    """torch.argmax's order on (score, column) pairs: the first NaN, else the largest score, ties to
    the smallest column. Associative and commutative, so any reduction tree gives the same pair,
    and so does any order of merging split rows."""
    a_nan = score_a != score_a
    b_first = col_b < col_a
    b_larger = (score_b > score_a) | ((score_b == score_a) & b_first)
    b_wins = tl.where(score_b != score_b, ~a_nan | b_first, ~a_nan & b_larger)
    return tl.where(b_wins, score_b, score_a), tl.where(b_wins, col_b, col_a)


@triton.jit
def _row_argmax(score, col):
    """Per row of a tile, the (score, column) of torch.argmax's order: the first NaN, else the
    largest score, ties to the smallest column."""
    is_nan = score != score
    nan_col = _row_min(tl.where(is_nan, col, NO_COLUMN))
    top = _row_max(tl.where(is_nan, float("-inf"), score))
    top_col = _row_min(tl.where(score == top[:, None, None], col, NO_COLUMN))
    has_nan = nan_col < NO_COLUMN
    return tl.where(has_nan, float("nan"), top).to(score.dtype), tl.where(has_nan, nan_col, top_col)


@triton.jit
def _sample_chunk(
    z_ptr,
    rng_ptr,
    start,
    lo,
    hi,
    k,
    row_ok,
    valid,
    any_valid,
    m,
    sum_exp,
    best,
    best_col,
    BLOCK_G: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """One chunk of the sample pass: updates the rows' state and returns it with the chunk's tile.

    State: per row the running max m and the best Gumbel score S so far with its column (``best``,
    ``best_col``); per lane Σ exp(z - m) (``sum_exp``, rescaled when m grows). With e = exp(z - m),
    the lse's own exponentials:

        z + G > S  ⇔  E < exp(z - S) = e·exp(m - S),   E = -log u ≥ 1 - u ≥ (w + 1/2)·2^-23,

    w = (2^16 - 1 - h)·2^7 from the filter bits h alone (the smallest 1 - u any refinement gives), so
    an element with (w + 1/2)·2^-23 ≥ e·exp(m - S)·FILTER_MARGIN cannot beat S. Only a chunk with a
    candidate draws the refinement bits and computes the two logs of the exact score (the reference's
    formula, so ŷ is its bit for bit), and only the candidates' scores count. After a row's first
    chunk about exp(lse - S) = O(1) of its elements pass, so most chunks of a long row skip the
    refinement and the logs. Everything is a candidate while S = -inf (a row's first chunk), and so
    is an element whose e is NaN (a NaN logit, or any logit once m is NaN), or whose bound is NaN; a
    +inf logit has e = 1 and passes (once S = +inf, through the NaN bound, and its tie with S goes to
    the earlier column), a -inf logit has e = 0 and score -inf: both are filtered correctly. The
    row's winning element has z ≥ m - 19.5 (G is in [-2.8, 16.6]), so its e never underflows and an
    overflowing exp(m - S) cannot drop it.
    """
    group, i, col, in_row = _chunk_tile(start, lo, hi, k, row_ok, BLOCK_G, ALIGNED)
    x = tl.load(z_ptr + i, mask=in_row, other=float("-inf")).to(sum_exp.dtype)

    m_new = tl.maximum(m, _row_max(x))
    # An all -inf prefix keeps m = -inf: shift by 0 there. z = m counts exp(0) = 1 even when m = +inf
    # (exp(inf - inf) would be NaN), so the sum is NaN only if a NaN was seen: then lse is NaN, and
    # a +inf without NaN gives lse = +inf, as torch.logsumexp.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(sum_exp.dtype)
    e = tl.where(x == shift[:, None, None], 1.0, tl.exp(x - shift[:, None, None])).to(sum_exp.dtype)
    if tl.max((m_new != m).to(tl.int32), 0) > 0:  # the rescale is exactly 1 where m did not grow
        sum_exp = sum_exp * _rescale(m, shift)[:, None, None]
    sum_exp = sum_exp + e
    m = m_new

    if any_valid:  # ignored rows skip the Gumbel draw
        h = _filter_bits(rng_ptr, group)
        # 1 - u >= (w + 1/2)·2^-23 with w = (2^16 - 1 - h)·2^7 (exact in float), so with B = bound·2^23
        # the filter (w + 1/2)·2^-23 < e·bound reads w < e·B - 1/2: one fma, within FILTER_MARGIN.
        # Written as not(w >= ...), a NaN e (a NaN logit) passes too.
        w = ((h ^ 0xFFFF) << 7).to(sum_exp.dtype)
        exact = best == float("-inf")
        big_b = tl.exp(m - tl.where(exact, m, best)) * (FILTER_MARGIN / TWO_POW_M23)
        passes = ~(w >= tl.fma(e, big_b[:, None, None], -0.5))
        cand = in_row & valid[:, None, None] & (exact[:, None, None] | passes)
        if tl.max(cand.to(tl.int32)) > 0:
            v = _refinement_bits(rng_ptr, group)
            u = (((h << 7) | (v >> 25)).to(tl.float32) + 0.5) * TWO_POW_M23
            score = tl.where(cand, x + (-tl.log(-tl.log(u))).to(sum_exp.dtype), float("-inf"))
            chunk_best, chunk_col = _row_argmax(score, tl.where(cand, col, NO_COLUMN))
            best, best_col = _argmax_combine(best, best_col, chunk_best, chunk_col)
    return m, sum_exp, best, best_col, x, i, col, in_row


@triton.jit
def _sample_chunks_step(z_ptr, rng_ptr, start, lo, hi, k, row_ok, valid, any_valid, m, sum_exp, best, best_col,
                        BLOCK_G: tl.constexpr, ALIGNED: tl.constexpr):
    """:func:`_sample_chunk` in a loop over a row's chunks, returning the state only: with whole
    vector loads for every chunk when ALIGNED, else for the chunks wholly inside [lo, hi)."""
    if ALIGNED:
        m, sum_exp, best, best_col, _x, _i, _col, _in_row = _sample_chunk(
            z_ptr, rng_ptr, start, lo, hi, k, row_ok, valid, any_valid, m, sum_exp, best, best_col, BLOCK_G, True
        )
    elif _chunk_inside(start, lo, hi, k, BLOCK_G):
        m, sum_exp, best, best_col, _x, _i, _col, _in_row = _sample_chunk(
            z_ptr, rng_ptr, start, lo, hi, k, row_ok, valid, any_valid, m, sum_exp, best, best_col, BLOCK_G, True
        )
    else:
        m, sum_exp, best, best_col, _x, _i, _col, _in_row = _sample_chunk(
            z_ptr, rng_ptr, start, lo, hi, k, row_ok, valid, any_valid, m, sum_exp, best, best_col, BLOCK_G, False
        )
    return m, sum_exp, best, best_col


@triton.jit
def _grad_chunk(z_ptr, g_ptr, start, n_cols, k, row_ok, lse, yhat, valid, BLOCK_G: tl.constexpr, ALIGNED: tl.constexpr):
    """The fused gradient's pass over chunk k of the rows (a re-read of z): G = exp(z - lse) - onehot(ŷ)."""
    g_ty: tl.constexpr = g_ptr.dtype.element_ty
    _group, i, col, in_row = _chunk_tile(start, 0, n_cols, k, row_ok, BLOCK_G, ALIGNED)
    x = tl.load(z_ptr + i, mask=in_row, other=0).to(lse.dtype)
    tl.store(g_ptr + i, round_to(_sampled_grad(x, col, in_row, lse, yhat, valid), g_ty), mask=in_row)


@triton.jit
def _lse(m, total):
    """log Σ exp = m + log Σ exp(z - m) (total: the sum, NaN if a NaN was seen): NaN with a NaN,
    else +inf with a +inf, -inf for an all -inf row: torch.logsumexp's values."""
    shift = tl.where(m == float("-inf"), 0.0, m).to(total.dtype)
    return (shift + tl.log(total)).to(total.dtype)


@triton.jit
def _sampled_grad(x, col, in_row, lse, yhat, valid):
    """G = exp(z - lse) - [c == ŷ] on valid rows (ŷ's column even if ŷ == ignore_index), 0 on the
    others: ce_grad's formula with row_scale 1, so the same values as the separate pass."""
    g = tl.exp(x - lse[:, None, None]) - tl.where(col == yhat[:, None, None], 1.0, 0.0).to(x.dtype)
    return tl.where(valid[:, None, None] & in_row, g, 0.0).to(x.dtype)


@triton.jit(do_not_specialize=["n_rows"])
def _cross_entropy_sample_kernel(
    z_ptr,
    target_ptr,
    rng_ptr,
    loss_ptr,
    lse_ptr,
    yhat_ptr,
    g_ptr,
    n_rows,
    n_cols,
    ignore_index,
    ROWS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr,
    GRAD: tl.constexpr,
):
    """ROWS whole rows per program, each read once in chunks of 8·BLOCK_G elements (one chunk if
    ONE_CHUNK) by :func:`_sample_chunk`; then lse, loss = lse - z[target] and ŷ per row.

    GRAD (the fused op): also G = exp(z - lse) - onehot(ŷ) (0 on ignored rows), from the registers
    when the row is one chunk, else by a second loop over the row (its re-read hits L2 on a GPU).
    ``n_rows`` only masks rows and is not specialized on: a row's bits do not depend on N.

    Bytes per element: read z (2 for bf16); GRAD: + write G (+ read z again past one chunk);
    per row: read target, write loss, lse, yhat.
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    start = rows.to(tl.int64) * n_cols  # flat index of z[row, 0]: the Gumbel counter
    target = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    tl.device_assert(in_range | ~valid, "target must be in [0, C) or ignore_index")
    any_valid = tl.max(valid.to(tl.int32), 0) > 0
    acc_ty: tl.constexpr = lse_ptr.dtype.element_ty

    m = tl.full((ROWS,), float("-inf"), acc_ty)
    sum_exp = tl.zeros((ROWS, BLOCK_G, 8), acc_ty)
    best = tl.full((ROWS,), float("-inf"), acc_ty)
    yhat = tl.zeros((ROWS,), tl.int32)  # an all -inf row samples column 0, as torch.argmax
    if ONE_CHUNK:
        m, sum_exp, best, yhat, x, i, col, in_row = _sample_chunk(
            z_ptr, rng_ptr, start, 0, n_cols, 0, row_ok, valid, any_valid, m, sum_exp, best, yhat, BLOCK_G, ALIGNED
        )
    else:
        n_groups = n_cols >> 3 if ALIGNED else (n_cols + 14) >> 3  # at most, for any row start
        for k in range(0, n_groups, BLOCK_G):
            m, sum_exp, best, yhat = _sample_chunks_step(
                z_ptr, rng_ptr, start, 0, n_cols, k, row_ok, valid, any_valid, m, sum_exp, best, yhat, BLOCK_G, ALIGNED
            )

    lse = _lse(m, tl.sum(tl.sum(sum_exp, 2), 1))
    z_target = tl.load(z_ptr + start + target, mask=valid & in_range & row_ok, other=0).to(acc_ty)
    # A valid target outside [0, C) (only caught by device_assert in debug builds) poisons the loss.
    loss = tl.where(in_range, lse - z_target, float("nan"))
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0).to(acc_ty), mask=row_ok)
    tl.store(yhat_ptr + rows, tl.where(valid, yhat.to(tl.int64), ignore_index), mask=row_ok)

    if GRAD:
        g_ty: tl.constexpr = g_ptr.dtype.element_ty
        if ONE_CHUNK:
            tl.store(g_ptr + i, round_to(_sampled_grad(x, col, in_row, lse, yhat, valid), g_ty), mask=in_row)
        else:
            for k in range(0, n_groups, BLOCK_G):
                if ALIGNED:
                    _grad_chunk(z_ptr, g_ptr, start, n_cols, k, row_ok, lse, yhat, valid, BLOCK_G, True)
                elif _chunk_inside(start, 0, n_cols, k, BLOCK_G):
                    _grad_chunk(z_ptr, g_ptr, start, n_cols, k, row_ok, lse, yhat, valid, BLOCK_G, True)
                else:
                    _grad_chunk(z_ptr, g_ptr, start, n_cols, k, row_ok, lse, yhat, valid, BLOCK_G, False)


@triton.jit
def _cross_entropy_sample_split_kernel(
    z_ptr,
    target_ptr,
    rng_ptr,
    part_ptr,
    col_ptr,
    n_cols,
    split_cols,
    ignore_index,
    BLOCK_G: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Program (row, s) runs the sample pass over columns [s·split_cols, (s+1)·split_cols) ∩ [0, C)
    and writes its partial state: part (N, S, 3) = (m, Σ exp(z - m), best score), col (N, S) = the
    best score's column. :func:`_merge_splits_kernel` combines them.

    Bytes per element: read z (2 for bf16); per (row, split): 16 (28 for float64).
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = row + tl.arange(0, 1)  # the one-row tile of the shared helpers
    start = rows.to(tl.int64) * n_cols
    lo = split * split_cols
    hi = tl.minimum(lo + split_cols, n_cols)
    valid = tl.load(target_ptr + rows) != ignore_index
    row_ok = tl.full((1,), 1, tl.int1)
    any_valid = tl.max(valid.to(tl.int32), 0) > 0
    acc_ty: tl.constexpr = part_ptr.dtype.element_ty

    m = tl.full((1,), float("-inf"), acc_ty)
    sum_exp = tl.zeros((1, BLOCK_G, 8), acc_ty)
    best = tl.full((1,), float("-inf"), acc_ty)
    best_col = tl.zeros((1,), tl.int32)
    n_groups = (hi - lo) >> 3 if ALIGNED else (hi - lo + 14) >> 3
    for k in range(0, n_groups, BLOCK_G):
        m, sum_exp, best, best_col = _sample_chunks_step(
            z_ptr, rng_ptr, start, lo, hi, k, row_ok, valid, any_valid, m, sum_exp, best, best_col, BLOCK_G, ALIGNED
        )

    slot = rows.to(tl.int64) * n_splits + split
    tl.store(part_ptr + slot * 3, m)
    tl.store(part_ptr + slot * 3 + 1, tl.sum(tl.sum(sum_exp, 2), 1))
    tl.store(part_ptr + slot * 3 + 2, best)
    tl.store(col_ptr + slot, best_col)


@triton.jit
def _merge_splits_kernel(
    z_ptr,
    target_ptr,
    part_ptr,
    col_ptr,
    loss_ptr,
    lse_ptr,
    yhat_ptr,
    n_rows,
    n_cols,
    n_splits,
    ignore_index,
    BLOCK_R: tl.constexpr,
):
    """Merges the split partial states of BLOCK_R rows, one split after the other (a fixed order,
    so the same bits on every device): (m, s) ∪ (m', s') = (M, s·exp(m - M) + s'·exp(m' - M)),
    M = max(m, m'), and the best (score, column) by :func:`_argmax_combine`. Then lse, loss and ŷ
    as :func:`_cross_entropy_sample_kernel`. Bytes per row: 16·splits + 28 (28·splits for float64).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    target = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    tl.device_assert(in_range | ~valid, "target must be in [0, C) or ignore_index")
    acc_ty: tl.constexpr = lse_ptr.dtype.element_ty

    m = tl.full((BLOCK_R,), float("-inf"), acc_ty)
    total = tl.zeros((BLOCK_R,), acc_ty)
    best = tl.full((BLOCK_R,), float("-inf"), acc_ty)
    best_col = tl.zeros((BLOCK_R,), tl.int32)
    for split in range(0, n_splits):
        slot = rows.to(tl.int64) * n_splits + split
        m_s = tl.load(part_ptr + slot * 3, mask=row_ok, other=float("-inf"))
        total_s = tl.load(part_ptr + slot * 3 + 1, mask=row_ok, other=0)
        best_s = tl.load(part_ptr + slot * 3 + 2, mask=row_ok, other=float("-inf"))
        col_s = tl.load(col_ptr + slot, mask=row_ok, other=0)

        m_new = tl.maximum(m, m_s)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(acc_ty)
        total = total * _rescale(m, shift) + total_s * _rescale(m_s, shift)
        m = m_new
        best, best_col = _argmax_combine(best, best_col, best_s, col_s)

    lse = _lse(m, total)
    z_target = tl.load(z_ptr + rows.to(tl.int64) * n_cols + target, mask=valid & in_range & row_ok, other=0)
    loss = tl.where(in_range, lse - z_target.to(acc_ty), float("nan"))
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0).to(acc_ty), mask=row_ok)
    tl.store(yhat_ptr + rows, tl.where(valid, best_col.to(tl.int64), ignore_index), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# ce_grad and its VJP
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_rows"])
def _ce_grad_kernel(
    z_ptr,
    lse_ptr,
    label_ptr,
    scale_ptr,
    g_ptr,
    n_rows,
    n_cols,
    stride_z,
    ignore_index,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """G[r, c] = row_scale_r · (exp(z_rc - lse_r) - [c == label_r]), 0 on ignored rows.

    Grid (cdiv(N, ROWS), cdiv(C, BLOCK)) of (ROWS, BLOCK) tiles: elementwise given lse. A valid label
    outside [0, C) fills its row with NaN (and trips device_assert in debug builds). Bytes per
    element: read z, write G (4 for bf16).
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (col < n_cols)[None, :]
    label = tl.load(label_ptr + rows, mask=row_ok, other=ignore_index)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < n_cols)
    tl.device_assert(in_range | ~valid, "label must be in [0, C) or ignore_index")
    acc_ty: tl.constexpr = lse_ptr.dtype.element_ty  # the launcher's accumulation dtype

    rows = rows.to(tl.int64)
    z = tl.load(z_ptr + rows[:, None] * stride_z + col[None, :], mask=mask, other=0).to(acc_ty)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0).to(acc_ty)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0).to(acc_ty)
    p = tl.exp(z - lse[:, None])
    g = (p - tl.where(col[None, :] == label[:, None], 1.0, 0.0).to(acc_ty)) * scale[:, None]
    g = tl.where(valid[:, None], tl.where(in_range[:, None], g, float("nan")), 0.0).to(acc_ty)
    tl.store(g_ptr + rows[:, None] * n_cols + col[None, :], round_to(g, g_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _ce_grad_backward_kernel(
    u_ptr,
    z_ptr,
    lse_ptr,
    label_ptr,
    scale_ptr,
    grad_z_ptr,
    grad_scale_ptr,
    n_rows,
    n_cols,
    ignore_index,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    """VJP of ce_grad for cotangent u, ROWS rows per program (u and z contiguous):

        ⟨p, u⟩ = Σ_c p_c·u_c                   (per-lane partial sums, then one reduction)
        grad_z = row_scale · p ⊙ (u - ⟨p, u⟩)
        grad_row_scale = ⟨p, u⟩ - u[label]

    both 0 on ignored rows; a valid label outside [0, C) gives NaN. ONE_CHUNK (C ≤ BLOCK): z and u
    are read once and p, u stay in registers between the reduction and the write (6 bytes an
    element for bf16). Longer rows take two passes, reading z and u twice (10 for bf16; the second
    reads hit L2 for rows that fit).
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    label = tl.load(label_ptr + rows, mask=row_ok, other=ignore_index)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < n_cols)
    tl.device_assert(in_range | ~valid, "label must be in [0, C) or ignore_index")
    row_start = rows.to(tl.int64) * n_cols
    start = row_start[:, None]
    acc_ty: tl.constexpr = lse_ptr.dtype.element_ty  # the launcher's accumulation dtype
    out_ty: tl.constexpr = grad_z_ptr.dtype.element_ty
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0).to(acc_ty)[:, None]
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0).to(acc_ty)
    scale = tl.where(valid, tl.where(in_range, scale, float("nan")), 0.0).to(acc_ty)[:, None]

    if ONE_CHUNK:
        col = tl.arange(0, BLOCK)[None, :]
        mask = row_ok[:, None] & (col < n_cols)
        z = tl.load(z_ptr + start + col, mask=mask, other=0).to(acc_ty)
        u = tl.load(u_ptr + start + col, mask=mask, other=0).to(acc_ty)
        p = tl.exp(z - lse)
        pu = tl.sum(tl.where(mask, p * u, 0.0), 1)
        grad = scale * p * (u - pu[:, None])
        tl.store(grad_z_ptr + start + col, round_to(grad, out_ty), mask=mask)
    else:
        pu_lanes = tl.zeros((ROWS, BLOCK), acc_ty)
        for c0 in range(0, n_cols, BLOCK):
            col = c0 + tl.arange(0, BLOCK)[None, :]
            mask = row_ok[:, None] & (col < n_cols)
            z = tl.load(z_ptr + start + col, mask=mask, other=0).to(acc_ty)
            u = tl.load(u_ptr + start + col, mask=mask, other=0).to(acc_ty)
            pu_lanes += tl.where(mask, tl.exp(z - lse) * u, 0.0)
        pu = tl.sum(pu_lanes, 1)
        for c0 in range(0, n_cols, BLOCK):
            col = c0 + tl.arange(0, BLOCK)[None, :]
            mask = row_ok[:, None] & (col < n_cols)
            z = tl.load(z_ptr + start + col, mask=mask, other=0).to(acc_ty)
            u = tl.load(u_ptr + start + col, mask=mask, other=0).to(acc_ty)
            grad = scale * tl.exp(z - lse) * (u - pu[:, None])
            tl.store(grad_z_ptr + start + col, round_to(grad, out_ty), mask=mask)

    u_label = tl.load(u_ptr + row_start + label, mask=valid & in_range & row_ok, other=0).to(acc_ty)
    grad_scale = tl.where(in_range, pu - u_label, float("nan"))
    grad_scale = tl.where(valid, grad_scale, 0.0).to(acc_ty)
    tl.store(grad_scale_ptr + rows, round_to(grad_scale, grad_scale_ptr.dtype.element_ty), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Launchers: allocation, plan, grid (the registered ops check the arguments). They never read
# device values on the host, and use only torch ops that trace (torch.library.triton_op).
# ---------------------------------------------------------------------------------------------


class SamplePlan(NamedTuple):
    """How the sample pass covers (N, C): chunks of ``block`` elements (whole Philox groups),
    ``rows`` rows per program, ``splits`` programs per row of ``split_cols`` columns each."""

    block: int
    rows: int
    one_chunk: bool
    aligned: bool
    splits: int
    split_cols: int
    num_warps: int


# Each kernel's launcher, built once (``_launch.kernel_launcher``).
_launch_sample = kernel_launcher(_cross_entropy_sample_kernel)
_launch_sample_split = kernel_launcher(_cross_entropy_sample_split_kernel)
_launch_merge_splits = kernel_launcher(_merge_splits_kernel)
_launch_ce_grad = kernel_launcher(_ce_grad_kernel)
_launch_ce_grad_backward = kernel_launcher(_ce_grad_backward_kernel)


def _num_warps(elements: int) -> int:
    """8 elements a thread: the sample kernel then needs 40-80 registers on sm_90 (ptxas), so 3-4
    programs of 8 warps fit an SM."""
    return max(1, min(16, elements // 256))


def _sample_plan(n: int, c: int) -> SamplePlan:
    """The launch plan of the sample pass: from the shape alone, never from the device."""
    aligned = c % 8 == 0
    span = c if aligned else 8 * ((c + 14) >> 3)  # elements of the groups a row can straddle
    block = max(16, triton.next_power_of_2(span))
    if block <= MAX_BLOCK_C:
        rows = max(1, ROW_TILE // block)
        return SamplePlan(block, rows, True, aligned, 1, c, _num_warps(rows * block))
    block = MAX_BLOCK_C
    chunks = triton.cdiv(c, block)
    splits, split_cols = 1, c
    if n < SPLIT_PROGRAMS and chunks >= 2 * SPLIT_MIN_CHUNKS:
        wanted = min(triton.cdiv(SPLIT_PROGRAMS, n), chunks // SPLIT_MIN_CHUNKS)
        split_cols = triton.cdiv(chunks, wanted) * block  # a multiple of 8: splits keep ALIGNED
        splits = triton.cdiv(c, split_cols)
    return SamplePlan(block, 1, False, aligned, splits, split_cols, _num_warps(block))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (any row stride), copying only when needed."""
    return t if t.stride(1) == 1 else t.contiguous()


def _block(n_cols: int) -> int:
    return max(16, min(MAX_BLOCK_C, triton.next_power_of_2(max(n_cols, 1))))


def _sample(z: torch.Tensor, target: torch.Tensor, rng: torch.Tensor, ignore_index: int, grad: bool) -> tuple:
    """loss, lse, yhat and (with ``grad``) G, by the plan of z's shape."""
    n, c = z.shape
    acc = acc_dtype(z.dtype)
    loss = torch.empty(n, dtype=acc, device=z.device)
    lse = torch.empty(n, dtype=acc, device=z.device)
    yhat = torch.empty(n, dtype=torch.int64, device=z.device)
    g = torch.empty((n, c), dtype=z.dtype, device=z.device) if grad else None
    if n == 0:
        return loss, lse, yhat, g
    z = reduction_input(z)  # contiguous: the kernels address z by the flat index r·C + c
    target, rng = target.contiguous(), rng.contiguous()
    plan = _sample_plan(n, c)
    if plan.splits == 1:
        _launch_sample[(triton.cdiv(n, plan.rows),)](
            z,
            target,
            rng,
            loss,
            lse,
            yhat,
            g if grad else z,
            n,
            c,
            ignore_index,
            ROWS=plan.rows,
            BLOCK_G=plan.block // 8,
            ONE_CHUNK=plan.one_chunk,
            ALIGNED=plan.aligned,
            GRAD=grad,
            num_warps=plan.num_warps,
        )
        return loss, lse, yhat, g
    part = torch.empty((n, plan.splits, 3), dtype=acc, device=z.device)
    part_col = torch.empty((n, plan.splits), dtype=torch.int32, device=z.device)
    _launch_sample_split[(n, plan.splits)](
        z,
        target,
        rng,
        part,
        part_col,
        c,
        plan.split_cols,
        ignore_index,
        BLOCK_G=plan.block // 8,
        ALIGNED=plan.aligned,
        num_warps=plan.num_warps,
    )
    block_r = 128
    _launch_merge_splits[(triton.cdiv(n, block_r),)](
        z, target, part, part_col, loss, lse, yhat, n, c, plan.splits, ignore_index, BLOCK_R=block_r, num_warps=4
    )
    if grad:
        # A split row is not on one program: G by its own (elementwise) pass, all programs busy.
        g = ce_grad(z, lse, sampled_label(target, yhat, ignore_index), torch.ones_like(lse), -1)
    return loss, lse, yhat, g


def cross_entropy_sample(z: torch.Tensor, target: torch.Tensor, rng: torch.Tensor, ignore_index: int = -100) -> tuple:
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
    loss, lse, yhat, _ = _sample(z, target, rng, ignore_index, grad=False)
    return loss, lse, yhat


def cross_entropy_sample_grad(
    z: torch.Tensor,
    target: torch.Tensor,
    rng: torch.Tensor,
    ignore_index: int = -100,
    true_scale: Optional[torch.Tensor] = None,
) -> tuple:
    """Launcher: :func:`cross_entropy_sample` (the same bits) and G = exp(z - lse) - onehot(ŷ) (N, C)
    in z's dtype, 0 on ignored rows (ce_grad's values, bit for bit). The sample kernel writes G:
    from registers for rows of one chunk, else by re-reading the row it just read (from L2 on a
    GPU); rows split over programs take a ce_grad pass instead. With true_scale, G_true =
    ce_grad(z, lse, target, true_scale) by a ce_grad pass (else an empty (0,) tensor)."""
    loss, lse, yhat, grad = _sample(z, target, rng, ignore_index, grad=True)
    grad_true = z.new_empty((0,)) if true_scale is None else ce_grad(z, lse, target, true_scale, ignore_index)
    return loss, lse, yhat, grad, grad_true


def cross_entropy_sample_grad_backward(
    grad_loss: Optional[torch.Tensor],
    grad_g: Optional[torch.Tensor],
    grad_g_true: Optional[torch.Tensor],
    z: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    true_scale: Optional[torch.Tensor],
    ignore_index: int = -100,
) -> torch.Tensor:
    """Launcher: the gradient in z of :func:`cross_entropy_sample_grad`'s outputs, p ⊙ (w - ⟨p, w⟩) +
    grad_loss ⊙ (p - onehot(target)) with w = grad_g + true_scale ⊙ grad_g_true, from the other
    kernels: ce_grad_backward of w (formed in the accumulation dtype, rounded once to z's) and
    ce_grad of grad_loss."""
    grad_z = None
    if grad_g is not None or grad_g_true is not None:
        acc = acc_dtype(z.dtype)
        w = grad_g.to(acc) if grad_g is not None else torch.zeros(z.shape, dtype=acc, device=z.device)
        if grad_g_true is not None:
            w = w + true_scale[:, None] * grad_g_true.to(acc)
        grad_z = ce_grad_backward(w.to(z.dtype), z, lse, target, torch.ones_like(lse), ignore_index)[0]
    if grad_loss is not None:
        from_loss = ce_grad(z, lse, target, grad_loss, ignore_index)
        grad_z = from_loss if grad_z is None else grad_z + from_loss
    return grad_z if grad_z is not None else torch.zeros(z.shape, dtype=z.dtype, device=z.device)


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
    rows = max(1, ROW_TILE // block)
    _launch_ce_grad[(triton.cdiv(n, rows), triton.cdiv(c, block))](
        z,
        lse.contiguous(),
        label.contiguous(),
        row_scale.contiguous(),
        g,
        n,
        c,
        z.stride(0),
        ignore_index,
        ROWS=rows,
        BLOCK=block,
        num_warps=_num_warps(rows * block),
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
    one_chunk = c <= block
    rows = max(1, ROW_TILE // block) if one_chunk else 1
    _launch_ce_grad_backward[(triton.cdiv(n, rows),)](
        u,
        z,
        lse.contiguous(),
        label.contiguous(),
        row_scale.contiguous(),
        grad_z,
        grad_scale,
        n,
        c,
        ignore_index,
        ROWS=rows,
        BLOCK=block,
        ONE_CHUNK=one_chunk,
        num_warps=_num_warps(rows * block),
    )
    return grad_z, grad_scale
