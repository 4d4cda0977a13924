"""Functional forms, mirroring ``torch.nn.functional`` (thin wrappers of :mod:`dropreg_ext.ops`)."""

from __future__ import annotations

from typing import Optional

import torch

from .ops import broadcast_dropout, dropout

__all__ = ["dropout", "dropout1d", "dropout2d", "dropout3d", "locked_dropout"]


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
