"""The dropout functions, mirroring ``torch.nn.functional``: element-wise :func:`dropout`, channel
dropout, alpha dropout, locked (variational) dropout, all on the fused op
:func:`dropreg_ext.ops.fused_dropout`.

They follow torch's functions case by case: the same early returns (``training=False``, ``p = 0``
or an empty input return the input itself), the same output layout, the same rank rules, warnings
and errors for channel dropout. Two differences are deliberate: the mask comes from the Philox
contract (``seed=`` fixes it on every backend), and a dropped element is +0 even where the input is
NaN or ±inf (torch multiplies it by 0). Inputs the kernels do not cover (:func:`covered`) raise a
``TypeError`` here; the drop-in layers (the modules, :func:`dropreg_ext.patch_functional`) hand
them to torch's own function instead.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import _dtensor, ops, reference
from ._checks import FLOAT_DTYPES, check_float_tensor, check_prob, check_seed, is_dense
from .backends import resolve_backend

__all__ = [
    "dropout",
    "broadcast_dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "locked_dropout",
]

# torch's own functions, taken at import (before any patch_functional), for what `covered` rejects.
TORCH_FUNCTIONS = {
    name: getattr(F, name)
    for name in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
}


def covered(input) -> bool:
    """True if the fused kernels run ``input``: a plain (or Parameter) strided CPU or CUDA tensor of a
    dtype in float64/float32/float16/bfloat16, or a DTensor whose local shard is one (each rank drops
    its shard with the whole tensor's mask: ``_dtensor``). Everything else (other dtypes, sparse,
    nested, meta or other devices, other tensor subclasses) is torch's business."""
    if type(input) not in _PLAIN_TENSORS:
        return _dtensor.is_dtensor(input) and covered(input.to_local())
    return (
        input.dtype in FLOAT_DTYPES
        and input.layout == torch.strided
        and not input.is_nested
        and (input.is_cpu or input.is_cuda)
    )


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _checked_p(input, p, training, seed) -> tuple:
    """(p, seed) checked, seed as the int64 with its bits (or None); p is None where torch returns the
    input itself: training off, p = 0, an empty input."""
    check_float_tensor(input, "input")
    p = check_prob(p, "p")
    if not isinstance(training, bool):
        raise TypeError(f"argument 'training' must be a bool, got {type(training).__name__}")
    seed = check_seed(seed)
    return (None if not training or p == 0.0 or input.numel() == 0 else p), seed


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` if it is dense, else a dense copy in x's stride order (outermost = largest stride): the
    layout torch's dropout gives its output (TensorIterator orders the output's dimensions by the
    input's strides), which ``torch.empty_like`` does not for non-dense tensors."""
    if is_dense(x):
        return x
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))  # stable: equal strides keep their order
    return torch.empty_permuted(x.shape, order, dtype=x.dtype, device=x.device).copy_(x)


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
        training: apply dropout if True, else return ``input`` itself (also for ``p = 0`` and empty
            inputs, as torch).
        inplace: write the result into ``input`` (autograd sees the in-place write).
        seed: optional int in [0, 2**64): fixes the mask; by default a fresh state is drawn from
            torch's generator of input's device, so ``torch.manual_seed`` reproduces a run.

    Example::

        >>> x = torch.randn(4, 8)
        >>> y = dropreg_ext.functional.dropout(x, 0.1, seed=0)
    """
    p, seed = _checked_p(input, p, training, seed)
    if p is None:
        return input  # as torch: the input itself, no random number drawn
    if type(input) not in _PLAIN_TENSORS and _dtensor.is_dtensor(input):
        return _dropout_dtensor(input, p, inplace, seed)
    backend = resolve_backend(input)
    # input and p are checked: the registered op itself, which draws its state (one launch on a GPU)
    if not inplace:
        return ops._draw("dropout", backend, (input if input.is_contiguous() else _dense(input), p, seed))
    needs_graph = torch.is_grad_enabled() and input.requires_grad
    # The kernels write in place contiguous tensors, and on the CPU any dense layout (memory order).
    writable = input.is_contiguous() or (backend == "cpu" and is_dense(input))
    if backend in ("cpu", "cuda") and not needs_graph and writable:
        torch.ops.dropreg.dropout_draw_.default(input, p, seed)
        # The kernel wrote through the data pointer: bump the version counter so autograd
        # rejects graphs that saved the old values (as it does for torch's in-place dropout).
        torch.autograd.graph.increment_version(input)
        return input
    return input.copy_(ops._draw("dropout", backend, (_dense(input), p, seed)))


def _dropout_dtensor(input, p: float, inplace: bool, seed: Optional[int], mask_shape: Optional[tuple] = None):
    """Dropout of a DTensor: each rank's shard with the whole tensor's mask (``_dtensor``), or with the
    whole mask of ``mask_shape`` broadcast over it; differentiable through to_local / from_local."""
    strides, base, local_shape = _dtensor.index_map(input, mask_shape)
    local = input.to_local()
    backend = resolve_backend(local)
    draw = ops.BACKEND_OPS[backend]["dropout_indexed_draw"]
    if mask_shape is None:
        y = draw(local if local.is_contiguous() else _dense(local), p, strides, base, seed)[0]
    else:
        ones = torch.ones(local_shape, dtype=local.dtype, device=local.device)
        y = local * draw(ones, p, strides, base, seed)[0]
    out = _dtensor.from_local(y, input)
    return input.copy_(out) if inplace else out


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
    seed = check_seed(seed)
    try:
        shape = torch.broadcast_shapes(tuple(mask_shape), input.shape)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"argument 'mask_shape' {tuple(mask_shape)} must broadcast to the input's shape "
                         f"{tuple(input.shape)}") from exc
    if shape != input.shape:
        raise ValueError(f"argument 'mask_shape' {tuple(mask_shape)} must broadcast to the input's shape "
                         f"{tuple(input.shape)}")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if type(input) not in _PLAIN_TENSORS and _dtensor.is_dtensor(input):
        return _dropout_dtensor(input, p, inplace, seed, tuple(mask_shape))
    ones = torch.ones(tuple(mask_shape), dtype=input.dtype, device=input.device)
    mask = ops.BACKEND_OPS[resolve_backend(ones)]["dropout_draw"](ones, p, seed)[0]
    return input.mul_(mask) if inplace else input * mask



def _feature_dropout(input, p, training, inplace, seed, batched: bool) -> torch.Tensor:
    """torch's feature dropout: one draw per channel, the mask over dims (N, C) of a batched input and
    over dim C of an unbatched one (as torch, which unsqueezes N = 1: the same mask, element for
    element). Early returns, the p = 1 product and the rank error in torch's order."""
    p, _ = _checked_p(input, p, training, seed)
    if p is None:
        return input
    if p == 1.0:
        return input.mul_(0) if inplace else input * 0
    if input.dim() + (0 if batched else 1) < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    return broadcast_dropout(input, p, channel_mask_shape(input, batched), training, inplace, seed=seed)


def channel_mask_shape(input: torch.Tensor, batched: bool) -> tuple:
    """The mask of channel dropout: (N, C, 1, ...) over dims (N, C) of a batched input, (C, 1, ...) over
    dim C of an unbatched one."""
    channel_dims = 2 if batched else 1
    return tuple(input.shape[:channel_dims]) + (1,) * (input.dim() - channel_dims)


# Which inputs each channel dropout reads as batched (channels over dims (N, C)), by rank, as torch does.
CHANNEL_BATCHED = {
    "dropout1d": lambda rank: rank == 3,
    "dropout2d": lambda rank: True,  # a 3-D input is (N, C, L), torch's historical reading
    "dropout3d": lambda rank: rank == 5,
}


def mask_shape(name: str, input: torch.Tensor, batch_first: bool = False) -> tuple:
    """The shape of the mask the dropout function ``name`` draws for ``input`` (one draw per mask element,
    broadcast over the input): the input's own shape for ``"dropout"``, :func:`channel_mask_shape` for
    ``"dropout1d"``/``"2d"``/``"3d"``, :func:`locked_mask_shape` for ``"locked_dropout"``. The regularizers
    need it: a mask element shared by several positions is one noise variable for all of them."""
    if name == "dropout":
        return tuple(input.shape)
    if name == "locked_dropout":
        return locked_mask_shape(input, batch_first)
    return channel_mask_shape(input, CHANNEL_BATCHED[name](input.dim()))


def _rank(input) -> int:
    check_float_tensor(input, "input")
    return input.dim()


def dropout1d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None) -> torch.Tensor:
    """Channel dropout for (N, C, L) or (C, L): whole channels are zeroed (mask (N, C, 1) / (C, 1)).
    Other ranks raise torch's ``RuntimeError``."""
    rank = _rank(input)
    if rank not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {rank}D input. Note that dropout1d exists to "
            "provide channel-wise dropout on inputs with 1 spatial dimension, a channel dimension, and an optional "
            "batch dimension (i.e. 2D or 3D inputs)."
        )
    return _feature_dropout(input, p, training, inplace, seed, batched=CHANNEL_BATCHED["dropout1d"](rank))


def _warn_deprecated_rank(spatial: int, rank: int) -> None:
    """torch's warning for a rank outside (spatial + 1, spatial + 2) given to dropout2d / dropout3d."""
    warnings.warn(
        f"dropout{spatial}d: Received a {rank}-D input to dropout{spatial}d, which is deprecated and will result in "
        "an error in a future release. To retain the behavior and silence this warning, please use dropout instead. "
        f"Note that dropout{spatial}d exists to provide channel-wise dropout on inputs with {spatial} spatial "
        f"dimensions, a channel dimension, and an optional batch dimension (i.e. {spatial + 1}D or {spatial + 2}D "
        "inputs).",
        stacklevel=3,
    )


def dropout2d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None) -> torch.Tensor:
    """Channel dropout for (N, C, H, W) (mask (N, C, 1, 1)). As torch: other ranks warn and still drop
    channels of dims (N, C), and a 3-D input is read as (N, C, L) (torch's historical behaviour,
    with its warning), not as an unbatched (C, H, W)."""
    rank = _rank(input)
    if rank not in (3, 4):
        _warn_deprecated_rank(2, rank)
    if rank == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D dropout behavior is "
            "desired - input is interpreted as shape (N, C, L), where C is the channel dim. This behavior will "
            "change in a future release to interpret the input as one without a batch dimension, i.e. shape "
            "(C, H, W). To maintain the 1D channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2,
        )
    return _feature_dropout(input, p, training, inplace, seed, batched=CHANNEL_BATCHED["dropout2d"](rank))


def dropout3d(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
              seed: Optional[int] = None) -> torch.Tensor:
    """Channel dropout for (N, C, D, H, W) or (C, D, H, W) (mask (N, C, 1, 1, 1) / (C, 1, 1, 1)). As
    torch: other ranks warn and are read as unbatched (the channels along dim 0)."""
    rank = _rank(input)
    if rank not in (4, 5):
        _warn_deprecated_rank(3, rank)
    return _feature_dropout(input, p, training, inplace, seed, batched=CHANNEL_BATCHED["dropout3d"](rank))


def _alpha_dropout(input, p, training, inplace, seed, feature: bool) -> torch.Tensor:
    p, _ = _checked_p(input, p, training, seed)
    if p is None:
        return input
    q, a = reference.alpha_dropout_scale(p)  # q: the drop probability the mask applies
    if p == 1.0 or a is None:  # everything dropped: torch's p = 1 product (the p -> 1 limit)
        return input.mul_(0) if inplace else input * 0
    if feature and input.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    if q == 0.0:  # p' = 0: a = 1 and no shift, the identity (a fresh tensor, as torch's product)
        return input if inplace else input.clone()
    # keep ? a·x + α·a·q : α·a·(q-1)  =  a·(1-q)·dropout(x + α) + α·a·(q-1): the fused dropout's mask,
    # no mask stored. The shift is done in the accumulation dtype, so a half input loses nothing to it.
    shifted = input.to(reference.acc_dtype(input.dtype)) + reference.SELU_ALPHA
    if feature:
        mask_shape = tuple(input.shape[:2]) + (1,) * (input.dim() - 2)
        dropped = broadcast_dropout(shifted, p, mask_shape, inplace=True, seed=seed)
    else:
        dropped = dropout(shifted, p, inplace=True, seed=seed)
    y = dropped.mul_(a * (1.0 - q)).add_(reference.SELU_ALPHA * a * (q - 1.0)).to(input.dtype)
    return input.copy_(y) if inplace else y


def alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False, *,
                  seed: Optional[int] = None) -> torch.Tensor:
    r"""Drop-in for :func:`torch.nn.functional.alpha_dropout` (SELU networks): keeps the input's mean
    and variance (for zero-mean, unit-variance inputs) by setting dropped elements to SELU's
    saturation value and applying an affine map. With α = 1.7581 (:data:`dropreg_ext.reference.SELU_ALPHA`), p' the
    quantized p and a = ((α²p' + 1)(1 - p'))^{-1/2}:

    .. math:: y_i = \begin{cases} a x_i + α a p' & \text{kept} \\ α a (p' - 1) & \text{dropped} \end{cases}

    The keep mask is the dropout mask of the Philox contract (:func:`dropreg_ext.reference.dropout_keep`),
    regenerated in backward (nothing stored). Note torch's default ``training=False``.
    """
    return _alpha_dropout(input, p, training, inplace, seed, feature=False)


def feature_alpha_dropout(input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False, *,
                          seed: Optional[int] = None) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.feature_alpha_dropout`: :func:`alpha_dropout` with one draw
    per channel (mask over dims (N, C) of an input of rank >= 2, as torch)."""
    return _alpha_dropout(input, p, training, inplace, seed, feature=True)


def locked_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, batch_first: bool = False, *,
                   seed: Optional[int] = None) -> torch.Tensor:
    """Locked (variational) dropout of AWD-LSTM: one mask per sequence, shared along the time axis.

    Input (T, B, *) (or (B, T, *) with ``batch_first``); the mask has shape (1, B, *) ((B, 1, *)).
    """
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        raise ValueError("locked_dropout: argument 'input' must have at least 2 dimensions (time and batch)")
    return broadcast_dropout(input, p, locked_mask_shape(input, batch_first), training, seed=seed)


def locked_mask_shape(input: torch.Tensor, batch_first: bool) -> tuple:
    """The mask of locked dropout: (1, B, *) for a (T, B, *) input, (B, 1, *) with ``batch_first``."""
    time_dim = 1 if batch_first else 0
    return tuple(1 if d == time_dim else n for d, n in enumerate(input.shape))
