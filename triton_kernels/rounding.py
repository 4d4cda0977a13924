"""Rounding to the output dtype, identical to the C++ kernels and the reference (round to nearest,
ties to even) on every Triton backend."""

import triton
import triton.language as tl


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """v (float32 or float64) rounded once to ``dtype``.

    float32 → bfloat16 is done on the bits: Triton's interpreter truncates that conversion, while
    GPUs, torch and C++ round to nearest even; this form gives the same bits everywhere.
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = v != v
        rounded = tl.where(nan, (bits >> 16) | 0x40, rounded)  # keep NaN a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)
