"""Dropout on DTensors (tensor parallelism): each rank drops its local shard with exactly the mask the
whole tensor gets on one device.

The mask is a function of the logical element index (docs/design.md §3), so a shard is dropped with
:func:`dropreg_ext.ops.dropout_indexed`: its element at local position i reads the mask at the index
the same element has in the whole (global) tensor, ``Σ_k (offset_k + i_k)·G_k`` with G the global
row-major strides and ``offset`` the shard's place. The ranks draw the same ``[seed, offset]`` because
their generators agree: DTensor's rule for random ops is that every rank of the mesh seeds torch
identically (``torch.manual_seed`` on each, data-parallel groups apart), and every rank makes the same
draws in the same order. Shard(d) and Replicate() placements are covered (uneven shards included);
Partial() holds unreduced values, which have no elements to drop.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch built without distributed
    DTensor = None
try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:
    FSDPModule = None


def is_dtensor(x) -> bool:
    return DTensor is not None and isinstance(x, DTensor)


def _row_major_strides(shape) -> list:
    strides, step = [], 1
    for n in reversed(tuple(shape)):
        strides.append(step)
        step *= n
    return strides[::-1]


def shard_box(x) -> tuple:
    """(offsets, local shape) of this rank's shard in the global tensor; a clear error for placements
    whose local tensor is not a box of the global one."""
    for placement in x.placements:
        if placement.is_partial():
            raise ValueError(
                f"dropout of a DTensor with placement {placement}: a Partial() tensor holds unreduced partial "
                "values, not elements; reduce it first (x.redistribute(placements=[Replicate()] or [Shard(d)]))"
            )
        if type(placement) not in (Shard, Replicate):
            raise ValueError(
                f"dropout of a DTensor with placement {placement} is not supported: the fused dropout covers "
                "Shard(d) and Replicate() placements; redistribute to those first"
            )
    local_shape, offsets = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    return tuple(offsets), tuple(local_shape)


def index_map(x, mask_shape: Optional[tuple] = None) -> tuple:
    """(index_strides, index_base, local shape) of this rank's shard of ``x``, or of the mask of shape
    ``mask_shape`` broadcast over x (its dims of size 1 are whole on every rank), for
    ops.dropout_indexed."""
    offsets, local_shape = shard_box(x)
    shape = tuple(x.shape) if mask_shape is None else tuple(mask_shape)
    strides = _row_major_strides(shape)
    base = sum(o * s for o, s, n in zip(offsets, strides, shape) if n != 1)
    return strides, base, tuple(1 if n == 1 else m for n, m in zip(shape, local_shape))


# The regularizer's double backward through DTensor ops gives the single-device gradients under torch
# 2.14 (tests/test_tensor_parallel.py), but not under torch 2.11 (measured there: the same terms, the
# weight gradients up to 0.06 off on a 2-rank MLP). The versions between were not tested.
DOUBLE_BACKWARD_MIN_TORCH = (2, 14)


def check_double_backward() -> None:
    """Raise where the regularizer's terms on DTensor sites would get wrong gradients."""
    if torch.torch_version.TorchVersion(torch.__version__) < DOUBLE_BACKWARD_MIN_TORCH:
        need = ".".join(map(str, DOUBLE_BACKWARD_MIN_TORCH))
        raise NotImplementedError(
            f"DropoutRegularizer with DTensor (tensor-parallel) sites needs torch >= {need} (tested); under "
            f"torch {torch.__version__} the double backward through DTensor ops gives wrong weight gradients. "
            "Upgrade torch, or regularize the unsharded model (dr.Dropout itself is exact on DTensors here)"
        )


def check_no_fsdp(model: torch.nn.Module) -> None:
    """Raise for a model wrapped by FSDP2 (``fully_shard``): the regularizer's double backward is not
    supported there."""
    if FSDPModule is None or not any(isinstance(m, FSDPModule) for m in model.modules()):
        return
    raise NotImplementedError(
        "DropoutRegularizer does not support FSDP2 (fully_shard) models: FSDP2 reduce-scatters each "
        "parameter's gradient when its first-order backward ends, so the double-backward terms of the "
        "regularizer arrive too late (missing or wrong gradients, pytorch#172543, also with "
        "reshard_after_backward=False). Train the regularized model with DDP (or unsharded); dr.Dropout "
        "and dr.k_sample_loss need no double backward and work under fully_shard"
    )


def from_local(y: torch.Tensor, like) -> "DTensor":
    """``y`` (this rank's shard) as a DTensor with ``like``'s mesh, placements, shape and strides."""
    return DTensor.from_local(y, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())
