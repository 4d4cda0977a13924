"""Argument checks of the public Python API: each error names the argument and what is allowed."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_prob(p, name: str = "p") -> float:
    """p must be a real number in [0, 1] (not bool, not NaN), or a 0-d real tensor that needs no
    gradient (as torch's dropout accepts); returned as float. Out of range: ValueError with torch's
    message, so code that matches torch's error keeps working."""
    if type(p) is float and 0.0 <= p <= 1.0:  # the common case, first (NaN fails the comparisons)
        return p
    if isinstance(p, torch.Tensor) and p.dim() == 0 and not p.requires_grad and p.dtype != torch.bool \
            and not p.is_complex():
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"argument '{name}' must be a float in [0, 1], got {type(p).__name__}")
    p = float(p)
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p} (argument '{name}')")
    return p


def check_float_tensor(x, name: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"argument '{name}' must be a float64, float32, float16 or bfloat16 tensor, got {x.dtype}"
        )


def check_seed(seed, name: str = "seed"):
    """None, or an integer in [0, 2^64); returned as the int64 with the same bits."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"argument '{name}' must be None or an int in [0, 2**64), got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"argument '{name}' must be None or an int in [0, 2**64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def check_rng(rng, like: torch.Tensor, name: str = "rng") -> None:
    """rng must be an int64 tensor [seed, offset] of shape (2,) on the device of ``like``."""
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.int64 or rng.shape != (2,):
        raise TypeError(
            f"argument '{name}' must be an int64 tensor [seed, offset] of shape (2,), got "
            f"{getattr(rng, 'dtype', type(rng).__name__)} of shape {tuple(getattr(rng, 'shape', ()))}"
        )
    if rng.device != like.device:
        raise ValueError(f"argument '{name}' must be on the input's device ({like.device}), got {rng.device}")


def check_philox_args(counter, key) -> None:
    """counter int64 (N, 4) and key int64 (N, 2) on one device."""
    for name, t, width in (("counter", counter, 4), ("key", key, 2)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 2 or t.shape[1] != width:
            raise TypeError(f"argument '{name}' must be an int64 tensor of shape (N, {width})")
    if key.shape[0] != counter.shape[0]:
        raise ValueError(f"argument 'key' must have one row per counter row ({counter.shape[0]}), got {key.shape[0]}")
    if key.device != counter.device:
        raise ValueError("arguments 'counter' and 'key' must be on the same device")


def is_dense(x: torch.Tensor) -> bool:
    """True if x's elements fill its storage span without gaps or overlaps, in some dim order
    (C++'s ``is_non_overlapping_and_dense``): contiguous, channels_last, any permutation of those."""
    if x.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True
