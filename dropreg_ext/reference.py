"""Pure-PyTorch reference of every op: the ground truth the kernels are tested against, and the home
of the random-number contract (v2; v3 for the Gumbel streams), implemented once per backend and tested
bit for bit.

Philox4x32-10 (Random123 constants) is written here with int64 tensor arithmetic. Every stream of a
call draws from the same counter layout, a call (a *group* g) giving four 32-bit words::

    key      = (lo32(seed), hi32(seed))
    counter  = (lo32(g), hi32(g), lo32(s), hi32(s)),   s = offset + stream (mod 2^64)
    words(g) = philox(counter, key)                     (w0, w1, w2, w3)

and each stream reads the words at the density it needs, by the logical row-major element index
``i`` of the tensor it is drawn for (never a thread, tile or memory layout):

=======================================  =====================  ======================================
stream                                   elements per call      bits of element i
=======================================  =====================  ======================================
dropout mask (:data:`STREAM_DROPOUT_MASK`) 8                     u16(i): half i & 1 (low half first) of
and dropout-kind site noise (site)                               word (i >> 1) & 3 of group i >> 3
Rademacher site noise (site)             128                    bit i & 31 of word (i >> 5) & 3 of
                                                                group i >> 7
Gumbel filter bits (:data:`STREAM_GUMBEL`) 8                   h(i): u16(i), the mask's layout
Gumbel refinement                        4                      v(i): word i & 3 of group i >> 2
(:data:`STREAM_GUMBEL_REFINE`)
=======================================  =====================  ======================================

Keep test (mask and dropout-kind noise): an element is dropped iff ``u16 < t``,
``t = round(q·2^16)`` (half to even) in [0, 2^16]: q is quantized to q' = t/2^16, within 2^-17 of q
(q = 0 and q < 2^-17 keep everything, q = 1 drops everything). The scale is that of q',
``1/(1-q') = 2^16/(2^16 - t)`` (0 when t = 2^16), so E[y] = x exactly; the drop rate differs from q by
at most 2^-17 and the variance factor q'/(1-q') from q/(1-q) by at most 2^-17/(1-q)². Site noise:
Rademacher η = ±sqrt(q/(1-q)) (+ iff the bit is 1; q itself, no quantization); dropout kind
η = q'/(1-q') when kept, else -1 (mean 0 exactly). Gumbel (contract v3): u = (k + 1/2)·2^-23 with the
23-bit k = (h << 7) | (v >> 25), exact in float32 and strictly inside (0, 1), G = -log(-log u): the
kernels draw h for every element (it alone decides the candidate filter) and v only for candidates
(docs/numerics.md, "The Gumbel stream, contract v3").

The per-call state is an int64 tensor ``[seed, offset]`` on the input's device; the streams of one
call differ in ``stream`` (0 to 3), so they never share counters; a call drawn from torch's
generator reserves the offsets offset + 0..3 (docs/design.md §3), and each regularizer site draws
its own state.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = [
    "STREAM_DROPOUT_MASK",
    "STREAM_SITE_NOISE",
    "STREAM_GUMBEL",
    "STREAM_GUMBEL_REFINE",
    "philox4x32_10",
    "philox_words",
    "philox_uint32",
    "philox_uint16",
    "philox_bits",
    "acc_dtype",
    "dropout_threshold",
    "dropout_scale",
    "dropout_keep",
    "alpha_dropout",
    "alpha_dropout_scale",
    "SELU_ALPHA",
    "dropout",
    "philox",
    "gumbel_noise",
    "cross_entropy_sample",
    "ce_grad",
    "cross_entropy_sample_grad",
    "cross_entropy_sample_grad_backward",
    "sampled_label",
    "ce_grad_backward",
    "NOISE_KINDS",
    "site_noise",
    "site_noise_amplitude",
    "site_penalty",
    "site_penalty_backward",
    "SHARED_MASKS",
    "shared_mask_dims",
    "regularizer_objective",
]

STREAM_DROPOUT_MASK = 0
STREAM_SITE_NOISE = 1
STREAM_GUMBEL = 2
STREAM_GUMBEL_REFINE = 3

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


def philox_words(rng: torch.Tensor, stream: int, groups: int, device=None) -> torch.Tensor:
    """The four words of groups 0 .. groups-1 of ``stream`` under rng = int64 [seed, offset], as an
    int64 tensor (groups, 4) of values < 2^32."""
    device = rng.device if device is None else device
    rng = rng.to(device=device, dtype=torch.int64)
    seed, offset = rng[0], rng[1]
    s = offset + stream  # int64 wrap-around == uint64 addition mod 2^64
    g_lo, g_hi = _split64(torch.arange(groups, device=device, dtype=torch.int64))
    s_lo, s_hi = _split64(s)
    k_lo, k_hi = _split64(seed)
    return torch.stack(philox4x32_10((g_lo, g_hi, s_lo, s_hi), (k_lo, k_hi)), dim=-1)


def philox_uint32(rng: torch.Tensor, stream: int, numel: int, device=None) -> torch.Tensor:
    """u32(i) = word i & 3 of group i >> 2, for i in [0, numel) (the Gumbel refinement's density)."""
    return philox_words(rng, stream, (numel + 3) // 4, device).reshape(-1)[:numel]


def philox_uint16(rng: torch.Tensor, stream: int, numel: int, device=None) -> torch.Tensor:
    """u16(i) = half i & 1 (low first) of word (i >> 1) & 3 of group i >> 3 (mask density)."""
    words = philox_words(rng, stream, (numel + 7) // 8, device)
    return torch.stack([words & 0xFFFF, words >> 16], dim=-1).reshape(-1)[:numel]


def philox_bits(rng: torch.Tensor, stream: int, numel: int, device=None) -> torch.Tensor:
    """bit(i) = bit i & 31 of word (i >> 5) & 3 of group i >> 7 (Rademacher density), as 0/1 int64."""
    words = philox_words(rng, stream, (numel + 127) // 128, device)
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    return ((words[..., None] >> shifts) & 1).reshape(-1)[:numel]


def dropout_threshold(p: float) -> int:
    """Keep-test threshold t = round(p·2^16) (half to even, as std::nearbyint), in [0, 2^16]."""
    return round(p * 65536.0)


def dropout_scale(p: float) -> float:
    """1/(1-p') for the quantized p' = t/2^16: 2^16/(2^16 - t), and 0 when everything is dropped
    (t = 2^16; avoids 0·inf)."""
    t = dropout_threshold(p)
    return 0.0 if t >= 65536 else 65536.0 / (65536 - t)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (compute) dtype of every op: float64 for float64 inputs, float32 otherwise.
    The one rule of the Python side; C++ has ``at::opmath_type`` and ``acc_type`` (checks.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep(shape, p: float, rng: torch.Tensor) -> torch.Tensor:
    """Boolean keep mask m of the given shape: m_i = u16(i) >= round(p·2^16)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    u = philox_uint16(rng, STREAM_DROPOUT_MASK, numel)
    return (u >= dropout_threshold(p)).reshape(shape)


def dropout(x: torch.Tensor, p: float, rng: torch.Tensor) -> torch.Tensor:
    """y = m ⊙ x / (1 - p'), m from :func:`dropout_keep` (by logical index), p' the quantized p
    (:func:`dropout_scale`); computed in float32 (float64 for float64 inputs) and rounded once to x's
    dtype; dropped elements are +0; y has x's layout (``torch.empty_like``). Differentiable through
    plain autograd."""
    return _apply_keep(x, dropout_keep(x.shape, p, rng.to(x.device)), p)


def _apply_keep(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """x / (1 - p') where ``keep``, +0 elsewhere: in float32 (float64 for float64 x) rounded once to
    x's dtype, in x's layout."""
    acc = acc_dtype(x.dtype)
    scale = torch.tensor(dropout_scale(p), dtype=acc, device=x.device)
    scaled = (x.to(acc) * scale).to(x.dtype)
    y = torch.where(keep, scaled, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.empty_like(x).copy_(y)  # x's layout, as torch.empty_like(x) lays it out


def logical_index(shape, index_strides, index_base: int, device=None) -> torch.Tensor:
    """The int64 tensor of ``shape`` whose element at position (i_0, .., i_{n-1}) is
    ``index_base + Σ_k i_k·index_strides[k]``: the logical index a :func:`dropout_indexed` element
    reads its mask at. For the box [offset, offset + shape) of a row-major tensor of shape G (a shard
    of a sharded tensor): strides = G's row-major strides, base = Σ_k offset_k·strides_k."""
    index = torch.full(tuple(shape), index_base, dtype=torch.int64, device=device)
    for k, (n, stride) in enumerate(zip(shape, index_strides)):
        view = [1] * len(shape)
        view[k] = n
        index = index + (torch.arange(n, dtype=torch.int64, device=device) * stride).view(view)
    return index


def philox_uint16_at(rng: torch.Tensor, stream: int, index: torch.Tensor) -> torch.Tensor:
    """u16 at each logical index of ``index`` (int64, >= 0): half index & 1 of word (index >> 1) & 3
    of group index >> 3, the mask density of :func:`philox_uint16` at arbitrary indices."""
    rng = rng.to(device=index.device, dtype=torch.int64)
    s_lo, s_hi = _split64(rng[1] + stream)
    g_lo, g_hi = _split64(index >> 3)
    words = torch.stack(philox4x32_10((g_lo, g_hi, s_lo, s_hi), _split64(rng[0])), dim=-1)
    word = words.gather(-1, ((index >> 1) & 3).unsqueeze(-1)).squeeze(-1)
    return (word >> ((index & 1) * 16)) & 0xFFFF


def dropout_indexed(x: torch.Tensor, p: float, rng: torch.Tensor, index_strides: list, index_base: int) -> torch.Tensor:
    """:func:`dropout` with the mask read at the logical index :func:`logical_index` gives each element
    instead of x's own row-major index: y_i = m(index_i) ⊙ x_i / (1 - p'). With x the box of a larger
    tensor (a shard), the mask is that larger tensor's, element for element. Same arithmetic, dtype
    and layout rules as :func:`dropout`; ``dropout(x, p, rng)`` is the case strides = x's row-major
    strides, base 0."""
    index = logical_index(x.shape, index_strides, index_base, x.device)
    return _apply_keep(x, philox_uint16_at(rng, STREAM_DROPOUT_MASK, index) >= dropout_threshold(p), p)


SELU_ALPHA = 1.7580993408473766  # SELU's λ·α: its negative saturation value, negated


def alpha_dropout_scale(p: float) -> tuple:
    """(q', a) of alpha dropout: the quantized drop probability q' = t/2^16 the mask applies and the
    scale a = ((α²q' + 1)(1 - q'))^(-1/2); a is None when q' = 1 (everything dropped)."""
    q = dropout_threshold(p) / 65536.0
    return q, (None if q >= 1.0 else 1.0 / math.sqrt((SELU_ALPHA * SELU_ALPHA * q + 1.0) * (1.0 - q)))


def alpha_dropout(x: torch.Tensor, p: float, rng: torch.Tensor, mask_shape=None) -> torch.Tensor:
    """Alpha dropout on the dropout mask stream: y = a·x + α·a·p' where kept, α·a·(p' - 1) where
    dropped, a = ((α²p' + 1)(1 - p'))^(-1/2), p' the quantized p, the keep mask of ``mask_shape``
    (default x's shape; broadcast over x, one draw per channel for feature alpha dropout) from
    :func:`dropout_keep`; computed in the accumulation dtype and rounded once. p' = 0 is the
    identity, p' = 1 gives zeros."""
    q, a = alpha_dropout_scale(p)
    if q == 0.0:
        return x.clone()
    if a is None:
        return x * 0
    keep = dropout_keep(tuple(x.shape) if mask_shape is None else tuple(mask_shape), p, rng.to(x.device))
    acc = x.to(acc_dtype(x.dtype))
    kept = acc * a + SELU_ALPHA * a * q
    dropped = torch.full((), SELU_ALPHA * a * (q - 1.0), dtype=acc.dtype, device=x.device)
    return torch.where(keep, kept, dropped).to(x.dtype)


def philox(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10: counter int64 (N, 4), key int64 (N, 2) → int64 (N, 4) in [0, 2^32).

    Input words are taken modulo 2^32 (their low 32 bits), as the C++ and Triton kernels do.
    """
    words = philox4x32_10((counter & _MASK32).unbind(-1), (key & _MASK32).unbind(-1))
    return torch.stack(words, dim=-1)


# ---------------------------------------------------------------------------------------------
# Cross-entropy with a sampled label (docs/design.md §2, fused op 2)
# ---------------------------------------------------------------------------------------------


def _check_rows(z: torch.Tensor, label: torch.Tensor, ignore_index: int, name: str) -> torch.Tensor:
    """Boolean mask of valid rows; raises if a valid label is outside [0, C)."""
    valid = label != ignore_index
    bad = valid & ((label < 0) | (label >= z.shape[-1]))
    if bool(bad.any()):
        raise ValueError(
            f"argument '{name}' must hold class indices in [0, {z.shape[-1]}) or ignore_index={ignore_index}, "
            f"got {int(label[bad][0])}"
        )
    return valid


def gumbel_noise(rng: torch.Tensor, rows: int, cols: int, device=None) -> torch.Tensor:
    """Standard Gumbel noise G (float32, shape (rows, cols)) of the Gumbel streams (contract v3).

    With i = r·cols + c, h = u16(i) of :data:`STREAM_GUMBEL` and v = u32(i) of
    :data:`STREAM_GUMBEL_REFINE`: u = (((h << 7) | (v >> 25)) + 1/2) · 2^-23 (exact in float32,
    in (0, 1)), G = -log(-log(u)). The kernels draw v only for the candidates of their filter;
    here it is drawn for every element.
    """
    h = philox_uint16(rng, STREAM_GUMBEL, rows * cols, device)
    v = philox_uint32(rng, STREAM_GUMBEL_REFINE, rows * cols, device)
    k = ((h << 7) | (v >> 25)).reshape(rows, cols)
    u = (k.to(torch.float32) + 0.5) * (2.0**-23)
    return -torch.log(-torch.log(u))


def cross_entropy_sample(
    z: torch.Tensor, target: torch.Tensor, rng: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy, log-sum-exp and a sample ŷ ~ softmax(z) in one pass over the logits.

    Args:
        z: logits (N, C), float64/float32/float16/bfloat16.
        target: int64 (N,), class indices or ``ignore_index``.
        rng: int64 [seed, offset]; ŷ_r = argmax_c (z_rc + G_rc), G from :func:`gumbel_noise`
            (ties to the smallest index).

    Returns:
        loss (N,) = lse_r - z_r[y_r] (0 on ignored rows), lse (N,) — both float32 (float64 for
        float64 logits) — and yhat (N,) int64 (``ignore_index`` on ignored rows).
    """
    acc = acc_dtype(z.dtype)
    if z.shape[1] == 0:
        if z.shape[0] > 0:
            raise ValueError("argument 'z' must have at least one class (C >= 1)")
        empty = z.new_empty((0,), dtype=acc)
        return empty, empty.clone(), z.new_empty((0,), dtype=torch.int64)
    za = z.to(acc)
    valid = _check_rows(z, target, ignore_index, "target")
    lse = torch.logsumexp(za, dim=-1)
    safe = torch.where(valid, target, 0)
    loss = torch.where(valid, lse - za.gather(1, safe[:, None]).squeeze(1), 0.0)
    score = za + gumbel_noise(rng.to(z.device), z.shape[0], z.shape[1], z.device).to(acc)
    yhat = torch.where(valid, score.argmax(dim=-1), ignore_index)
    return loss, lse, yhat


def ce_grad(
    z: torch.Tensor, lse: torch.Tensor, label: torch.Tensor, row_scale: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """G = row_scale ⊙ (softmax(z) - onehot(label)), the gradient of Σ_r row_scale_r·CE(z_r, label_r).

    softmax(z) = exp(z - lse); rows with label == ignore_index are 0. Shapes: z (N, C), lse (N,)
    (the log-sum-exp of z: taken as given, its dependence on z is in the formula), label (N,),
    row_scale (N,) float32/float64; output (N, C) in z's dtype.
    """
    acc = acc_dtype(z.dtype)
    valid = _check_rows(z, label, ignore_index, "label")
    p = torch.exp(z.to(acc) - lse.to(acc)[:, None])
    onehot = torch.zeros_like(p).scatter_(1, torch.where(valid, label, 0)[:, None], 1.0)
    g = (p - onehot) * torch.where(valid, row_scale.to(acc), 0.0)[:, None]
    return g.to(z.dtype)


def sampled_label(target: torch.Tensor, yhat: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """ŷ on valid rows and -1 (never a class) on ignored ones: the label of the sampled gradient
    with ``ignore_index=-1``, so that a valid row whose ŷ happens to equal ``ignore_index`` (when that
    is a real class) is not taken for an ignored one."""
    return torch.where(target != ignore_index, yhat, -1)


def cross_entropy_sample_grad(
    z: torch.Tensor,
    target: torch.Tensor,
    rng: torch.Tensor,
    ignore_index: int = -100,
    true_scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_sample` and the gradients of the sampled and of the true label's
    cross-entropy, in one op:

        loss, lse, ŷ = cross_entropy_sample(z, target, rng, ignore_index)
        G_r      = softmax(z_r) - onehot(ŷ_r)                  (0 on ignored rows)
        G_true_r = true_scale_r · (softmax(z_r) - onehot(y_r))  (0 on ignored rows; only with true_scale)

    with softmax(z_r) = exp(z_r - lse_r). G is the cotangent of the regularizer's explicit term and
    G_true (true_scale = 1/N_eff) that of its implicit term (docs/design.md §2). Returns loss, lse
    (float32; float64 for float64 z), ŷ (int64), G and G_true (N, C) in z's dtype; G_true is an
    empty (0,) tensor when true_scale is None.
    """
    loss, lse, yhat = cross_entropy_sample(z, target, rng, ignore_index)
    grad_true = z.new_empty((0,))
    if z.shape[1] == 0:
        empty = torch.empty_like(z, memory_format=torch.contiguous_format)
        return loss, lse, yhat, empty, empty.clone() if true_scale is not None else grad_true
    grad = ce_grad(z, lse, sampled_label(target, yhat, ignore_index), torch.ones_like(lse), -1)
    if true_scale is not None:
        grad_true = ce_grad(z, lse, target, true_scale, ignore_index)
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
    """The gradient in z of ⟨grad_loss, loss⟩ + ⟨grad_g, G⟩ + ⟨grad_g_true, G_true⟩ for the outputs of
    :func:`cross_entropy_sample_grad` (ŷ held fixed; a missing cotangent counts as 0). With p =
    softmax(z) and w = grad_g + true_scale ⊙ grad_g_true, on rows whose target is not ignore_index::

        grad_z = p ⊙ (w - ⟨p, w⟩) + grad_loss ⊙ (p - onehot(y))

    (the softmax Jacobian is symmetric and the one-hots are constants: G's derivative does not
    depend on ŷ), 0 on the other rows; in z's dtype.
    """
    acc = acc_dtype(z.dtype)
    valid = target != ignore_index
    p = torch.exp(z.to(acc) - lse.to(acc)[:, None])
    grad = torch.zeros_like(p)
    w = torch.zeros_like(p)
    if grad_g is not None:
        w = w + grad_g.to(acc)
    if grad_g_true is not None:
        w = w + true_scale.to(acc)[:, None] * grad_g_true.to(acc)
    if grad_g is not None or grad_g_true is not None:
        grad = p * (w - (p * w).sum(-1, keepdim=True))
    if grad_loss is not None:
        onehot = torch.zeros_like(p).scatter_(1, torch.where(valid, target, 0)[:, None], 1.0)
        grad = grad + grad_loss.to(acc)[:, None] * (p - onehot)
    return torch.where(valid[:, None], grad, 0.0).to(z.dtype)


def ce_grad_backward(
    u: torch.Tensor,
    z: torch.Tensor,
    lse: torch.Tensor,
    label: torch.Tensor,
    row_scale: torch.Tensor,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of :func:`ce_grad` with cotangent u (N, C).

    The softmax Jacobian diag(p) - ppᵀ is symmetric, so
        grad_z = row_scale ⊙ p ⊙ (u - ⟨p, u⟩),   grad_row_scale = ⟨p, u⟩ - u[label],
    both 0 on ignored rows; grad_z in z's dtype, grad_row_scale in row_scale's dtype.
    """
    _check_rows(z, label, ignore_index, "label")
    return ce_grad_backward_unchecked(u, z, lse, label, row_scale, ignore_index)


def ce_grad_backward_unchecked(
    u: torch.Tensor,
    z: torch.Tensor,
    lse: torch.Tensor,
    label: torch.Tensor,
    row_scale: torch.Tensor,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ce_grad_backward` without the label range check (which reads data, so it cannot be
    traced by torch.compile): for composite derivative formulas whose labels were checked already."""
    acc = acc_dtype(z.dtype)
    valid = label != ignore_index
    p = torch.exp(z.to(acc) - lse.to(acc)[:, None])
    ua = u.to(acc)
    pu = (p * ua).sum(dim=-1)
    scale = torch.where(valid, row_scale.to(acc), 0.0)
    grad_z = (scale[:, None] * p * (ua - pu[:, None])).to(z.dtype)
    u_label = ua.gather(1, torch.where(valid, label, 0)[:, None]).squeeze(1)
    grad_scale = torch.where(valid, pu - u_label, 0.0).to(row_scale.dtype)
    return grad_z, grad_scale


# ---------------------------------------------------------------------------------------------
# Site penalty: explicit term Σ (g_e ⊙ h)² and implicit term Σ g_i ⊙ η ⊙ h (fused op 3)
# ---------------------------------------------------------------------------------------------

NOISE_KINDS = ("rademacher", "dropout")


def site_noise(shape, q: float, noise: str, rng: torch.Tensor, dtype=torch.float32, device=None) -> torch.Tensor:
    """η of the site-noise stream, mean 0, in ``dtype`` (float32/float64).

    rademacher: η_i = ±sqrt(q/(1-q)), + iff bit(i) = 1 (:func:`philox_bits`); variance q/(1-q);
    dropout:    η_i = q'/(1-q') if u16(i) >= t (kept) else -1 (= m_i/(1-q') - 1), t = round(q·2^16),
                q' = t/2^16: variance q'/(1-q').
    """
    if noise not in NOISE_KINDS:
        raise ValueError(f"argument 'noise' must be one of {NOISE_KINDS}, got {noise!r}")
    numel = 1
    for d in shape:
        numel *= int(d)
    device = rng.device if device is None else device
    if noise == "rademacher":
        bit = philox_bits(rng, STREAM_SITE_NOISE, numel, device).reshape(shape)
        a = torch.tensor(site_noise_amplitude(q, noise), dtype=dtype, device=device)
        return torch.where(bit == 1, a, -a)
    u = philox_uint16(rng, STREAM_SITE_NOISE, numel, device).reshape(shape)
    up = torch.tensor(site_noise_amplitude(q, noise), dtype=dtype, device=device)
    return torch.where(u >= dropout_threshold(q), up, torch.tensor(-1.0, dtype=dtype, device=device))


def site_noise_amplitude(q: float, noise: str) -> float:
    """The positive noise value, in double: sqrt(q/(1-q)) (rademacher), q'/(1-q') = t/(2^16 - t)
    (dropout kind; q' the quantized q)."""
    if noise == "rademacher":
        return (q / (1.0 - q)) ** 0.5
    t = dropout_threshold(q)
    return t / (65536 - t)


def site_penalty(
    h: torch.Tensor,
    g_e: Optional[torch.Tensor],
    g_i: Optional[torch.Tensor],
    q: float,
    noise: str,
    rng: torch.Tensor,
) -> torch.Tensor:
    """[Σ (g_e ⊙ h)², Σ g_i ⊙ η ⊙ h] as a (2,) tensor (float32; float64 for float64 h).

    η from :func:`site_noise`; a missing g_e or g_i contributes 0. h, g_e, g_i share one shape.
    """
    acc = acc_dtype(h.dtype)
    ha = h.to(acc)
    zero = torch.zeros((), dtype=acc, device=h.device)
    explicit = ((g_e.to(acc) * ha) ** 2).sum() if g_e is not None else zero
    if g_i is not None:
        eta = site_noise(h.shape, q, noise, rng.to(h.device), acc, h.device)
        implicit = (g_i.to(acc) * eta * ha).sum()
    else:
        implicit = zero
    return torch.stack([explicit, implicit])


def site_penalty_backward(
    grad: torch.Tensor,
    h: torch.Tensor,
    g_e: Optional[torch.Tensor],
    g_i: Optional[torch.Tensor],
    q: float,
    noise: str,
    rng: torch.Tensor,
) -> tuple:
    """Gradients of ``a·Σ (g_e h)² + b·Σ g_i η h`` for grad = [a, b]:

        dh = 2a·g_e²·h + b·g_i·η,   dg_e = 2a·g_e·h²,   dg_i = b·η·h

    (None for a missing input), each in its input's dtype.
    """
    acc = acc_dtype(h.dtype)
    a, b = grad.to(acc).unbind(0)
    ha = h.to(acc)
    dh = torch.zeros_like(ha)
    dg_e = dg_i = None
    if g_e is not None:
        ge = g_e.to(acc)
        dh = dh + 2 * a * ge * ge * ha
        dg_e = (2 * a * ge * ha * ha).to(g_e.dtype)
    if g_i is not None:
        eta = site_noise(h.shape, q, noise, rng.to(h.device), acc, h.device)
        dh = dh + b * g_i.to(acc) * eta
        dg_i = (b * eta * ha).to(g_i.dtype)
    return dh.to(h.dtype), dg_e, dg_i


# ---------------------------------------------------------------------------------------------
# The regularized objective J + Σ λ_i R_i + T (docs/design.md §2), in plain autograd
# ---------------------------------------------------------------------------------------------


def _site_noise_draw(h: torch.Tensor, q: float, noise: str) -> torch.Tensor:
    """η from torch's own generator (not the Philox contract): what a plain-autograd user writes."""
    r = q / (1.0 - q)
    if noise == "rademacher":
        return (torch.randint(0, 2, h.shape, device=h.device, dtype=h.dtype) * 2 - 1) * r**0.5
    return torch.bernoulli(torch.full_like(h, 1.0 - q)) / (1.0 - q) - 1.0


# How a site whose dropout mask is shared along some dims (channel and locked dropout) enters the terms:
# "exact" sums g ⊙ h over the shared dims before squaring (the Taylor term of that dropout) and draws one
# η per mask element; "elementwise" treats every element as independent (the authors' code).
SHARED_MASKS = ("exact", "elementwise")


def shared_mask_dims(site, shared_masks: str) -> tuple:
    r"""The dims of ``site.h`` along which its mask is shared, () for an element-wise site (or with
    ``shared_masks="elementwise"``).

    Why: with δ = h ⊙ η broadcast from a mask of independent elements k, each shared by the positions S_k,
    the second-order dropout gap ½E[δᵀHδ] is ½·q/(1−q)·Σ_k h_{S_k}ᵀ H h_{S_k}, and with H = Jᵀ H_out J
    sampled by g gᵀ that is ½·q/(1−q)·Σ_k (Σ_{j∈S_k} g_j h_j)²: the products summed over S_k, then
    squared. The noise term likewise has one η_k per mask element: Σ_k η_k Σ_{j∈S_k} g_j h_j."""
    if shared_masks not in SHARED_MASKS:
        raise ValueError(f"argument 'shared_masks' must be one of {SHARED_MASKS}, got {shared_masks!r}")
    mask = getattr(site, "mask_shape", None)
    if shared_masks == "elementwise" or mask is None:
        return ()
    return tuple(d for d, (m, n) in enumerate(zip(mask, site.h.shape)) if m == 1 and n != 1)


# The profiler range (torch.profiler.record_function) around a regularizer objective's first-order
# VJPs, the autograd.grad calls that give the gradients at the sites (here and in DropoutRegularizer).
VJP_RANGE = "dropreg.first_order_vjps"


def regularizer_objective(
    logits: torch.Tensor,
    target: torch.Tensor,
    sites,
    *,
    explicit: Optional[str] = "sampled",
    implicit: bool = True,
    noise: str = "rademacher",
    scale: float = 1.0,
    noise_scale: float = 1.0,
    ignore_index: int = -100,
    rng_label: Optional[torch.Tensor] = None,
    rng_noise: Optional[Callable[[], torch.Tensor]] = None,
    shared_masks: str = "exact",
) -> tuple:
    """(J, Σ_i λ_i R_i, T, ŷ) of ``DropoutRegularizer`` by the formulas, in plain autograd.

    ``sites``: the recorded sites (objects with ``h``, the activation, ``o``, the identity node the
    model continued from, ``q``, and optionally ``mask_shape``), e.g. from
    :func:`dropreg_ext.record_sites`. With z the logits as rows (N_eff rows whose target is not
    ``ignore_index``; ŷ of a valid row counts even if it equals ``ignore_index``)::

        J   = (1/N_eff) Σ_r CE(z_r, y_r)                       (log_softmax and a gather)
        g_i = ∂[Σ_r CE(z_r, ŷ_r)]/∂o_i  ("sampled"; y for "true"),  create_graph=True
        R_i = (1/N_eff) Σ_k (Σ_{j∈S_k} g_ij h_ij)²,  λ_i = scale·½·q_i/(1-q_i)
        T   = noise_scale · Σ_i Σ_k η_ik Σ_{j∈S_k} (∂J/∂o_i)_j h_ij          (implicit)

    with k the elements of site i's mask and S_k the positions mask element k covers
    (:func:`shared_mask_dims`): one position each for element-wise dropout (and with
    ``shared_masks="elementwise"``), R_i = (1/N_eff) Σ (g_i ⊙ h_i)².

    ŷ and η follow the random-number contract when ``rng_label`` / ``rng_noise`` are given (ŷ from
    :func:`cross_entropy_sample` at ``rng_label``; each site's η from :func:`site_noise` at the state
    ``rng_noise()`` returns, called once per site the logits depend on, in site order, as the fused
    objective draws them), and torch's own generator otherwise (``torch.multinomial`` and
    ``randint`` / ``bernoulli``: the plain-autograd baseline of the benchmarks).
    """
    c = logits.shape[-1]
    z = logits.reshape(-1, c)
    t = target.reshape(-1).to(torch.int64)
    valid = t != ignore_index
    n_eff = valid.sum().clamp_min(1).to(z.dtype)
    logp = torch.log_softmax(z, -1)

    def ce_sum(label: torch.Tensor) -> torch.Tensor:
        return -(logp.gather(1, torch.where(valid, label, 0)[:, None]).squeeze(1) * valid).sum()

    J = ce_sum(t) / n_eff
    if rng_label is not None:
        _, _, yhat = cross_entropy_sample(z.detach(), t, rng_label, ignore_index)
    else:
        yhat = torch.multinomial(torch.softmax(z.detach().float(), -1), 1).squeeze(1)
    zero = J.new_zeros(())
    if not sites or (explicit is None and not implicit):
        return J, zero, zero, yhat
    outs = [s.o for s in sites]
    dims = [shared_mask_dims(s, shared_masks) for s in sites]

    def products(g: torch.Tensor, site, shared: tuple) -> torch.Tensor:
        """g ⊙ h, summed over the dims the site's mask is shared along."""
        return (g * site.h).sum(shared, keepdim=True) if shared else g * site.h

    explicit_term = implicit_term = zero
    if explicit is not None:
        label = torch.where(valid, yhat, t) if explicit == "sampled" else t
        with torch.profiler.record_function(VJP_RANGE):
            g_e = torch.autograd.grad(ce_sum(label), outs, create_graph=True, allow_unused=True)
        for site, g, shared in zip(sites, g_e, dims):
            if g is not None:
                lam = scale * 0.5 * site.q / (1 - site.q)
                explicit_term = explicit_term + lam * (products(g, site, shared) ** 2).sum()
        explicit_term = explicit_term / n_eff
    if implicit:
        with torch.profiler.record_function(VJP_RANGE):
            g_i = torch.autograd.grad(J, outs, create_graph=True, allow_unused=True)
        for site, g, shared in zip(sites, g_i, dims):
            if g is None or site.q == 0:  # (DropoutRegularizer skips such sites: no draw)
                continue
            # one η per mask element: of the reduced products' shape where the mask is shared
            noise_like = products(g, site, shared) if shared else site.h
            if rng_noise is not None:
                eta = site_noise(noise_like.shape, site.q, noise, rng_noise(), site.h.dtype, site.h.device)
            else:
                eta = _site_noise_draw(noise_like, site.q, noise)
            implicit_term = implicit_term + ((noise_like * eta).sum() if shared else (g * eta * site.h).sum())
        implicit_term = noise_scale * implicit_term
    return J, explicit_term, implicit_term, yhat
