"""Which kernels run an op: ``"auto"`` (the CUDA extension for GPU tensors, the C++ kernels for CPU
tensors), ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``, chosen per process with
:func:`set_backend` / :func:`use_backend` or per call with ``backend=``."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

from . import _ext

__all__ = ["BACKENDS", "set_backend", "get_backend", "use_backend", "resolve_backend", "available_backends"]

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
_backend = "auto"


def set_backend(name: str) -> None:
    """Choose the kernels used by every op: ``"auto"`` (the CUDA extension for GPU tensors, the C++
    kernels for CPU tensors), ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"argument 'name' must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous backend on exit."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _triton_runs_on(device: torch.device) -> bool:
    return _ext.HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def available_backends(device) -> list:
    """Backends that can run ops on tensors of ``device`` in this process."""
    device = torch.device(device)
    names = ["reference"]
    if _ext.HAS_CPU and device.type == "cpu":
        names.append("cpu")
    if _ext.HAS_CUDA and device.type == "cuda":
        names.append("cuda")
    if _triton_runs_on(device):
        names.append("triton")
    return names


def resolve_backend(x: torch.Tensor, backend: Optional[str] = None) -> str:
    """The concrete backend that runs an op on ``x`` under the current (or given) choice."""
    name = _backend if backend is None else backend
    if name == "auto" and _ext.HAS_CPU and x.is_cpu:  # the common case on a CPU, first
        return "cpu"
    if name not in BACKENDS:
        raise ValueError(f"argument 'backend' must be one of {BACKENDS}, got {name!r}")
    device = x.device
    if name == "auto":
        if device.type == "cuda":
            return "cuda" if _ext.HAS_CUDA else ("triton" if _ext.HAS_TRITON else "reference")
        return "cpu" if _ext.HAS_CPU and device.type == "cpu" else "reference"
    if name not in available_backends(device):
        why = {
            "cpu": "needs a CPU tensor and the compiled extension",
            "cuda": "needs a CUDA tensor and the extension built with CUDA kernels",
            "triton": "needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)",
        }[name]
        raise RuntimeError(
            f"backend {name!r} cannot run on a {device.type} tensor here: it {why}; "
            f"available for {device.type}: {available_backends(device)}"
        )
    return name
