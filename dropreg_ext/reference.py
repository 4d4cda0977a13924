"""Pure-PyTorch reference of every op: the ground truth the kernels are tested against.

Philox4x32-10 is written here with int64 tensor arithmetic (no uint32 dtype needed), following the
counter layout of ``csrc/include/philox.h`` (DESIGN.md §3)::

    key     = (lo32(seed), hi32(seed))
    counter = (lo32(g), hi32(g), lo32(s), hi32(s)),   g = i >> 2,   s = offset + stream (mod 2^64)
    u32(i)  = philox(counter, key)[i & 3]

``i`` is the logical row-major element index, ``(seed, offset)`` the per-call RNG state and
``stream`` one of :data:`STREAM_DROPOUT_MASK`, :data:`STREAM_SITE_NOISE`, :data:`STREAM_GUMBEL`.
"""

from __future__ import annotations

import torch

__all__ = [
    "STREAM_DROPOUT_MASK",
    "STREAM_SITE_NOISE",
    "STREAM_GUMBEL",
    "philox4x32_10",
    "philox_uint32",
    "dropout_threshold",
    "dropout_scale",
    "dropout_keep",
    "dropout",
    "philox",
]

STREAM_DROPOUT_MASK = 0
STREAM_SITE_NOISE = 1
STREAM_GUMBEL = 2

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a·b, a a constant, b int64 in [0, 2^32).

    The product can exceed int64, so b is split into 16-bit halves: a·b = a·b_lo + (a·b_hi)·2^16,
    with each partial product < 2^48.
    """
    t_lo = a * (b & 0xFFFF)
    t_hi = a * (b >> 16)
    mid = ((t_hi & 0xFFFF) << 16) + t_lo  # < 2^32 + 2^48: no overflow
    hi = (t_hi >> 16) + (mid >> 32)
    return hi & _MASK32, mid & _MASK32


def philox4x32_10(counter: tuple, key: tuple) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 values.

    Args:
        counter: four int64 tensors (or ints) in [0, 2^32), broadcastable.
        key: two ints or int64 tensors in [0, 2^32).

    Returns:
        the four output words as int64 tensors in [0, 2^32).
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64) for k in key)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_M0, c0)
        hi1, lo1 = _mulhilo32(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _split64(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo32, hi32) of an int64 tensor read as uint64 (two's complement)."""
    return v & _MASK32, (v >> 32) & _MASK32


def philox_uint32(rng: torch.Tensor, stream: int, numel: int, device=None) -> torch.Tensor:
    """u32(i) for i in [0, numel) under rng = int64 [seed, offset]; int64 tensor of values < 2^32."""
    device = rng.device if device is None else device
    rng = rng.to(device=device, dtype=torch.int64)
    seed, offset = rng[0], rng[1]
    s = offset + stream  # int64 wrap-around == uint64 addition mod 2^64
    i = torch.arange(numel, device=device, dtype=torch.int64)
    g_lo, g_hi = _split64(i >> 2)
    s_lo, s_hi = _split64(s)
    k_lo, k_hi = _split64(seed)
    words = torch.stack(philox4x32_10((g_lo, g_hi, s_lo, s_hi), (k_lo, k_hi)))
    return words.gather(0, (i & 3).unsqueeze(0)).squeeze(0)


def dropout_threshold(p: float) -> int:
    """Integer keep test threshold round(p·2^32) (half to even, as std::nearbyint)."""
    return round(p * 4294967296.0)


def dropout_scale(p: float) -> float:
    """1/(1-p), and 0 for p = 1 (every element dropped; avoids 0·inf)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep(shape, p: float, rng: torch.Tensor) -> torch.Tensor:
    """Boolean keep mask m of the given shape: m_i = u32(i) >= round(p·2^32)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    u = philox_uint32(rng, STREAM_DROPOUT_MASK, numel)
    return (u >= dropout_threshold(p)).reshape(shape)


def dropout(x: torch.Tensor, p: float, rng: torch.Tensor) -> torch.Tensor:
    """y = m ⊙ x / (1 - p), m from :func:`dropout_keep`; computed in float32 (float64 for float64
    inputs) and rounded once to x's dtype. Differentiable through plain autograd."""
    keep = dropout_keep(x.shape, p, rng.to(x.device))
    acc = _acc_dtype(x.dtype)
    scale = torch.tensor(dropout_scale(p), dtype=acc, device=x.device)
    scaled = (x.to(acc) * scale).to(x.dtype)
    return torch.where(keep, scaled, torch.zeros((), dtype=x.dtype, device=x.device))


def philox(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10: counter int64 (N, 4), key int64 (N, 2), values in [0, 2^32) → int64 (N, 4)."""
    words = philox4x32_10(counter.unbind(-1), key.unbind(-1))
    return torch.stack(words, dim=-1)
