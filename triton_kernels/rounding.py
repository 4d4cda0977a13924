"""Rounding identical to the C++ kernels and the reference on every Triton backend: to the output
dtype (round to nearest, ties to even), and additions that are never fused into an FMA."""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Decided when the kernels are defined, as Triton decides whether @triton.jit interprets them.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """v (float32 or float64) rounded once to ``dtype``, to nearest even.

    Compiled, the cast is the GPU's own conversion (cvt.rn, round to nearest even). Triton's
    interpreter truncates float32 → bfloat16, so there the rounding is done on the bits, which gives
    the same result (NaN stays a quiet NaN).
    """
    if INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = v != v
        rounded = tl.where(nan, (bits >> 16) | 0x40, rounded)  # keep NaN a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def add_rn(a, b):
    """a + b rounded on its own (float32 or float64).

    Triton's compiler contracts ``x * y + c`` into one FMA (``enable_fp_fusion`` is on by default),
    which skips the rounding of the product that the reference and the C++/CUDA kernels
    (``site_penalty.h`` add_rn) do. libdevice's add_rn is never contracted; the interpreter has no
    libdevice, but it computes with NumPy, which rounds every operation anyway.
    """
    if INTERPRETED:
        return a + b
    else:
        return libdevice.add_rn(a, b)
