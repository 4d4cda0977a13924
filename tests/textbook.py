"""The ops written from the contract's formulas, independently of ``dropreg_ext.reference``: what the
reference backend is compared with, where the other backends are compared with the reference.

Random bits: the raw Philox4x32-10 (``reference.philox``, checked against the Random123
known-answer vectors in test_philox.py) on counters built here from the layout of the contract:
key = (lo, hi) of the seed, counter = (lo, hi of the group g = i // 4, lo, hi of offset + stream),
u32(i) = word i % 4 of group g. Everything else is plain torch: ``F.cross_entropy``,
``torch.logsumexp``, ``argmax``, the softmax Jacobian, autograd of the penalty in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dropreg_ext import reference as R

MASK32 = 2**32 - 1
STREAMS = {"mask": 0, "site": 1, "gumbel": 2, "gumbel-refine": 3}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _words(rng: torch.Tensor, stream: str, groups: int) -> torch.Tensor:
    """The (groups, 4) words of groups 0 .. groups-1 (CPU)."""
    seed, offset = (v % 2**64 for v in rng.cpu().tolist())
    s = (offset + STREAMS[stream]) % 2**64
    g = torch.arange(groups, dtype=torch.int64)
    counter = torch.stack([g & MASK32, g >> 32, torch.full((groups,), s & MASK32),
                           torch.full((groups,), s >> 32)], dim=1)
    key = torch.tensor([[seed & MASK32, seed >> 32]]).expand(groups, 2)
    return R.philox(counter, key)


def u32(rng: torch.Tensor, stream: str, numel: int) -> torch.Tensor:
    """u32(i) = word i % 4 of group i // 4 (Gumbel refinement density), int64 values (CPU)."""
    i = torch.arange(numel)
    return _words(rng, stream, (numel + 3) // 4)[i // 4, i % 4]


def u16(rng: torch.Tensor, stream: str, numel: int) -> torch.Tensor:
    """u16(i) = 16-bit half i % 2 (low first) of word (i // 2) % 4 of group i // 8 (mask density)."""
    i = torch.arange(numel)
    word = _words(rng, stream, (numel + 7) // 8)[i // 8, (i // 2) % 4]
    return (word >> (16 * (i % 2))) % 2**16


def bit(rng: torch.Tensor, stream: str, numel: int) -> torch.Tensor:
    """bit i % 32 of word (i // 32) % 4 of group i // 128 (Rademacher density), 0/1 (CPU)."""
    i = torch.arange(numel)
    word = _words(rng, stream, (numel + 127) // 128)[i // 128, (i // 32) % 4]
    return (word >> (i % 32)) % 2


def dropout_keep(shape, p: float, rng: torch.Tensor) -> torch.Tensor:
    """keep iff u16 >= round(p·2^16) (half to even), at the row-major index (CPU)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    return (u16(rng, "mask", numel) >= round(p * 2**16)).reshape(tuple(shape))


def dropout(x: torch.Tensor, p: float, rng: torch.Tensor) -> torch.Tensor:
    """m ⊙ x / (1 - p'), p' = round(p·2^16)/2^16 the quantized p: the mask of :func:`dropout_keep`,
    the product in the compute dtype rounded once, dropped elements +0."""
    keep = dropout_keep(x.shape, p, rng).to(x.device)
    acc = acc_dtype(x.dtype)
    t = round(p * 2**16)
    scale = torch.tensor(0.0 if t == 2**16 else 1 / (1 - t / 2**16), dtype=acc, device=x.device)
    return torch.where(keep, (x.to(acc) * scale).to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))


def gumbel(rng: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """G = -log(-log u) at i = r·C + c, float32 (CPU): u = (k + 1/2)·2^-23, whose 23 bits k are the
    16 filter bits of u16(i) of the Gumbel stream over the top 7 bits of u32(i) of the refinement
    stream, i.e. k = h·128 + v // 2^25."""
    n = rows * cols
    k = u16(rng, "gumbel", n) * 128 + u32(rng, "gumbel-refine", n) // 2**25
    u = (k.to(torch.float32) + 0.5) * 2.0**-23
    return (-torch.log(-torch.log(u))).reshape(rows, cols)


def cross_entropy_sample(z, target, rng, ignore_index):
    """(F.cross_entropy per row, torch.logsumexp, argmax of z + G) in the compute dtype (CPU)."""
    acc = acc_dtype(z.dtype)
    za, t = z.detach().cpu().to(acc), target.cpu()
    valid = t != ignore_index
    loss = F.cross_entropy(za, t, ignore_index=ignore_index, reduction="none")
    yhat = (za + gumbel(rng, *z.shape).to(acc)).argmax(-1)
    return loss, torch.logsumexp(za, -1), torch.where(valid, yhat, ignore_index)


def ce_grad(z, lse, label, row_scale, ignore_index):
    """∂/∂z of Σ_r row_scale_r · CE(z_r, label_r) by autograd, in float64 (lse is implied by z)."""
    zz = z.detach().cpu().double().requires_grad_()
    ce = F.cross_entropy(zz, label.cpu(), ignore_index=ignore_index, reduction="none")
    (grad,) = torch.autograd.grad((ce * row_scale.cpu().double()).sum(), zz)
    return grad


def ce_grad_backward(u, z, lse, label, row_scale, ignore_index):
    """row_scale · (diag(p) - ppᵀ) u and ⟨p, u⟩ - u[label], 0 on ignored rows, in float64."""
    zd, ud, t = z.detach().cpu().double(), u.detach().cpu().double(), label.cpu()
    p = torch.softmax(zd, -1)
    valid = t != ignore_index
    hvp = p * ud - p * (p * ud).sum(-1, keepdim=True)
    grad_z = torch.where(valid[:, None], row_scale.cpu().double()[:, None] * hvp, 0.0)
    u_label = ud.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    return grad_z, torch.where(valid, (p * ud).sum(-1) - u_label, 0.0)


def site_noise(shape, q: float, noise: str, rng: torch.Tensor) -> torch.Tensor:
    """η in float64: rademacher ±sqrt(q/(1-q)), + iff the element's bit is 1; dropout kind q'/(1-q')
    if u16 >= round(q·2^16), else -1, q' the quantized q."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if noise == "rademacher":
        r = q / (1 - q)
        up, down, keep = r**0.5, -(r**0.5), bit(rng, "site", numel) == 1
    else:
        t = round(q * 2**16)
        up, down, keep = t / (2**16 - t), -1.0, u16(rng, "site", numel) >= t
    return torch.where(keep, torch.tensor(up, dtype=torch.float64), torch.tensor(down, dtype=torch.float64)).reshape(
        tuple(shape))


def site_penalty_and_grads(grad, h, g_e, g_i, q, noise, rng):
    """[Σ (g_e h)², Σ g_i η h] and the gradients of a·(first) + b·(second) by autograd, float64 (CPU)."""
    leaves = [None if t is None else t.detach().cpu().double().requires_grad_() for t in (h, g_e, g_i)]
    eta = site_noise(h.shape, q, noise, rng)
    zero = torch.zeros((), dtype=torch.float64)
    explicit = ((leaves[1] * leaves[0]) ** 2).sum() if g_e is not None else zero
    implicit = (leaves[2] * eta * leaves[0]).sum() if g_i is not None else zero
    a, b = grad.cpu().double().tolist()
    wrt = [t for t in leaves if t is not None]
    total = a * explicit + b * implicit + 0 * leaves[0].sum()  # connected to h when no g is given
    grads = iter(torch.autograd.grad(total, wrt, allow_unused=True))
    return torch.stack([explicit, implicit]).detach(), [None if t is None else next(grads) for t in leaves]
