"""The dropout functions, mirroring ``torch.nn.functional``: element-wise :func:`dropout`, channel
dropout, locked (variational) dropout, all on the fused op :func:`dropreg_ext.ops.fused_dropout`."""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from ._checks import check_float_tensor, check_prob, check_seed, is_dense
from .backends import resolve_backend

__all__ = ["dropout", "broadcast_dropout", "dropout1d", "dropout2d", "dropout3d", "locked_dropout"]


def dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.dropout` that stores no mask.

    ``y = m ⊙ x / (1 - p)``, ``m_i ~ Bernoulli(1 - p)`` drawn by Philox4x32-10 from a per-call
    ``(seed, offset)``; backward regenerates m. For a given ``seed`` the mask is bit-identical on
    every backend and device.

    Args:
        input: float64/float32/float16/bfloat16 tensor of any shape.
        p: probability of an element to be zeroed, in [0, 1].
        training: apply dropout if True, else return ``input`` unchanged.
        inplace: write the result into ``input`` (autograd sees the in-place write).
        seed: optional int in [0, 2**64): fixes the mask; by default a fresh state is drawn from
            torch's generator of input's device, so ``torch.manual_seed`` reproduces a run.

    Example::

        >>> x = torch.randn(4, 8)
        >>> y = dropreg_ext.functional.dropout(x, 0.1, seed=0)
    """
    check_float_tensor(input, "input")
    p = check_prob(p, "p")
    if not isinstance(training, bool):
        raise TypeError(f"argument 'training' must be a bool, got {type(training).__name__}")
    check_seed(seed)
    if not training:
        return input
    rng = ops.make_rng(input.device, seed)
    backend = resolve_backend(input)
    op = ops.BACKEND_OPS[backend]["dropout"]  # input, p and rng are checked: the registered op itself
    if not inplace:
        return op(input, p, rng)
    needs_graph = torch.is_grad_enabled() and input.requires_grad
    # The kernels write in place contiguous tensors, and on the CPU any dense layout (memory order).
    writable = input.is_contiguous() or (backend == "cpu" and is_dense(input))
    if backend in ("cpu", "cuda") and not needs_graph and writable:
        torch.ops.dropreg.dropout_(input, p, rng)
        # The kernel wrote through the data pointer: bump the version counter so autograd
        # rejects graphs that saved the old values (as it does for torch's in-place dropout).
        torch.autograd.graph.increment_version(input)
        return input
    return input.copy_(op(input, p, rng))


def broadcast_dropout(
    input: torch.Tensor,
    p: float,
    mask_shape: tuple,
    training: bool = True,
    inplace: bool = False,
    *,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """Dropout with one draw per element of a mask of shape ``mask_shape``, broadcast over ``input``.

    ``y = x ⊙ m``, ``m = keep / (1 - p)`` of shape ``mask_shape`` (broadcastable to x), drawn by
    :func:`ops.fused_dropout` on a tensor of ones: the mask follows the same Philox contract (element j
    of the mask at logical index j), so it is bit-identical across backends. Channel dropout uses
    ``(N, C, 1, ...)``; locked (variational) dropout ``(1, B, H)`` for ``(T, B, H)`` inputs. The mask
    is ``numel(x)/numel(m)`` times smaller than x; it is the only tensor autograd keeps.
    """
    check_float_tensor(input, "input")
    p = check_prob(p, "p")
    check_seed(seed)
    try:
        shape = torch.broadcast_shapes(tuple(mask_shape), input.shape)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"argument 'mask_shape' {tuple(mask_shape)} must broadcast to the input's shape "
                         f"{tuple(input.shape)}") from exc
    if shape != input.shape:
        raise ValueError(f"argument 'mask_shape' {tuple(mask_shape)} must broadcast to the input's shape "
                         f"{tuple(input.shape)}")
    if not training:
        return input
    ones = torch.ones(tuple(mask_shape), dtype=input.dtype, device=input.device)
    mask = ops.fused_dropout(ones, p, ops.make_rng(input.device, seed))
    return input.mul_(mask) if inplace else input * mask



def _channel_dropout(input, p, training, inplace, seed, spatial_dims: int, name: str):
    if not isinstance(input, torch.Tensor) or input.dim() not in (spatial_dims + 1, spatial_dims + 2):
        raise ValueError(
            f"{name}: argument 'input' must have {spatial_dims + 1} (unbatched) or {spatial_dims + 2} "
            f"(batched) dimensions, got shape {tuple(getattr(input, 'shape', ()))}"
        )
    mask_shape = tuple(input.shape[: input.dim() - spatial_dims]) + (1,) * spatial_dims
    return broadcast_dropout(input, p, mask_shape, training, inplace, seed=seed)


def dropout1d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None) -> torch.Tensor:
    """Channel dropout for (N, C, L) or (C, L): whole channels are zeroed (mask (N, C, 1))."""
    return _channel_dropout(input, p, training, inplace, seed, 1, "dropout1d")


def dropout2d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None) -> torch.Tensor:
    """Channel dropout for (N, C, H, W) or (C, H, W): whole feature maps are zeroed (mask (N, C, 1, 1))."""
    return _channel_dropout(input, p, training, inplace, seed, 2, "dropout2d")


def dropout3d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None) -> torch.Tensor:
    """Channel dropout for (N, C, D, H, W) or (C, D, H, W) (mask (N, C, 1, 1, 1))."""
    return _channel_dropout(input, p, training, inplace, seed, 3, "dropout3d")


def locked_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, batch_first: bool = False, *,
                   seed: Optional[int] = None) -> torch.Tensor:
    """Locked (variational) dropout of AWD-LSTM: one mask per sequence, shared along the time axis.

    Input (T, B, *) (or (B, T, *) with ``batch_first``); the mask has shape (1, B, *) ((B, 1, *)).
    """
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        raise ValueError("locked_dropout: argument 'input' must have at least 2 dimensions (time and batch)")
    time_dim = 1 if batch_first else 0
    mask_shape = tuple(1 if d == time_dim else n for d, n in enumerate(input.shape))
    return broadcast_dropout(input, p, mask_shape, training, seed=seed)
