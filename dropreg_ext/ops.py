"""Public functional ops: backend choice, the registered ops (fake kernels and autograd), and the
user-facing ``dropout``.

Every op exists once per backend as a registered ``torch.library`` op, so ``torch.compile`` traces
it without graph breaks and ``torch.library.opcheck`` can test it:

===============================  =====================  ======================================
op                               backend                implementation
===============================  =====================  ======================================
``dropreg::dropout``             ``cpu`` / ``cuda``     ``csrc/cpu/dropout.cpp``, ``csrc/cuda/dropout.cu``
``dropreg::dropout_triton``      ``triton``             ``triton_kernels/dropout.py``
``dropreg::dropout_reference``   ``reference``          ``reference.dropout``
``dropreg::philox`` (+ twins)    all                    raw Philox4x32-10 (known-answer tests)
===============================  =====================  ======================================

RNG state: each call takes ``rng``, an int64 tensor ``[seed, offset]`` on the input's device (see
``reference.py`` for the counter layout). :func:`make_rng` draws it from torch's generator of that
device, so ``torch.manual_seed`` reproduces a run, or builds ``[seed, 0]`` from an explicit seed.
The kernels read it themselves: no host sync, and backward regenerates the mask from it instead of
saving one — the only tensor saved for backward is ``rng`` (2 elements).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch

from . import _ext, reference
from ._checks import check_float_tensor, check_prob, check_seed

__all__ = [
    "BACKENDS",
    "set_backend",
    "get_backend",
    "use_backend",
    "resolve_backend",
    "available_backends",
    "make_rng",
    "fused_dropout",
    "dropout",
    "philox",
]

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


def make_rng(device, seed: Optional[int] = None) -> torch.Tensor:
    """The per-call RNG state ``[seed, offset]`` (int64, on ``device``).

    With ``seed=None`` both words are drawn from torch's generator of ``device`` (uniform int64)
    on the device itself, so no host sync and CUDA-graph replays draw fresh values; with an
    explicit seed the state is ``[seed, 0]``.
    """
    seed = check_seed(seed)
    if seed is None:
        return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device)
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------
# Registered ops: one per backend, each with a fake kernel and the same autograd formula.
# Dropout is linear in x with a mask fixed by rng, so d/dx applies the same op to the gradient:
# backward and double backward regenerate the mask and save only rng.
# ---------------------------------------------------------------------------------------------


def _dropout_fake(x: torch.Tensor, p: float, rng: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _register_dropout_autograd(op_name: str, op: Callable) -> None:
    def setup_context(ctx, inputs, output):
        _, p, rng = inputs
        ctx.p = p
        ctx.save_for_backward(rng)

    def backward(ctx, grad):
        (rng,) = ctx.saved_tensors
        return op(grad, ctx.p, rng), None, None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


@torch.library.custom_op("dropreg::dropout_reference", mutates_args=())
def _dropout_reference(x: torch.Tensor, p: float, rng: torch.Tensor) -> torch.Tensor:
    return reference.dropout(x, p, rng)


_dropout_reference.register_fake(_dropout_fake)
_register_dropout_autograd("dropreg::dropout_reference", torch.ops.dropreg.dropout_reference)


@torch.library.custom_op("dropreg::philox_reference", mutates_args=())
def _philox_reference(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    return reference.philox(counter, key)


@_philox_reference.register_fake
def _philox_fake(counter, key):
    return torch.empty((counter.shape[0], 4), dtype=torch.int64, device=counter.device)


_DROPOUT_OPS = {"reference": torch.ops.dropreg.dropout_reference}
_PHILOX_OPS = {"reference": torch.ops.dropreg.philox_reference}

if _ext.HAS_CPU:
    torch.library.register_fake("dropreg::dropout")(_dropout_fake)
    torch.library.register_fake("dropreg::dropout_")(lambda x, p, rng: None)
    torch.library.register_fake("dropreg::philox")(_philox_fake)
    _register_dropout_autograd("dropreg::dropout", torch.ops.dropreg.dropout)
    _DROPOUT_OPS["cpu"] = _DROPOUT_OPS["cuda"] = torch.ops.dropreg.dropout
    _PHILOX_OPS["cpu"] = _PHILOX_OPS["cuda"] = torch.ops.dropreg.philox

if _ext.HAS_TRITON:
    from .triton_kernels import dropout as _triton_dropout
    from .triton_kernels import philox as _triton_philox

    # triton_op lets torch.compile trace into the launcher. Under TRITON_INTERPRET=1, wrap_triton
    # hands back the bare interpreted kernel, which cannot run on fake tensors: there the ops are
    # registered as opaque custom ops (with the explicit fakes below) instead.
    _interpreted = os.environ.get("TRITON_INTERPRET") == "1" or not hasattr(torch.library, "triton_op")
    _triton_op = torch.library.custom_op if _interpreted else torch.library.triton_op

    @_triton_op("dropreg::dropout_triton", mutates_args=())
    def _dropout_triton(x: torch.Tensor, p: float, rng: torch.Tensor) -> torch.Tensor:
        return _triton_dropout.dropout(x, p, rng)

    @_triton_op("dropreg::philox_triton", mutates_args=())
    def _philox_triton(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return _triton_philox.philox(counter, key)

    _dropout_triton.register_fake(_dropout_fake)
    _philox_triton.register_fake(_philox_fake)
    _register_dropout_autograd("dropreg::dropout_triton", torch.ops.dropreg.dropout_triton)
    _DROPOUT_OPS["triton"] = torch.ops.dropreg.dropout_triton
    _PHILOX_OPS["triton"] = torch.ops.dropreg.philox_triton


def fused_dropout(
    x: torch.Tensor, p: float, rng: torch.Tensor, *, backend: Optional[str] = None
) -> torch.Tensor:
    """``m ⊙ x / (1 - p)`` with the mask m regenerated from ``rng`` by the Philox contract.

    Args:
        x: tensor of any shape, float64/float32/float16/bfloat16.
        p: drop probability in [0, 1].
        rng: int64 tensor ``[seed, offset]`` on x's device (see :func:`make_rng`).
        backend: override of the current backend for this call.

    Shape: output has x's shape (contiguous), dtype and device.
    """
    check_float_tensor(x, "x")
    p = check_prob(p, "p")
    return _DROPOUT_OPS[resolve_backend(x, backend)](x, p, rng)


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
    rng = make_rng(input.device, seed)
    backend = resolve_backend(input)
    if not inplace:
        return _DROPOUT_OPS[backend](input, p, rng)
    needs_graph = torch.is_grad_enabled() and input.requires_grad
    if backend in ("cpu", "cuda") and not needs_graph and input.is_contiguous():
        torch.ops.dropreg.dropout_(input, p, rng)
        return input
    return input.copy_(_DROPOUT_OPS[backend](input, p, rng))


def philox(counter: torch.Tensor, key: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Raw Philox4x32-10 (Random123): ``counter`` int64 (N, 4) and ``key`` int64 (N, 2) holding
    uint32 values; returns the four output words of each row, int64 (N, 4)."""
    for name, t, width in (("counter", counter, 4), ("key", key, 2)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 2 or t.shape[1] != width:
            raise TypeError(f"argument '{name}' must be an int64 tensor of shape (N, {width})")
    return _PHILOX_OPS[resolve_backend(counter, backend)](counter, key)
