"""Philox4x32-10 in Triton, with the counter layout of the random-number contract (``reference.py``'s
docstring, ``csrc/include/philox.h``)::

    key     = (lo32(seed), hi32(seed))
    counter = (lo32(g), hi32(g), lo32(s), hi32(s)),   s = offset + stream (mod 2^64)

and the three densities at which the streams read a call's four words: u32 (4 elements per call,
the Gumbel refinement), u16 (8, the mask, dropout-kind noise and the Gumbel filter bits) and single
bits (128, Rademacher noise). Written
out rather than calling ``tl.philox`` so the layout, not Triton's, is the contract.
"""

import torch
import triton
import triton.language as tl

from ._launch import kernel_launcher

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors; the key is bumped by the Weyl constants between rounds."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def philox_groups(rng_ptr, stream, group):
    """The four uint32 words of groups ``group`` (int64 tensor) of ``stream`` under rng = [seed, offset]."""
    seed = tl.load(rng_ptr).to(tl.uint64)
    s = tl.load(rng_ptr + 1).to(tl.uint64) + stream
    g = group.to(tl.uint64)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + (s & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros_like(c0) + (s >> 32).to(tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def philox_uint32(rng_ptr, stream, idx):
    """u32(i) for element indices ``idx`` (int64 tensor of any shape), as int64 values in [0, 2^32)."""
    r0, r1, r2, r3 = philox_groups(rng_ptr, stream, idx >> 2)
    lane = idx & 3
    u = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return u.to(tl.int64)


@triton.jit
def _philox_raw_kernel(counter_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # rows·4 passes 2^31 at 2^29 rows
    mask = rows < n
    c0 = tl.load(counter_ptr + rows * 4, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(counter_ptr + rows * 4 + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(counter_ptr + rows * 4 + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(counter_ptr + rows * 4 + 3, mask=mask, other=0).to(tl.uint32)
    k0 = tl.load(key_ptr + rows * 2, mask=mask, other=0).to(tl.uint32)
    k1 = tl.load(key_ptr + rows * 2 + 1, mask=mask, other=0).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + rows * 4, r0.to(tl.int64), mask=mask)
    tl.store(out_ptr + rows * 4 + 1, r1.to(tl.int64), mask=mask)
    tl.store(out_ptr + rows * 4 + 2, r2.to(tl.int64), mask=mask)
    tl.store(out_ptr + rows * 4 + 3, r3.to(tl.int64), mask=mask)


_launch_philox_raw = kernel_launcher(_philox_raw_kernel)


def philox(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10: counter int64 (N, 4), key int64 (N, 2), values in [0, 2^32) → (N, 4)."""
    n = counter.shape[0]
    out = torch.empty((n, 4), dtype=torch.int64, device=counter.device)
    if n:
        block = 128
        _launch_philox_raw[(triton.cdiv(n, block),)](
            counter.contiguous(), key.contiguous(), out, n, BLOCK=block
        )
    return out


@triton.jit
def _word(r0, r1, r2, r3, w):
    """Word w (a tile of 0..3, broadcastable with the r's) of each group."""
    return tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))


@triton.jit
def philox_tile(rng_ptr, stream, group):
    """u32 of elements ``4·group + (0..3)`` as a uint32 tile of shape (len(group), 4): one Philox
    call serves the four elements of a tile row."""
    r0, r1, r2, r3 = philox_groups(rng_ptr, stream, group)
    lane = tl.arange(0, 4)[None, :]
    return _word(r0[:, None], r1[:, None], r2[:, None], r3[:, None], lane)


@triton.jit
def philox_tile16(rng_ptr, stream, group):
    """u16 of elements ``8·group + (0..7)`` (half lane & 1, low first, of word lane >> 1) as a
    uint32 tile of shape (len(group), 8), built by joins (no per-lane selects)."""
    r0, r1, r2, r3 = philox_groups(rng_ptr, stream, group)
    # (G, 4) of words in order: join(join(r0, r2), join(r1, r3))[g, b, c] is word 2b + c.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (r0.shape[0], 4))
    # (G, 4, 2) [g, k, h] = half h of word k, flattened to element 2k + h.
    return tl.reshape(tl.join(words & 0xFFFF, words >> 16), (r0.shape[0], 8))


@triton.jit
def philox_bits_tile(rng_ptr, stream, group):
    """bit of elements ``128·group + (0..127)`` (bit lane & 31 of word lane >> 5) as a uint32 tile
    of shape (len(group), 128) of 0 and 1."""
    r0, r1, r2, r3 = philox_groups(rng_ptr, stream, group)
    lane = tl.arange(0, 128)[None, :]
    word = _word(r0[:, None], r1[:, None], r2[:, None], r3[:, None], lane >> 5)
    return (word >> (lane & 31).to(tl.uint32)) & 1


@triton.jit
def program_tile(n, BLOCK: tl.constexpr, ROW: tl.constexpr):
    """This program's BLOCK elements [pid·BLOCK, (pid+1)·BLOCK) as a (BLOCK/ROW, ROW) tile, one row
    per Philox call of ROW elements: (call ids, element offsets, in-bounds mask), in int64."""
    pid = tl.program_id(0).to(tl.int64)
    group = pid * (BLOCK // ROW) + tl.arange(0, BLOCK // ROW)
    offs = group[:, None] * ROW + tl.arange(0, ROW)[None, :]
    return group, offs, offs < n
