"""Fused dropout in Triton: Philox mask + scale in one pass, no mask tensor.

    y_i = keep_i ? x_i · scale : +0,   keep_i = u16(i) >= round(p·2^16),   scale = 2^16/(2^16 - t)

(contract v2, ``reference.py``) computed in float32 (float64 for float64 inputs) and rounded once.
Bytes per element: read x, write y. Each program handles BLOCK elements as a (BLOCK/8, 8) tile so
one Philox call serves the eight elements of a row of the tile; BLOCK gives each thread 64 bytes of
x (four 16-byte vectors in flight: 1024 float64, 2048 float32, 4096 2-byte elements a program).
"""

import torch
import triton
import triton.language as tl

from ..reference import acc_dtype, dropout_scale, dropout_threshold
from ._launch import float_bits, float_from_bits, kernel_launcher
from .philox import philox_tile16, program_tile
from .rounding import round_to

STREAM_DROPOUT_MASK = tl.constexpr(0)
BYTES_PER_PROGRAM = 8192  # 64 bytes of x a thread at 4 warps


@triton.jit
def _dropout_kernel(x_ptr, y_ptr, rng_ptr, n, threshold, scale_bits, BLOCK: tl.constexpr):
    group, offs, mask = program_tile(n, BLOCK, 8)
    x = tl.load(x_ptr + offs, mask=mask, other=0)  # first: the load's latency hides behind Philox
    u = philox_tile16(rng_ptr, STREAM_DROPOUT_MASK, group)
    keep = u >= threshold
    scale = float_from_bits(scale_bits, x_ptr.dtype.element_ty == tl.float64)  # the accumulation dtype's bits
    y = tl.where(keep, round_to(x.to(scale.dtype) * scale, x.dtype), tl.zeros_like(x))
    tl.store(y_ptr + offs, y, mask=mask)


_launch_dropout = kernel_launcher(_dropout_kernel)


def dropout(x: torch.Tensor, p: float, rng: torch.Tensor) -> torch.Tensor:
    """Launcher: x any shape, rng int64 [seed, offset] on x's device. The output has x's layout
    (``torch.empty_like``); the kernel works in logical order, so a non-contiguous x is computed
    on its contiguous copy and copied into that layout."""
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    threshold = dropout_threshold(p)
    if threshold >= 65536:  # everything dropped: a memset, no Philox
        return y.zero_()
    xc = x.contiguous()
    yc = y if x.is_contiguous() else torch.empty_like(xc)
    block = BYTES_PER_PROGRAM // x.element_size()
    _launch_dropout[(triton.cdiv(n, block),)](
        xc, yc, rng.contiguous(), n, threshold, float_bits(dropout_scale(p), acc_dtype(x.dtype)), BLOCK=block
    )
    return y if yc is y else y.copy_(yc)
