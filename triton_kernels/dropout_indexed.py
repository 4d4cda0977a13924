"""Dropout with the mask read at an affine logical index, in Triton (``reference.dropout_indexed``):

    y_p = keep(index_p) ? x_p · scale : +0,   index_p = base + Σ_k i_k·stride_k

for the element at position (i_0, .., i_{n-1}); the shards of a distributed tensor read the whole
tensor's mask this way. Each program takes BLOCK consecutive positions of the contiguous x, derives
each one's index from the merged dims (at most MAX_DIMS after merging, the rest of size 1), and
computes the Philox call of its group: one call per element, where the contiguous kernel shares one
among 8. The op serves the shards of distributed tensors; ``dropout.py`` is the fast path.
"""

import torch
import triton
import triton.language as tl

from ..reference import acc_dtype, dropout_scale, dropout_threshold
from ._launch import float_bits, float_from_bits, kernel_launcher
from .philox import philox_groups
from .rounding import round_to

STREAM_DROPOUT_MASK = tl.constexpr(0)
MAX_DIMS = 4
BLOCK = 1024


@triton.jit
def _dropout_indexed_kernel(x_ptr, y_ptr, rng_ptr, n, base, size1, size2, size3, stride0, stride1, stride2, stride3,
                            threshold, scale_bits, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < n
    x = tl.load(x_ptr + p, mask=mask, other=0)
    # Mixed radix over the merged dims, innermost (3) first.
    rest = p
    index = base + (rest % size3) * stride3
    rest = rest // size3
    index += (rest % size2) * stride2
    rest = rest // size2
    index += (rest % size1) * stride1
    index += (rest // size1) * stride0
    r0, r1, r2, r3 = philox_groups(rng_ptr, STREAM_DROPOUT_MASK, index >> 3)
    w = (index >> 1) & 3
    word = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    u = (word >> ((index & 1) * 16).to(tl.uint32)) & 0xFFFF
    scale = float_from_bits(scale_bits, x_ptr.dtype.element_ty == tl.float64)  # the accumulation dtype's bits
    y = tl.where(u >= threshold, round_to(x.to(scale.dtype) * scale, x.dtype), tl.zeros_like(x))
    tl.store(y_ptr + p, y, mask=mask)


_launch = kernel_launcher(_dropout_indexed_kernel)


def _merged_dims(shape, strides) -> list:
    """(size, stride) of the dims of a contiguous tensor of ``shape`` where the index does not run on
    (size-1 dims dropped), outermost first: the IndexMap of csrc/include/dropout_indexed.h."""
    dims = []
    for size, stride in zip(shape, strides):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return dims


def dropout_indexed(x: torch.Tensor, p: float, rng: torch.Tensor, index_strides: list, index_base: int) -> torch.Tensor:
    """Launcher: x any shape (its contiguous copy is walked), rng int64 [seed, offset] on x's device;
    the output has x's layout (``torch.empty_like``)."""
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    dims = _merged_dims(x.shape, index_strides)
    if len(dims) > MAX_DIMS:
        raise ValueError(f"argument 'index_strides': the triton backend takes at most {MAX_DIMS} dims that do not "
                         f"merge, got {len(dims)} ({list(index_strides)} for shape {tuple(x.shape)})")
    dims = [(1, 0)] * (MAX_DIMS - len(dims)) + dims
    xc = x.contiguous()
    yc = y if x.is_contiguous() else torch.empty_like(xc)
    (_, s0), (z1, s1), (z2, s2), (z3, s3) = dims
    _launch[(triton.cdiv(n, BLOCK),)](
        xc, yc, rng.contiguous(), n, index_base, z1, z2, z3, s0, s1, s2, s3, dropout_threshold(p),
        float_bits(dropout_scale(p), acc_dtype(x.dtype)), BLOCK=BLOCK,
    )
    return y if yc is y else y.copy_(yc)
