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
from typing import Iterator, Optional

import torch

from . import _ext, reference
from ._checks import check_float_tensor, check_philox_args, check_prob, check_rng, check_seed

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
    "broadcast_dropout",
    "philox",
    "cross_entropy_sample",
    "ce_grad",
    "site_penalty",
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
    explicit seed the state is ``[seed, 0]``, written by fill kernels that take the seed as an
    argument (no host-to-device copy: no sync, and a CUDA graph can capture it; its replays then
    reuse that seed, as an explicit seed means).
    """
    seed = check_seed(seed)
    if seed is None:
        return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device)
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    rng[0].fill_(seed)
    return rng


# ---------------------------------------------------------------------------------------------
# Registered ops. Each op exists once per backend (C++ "dropreg::<op>" for cpu/cuda, Python
# "dropreg::<op>_triton" and "dropreg::<op>_reference"), with one fake kernel and one autograd
# formula shared by all backends; a backend's backward calls that backend's ops.
# ---------------------------------------------------------------------------------------------

Tensor = torch.Tensor
OP_NAMES = (
    "dropout",
    "philox",
    "cross_entropy_sample",
    "ce_grad",
    "ce_grad_backward",
    "site_penalty",
    "site_penalty_backward",
)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty() -> Tensor:
    return torch.empty(0)


_FAKES = {
    "dropout": lambda x, p, rng: torch.empty(x.shape, dtype=x.dtype, device=x.device),
    "philox": lambda c, k: torch.empty((c.shape[0], 4), dtype=torch.int64, device=c.device),
    "cross_entropy_sample": lambda z, t, rng, ii: (
        z.new_empty(z.shape[:1], dtype=_acc(z.dtype)),
        z.new_empty(z.shape[:1], dtype=_acc(z.dtype)),
        z.new_empty(z.shape[:1], dtype=torch.int64),
    ),
    "ce_grad": lambda z, lse, label, rs, ii: torch.empty(z.shape, dtype=z.dtype, device=z.device),
    "ce_grad_backward": lambda u, z, lse, label, rs, ii: (
        torch.empty(z.shape, dtype=z.dtype, device=z.device),
        rs.new_empty(rs.shape),
    ),
    "site_penalty": lambda h, ge, gi, q, noise, rng: h.new_empty((2,), dtype=_acc(h.dtype)),
    "site_penalty_backward": lambda grad, h, ge, gi, q, noise, rng: (
        torch.empty(h.shape, dtype=h.dtype, device=h.device),
        torch.empty(h.shape, dtype=ge.dtype, device=h.device) if ge is not None else h.new_empty((0,)),
        torch.empty(h.shape, dtype=gi.dtype, device=h.device) if gi is not None else h.new_empty((0,)),
    ),
}


def _check_dropout(x, p, rng) -> None:
    check_float_tensor(x, "x")
    check_prob(p, "p")
    check_rng(rng, x)


def _check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"argument 'ignore_index' must be an int, got {type(ignore_index).__name__}")


def _check_logits_rows(z, target_name: str, target, lse=None, row_scale=None, ignore_index: int = -100) -> None:
    check_float_tensor(z, "z")
    _check_ignore_index(ignore_index)
    if z.dim() != 2:
        raise ValueError(f"argument 'z' must be 2-D logits (N, C), got shape {tuple(z.shape)}")
    if z.shape[1] == 0 and z.shape[0] > 0:
        raise ValueError("argument 'z' must have at least one class (C >= 1)")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or target.shape != z.shape[:1]:
        raise TypeError(
            f"argument '{target_name}' must be an int64 tensor of shape ({z.shape[0]},), got "
            f"{getattr(target, 'dtype', type(target).__name__)} of shape {tuple(getattr(target, 'shape', ()))}"
        )
    acc = _acc(z.dtype)
    for name, t in (("lse", lse), ("row_scale", row_scale)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != acc or t.shape != z.shape[:1]):
            raise TypeError(f"argument '{name}' must be a {acc} tensor of shape ({z.shape[0]},)")


def _check_site(h, g_e, g_i, q, noise, rng) -> None:
    check_float_tensor(h, "h")
    for name, g in (("g_e", g_e), ("g_i", g_i)):
        if g is not None:
            check_float_tensor(g, name)
            if g.shape != h.shape or g.dtype != h.dtype:
                raise ValueError(
                    f"argument '{name}' must match h ({h.dtype} of shape {tuple(h.shape)}), "
                    f"got {g.dtype} of shape {tuple(g.shape)}"
                )
    if check_prob(q, "q") >= 1.0:
        raise ValueError("argument 'q' must be in [0, 1) for a site penalty, got 1.0")
    if noise not in reference.NOISE_KINDS:
        raise ValueError(f"argument 'noise' must be one of {reference.NOISE_KINDS}, got {noise!r}")
    check_rng(rng, h)


def _python_op_bodies(kernels) -> dict:
    """Typed bodies (the schema is inferred from the annotations) calling ``kernels``' functions."""

    # The argument checks the C++ ops make in their launchers (metadata only: no host sync); rng
    # is made contiguous because the kernels read its two words through a pointer.
    def dropout(x: Tensor, p: float, rng: Tensor) -> Tensor:
        _check_dropout(x, p, rng)
        return kernels.dropout(x, p, rng.contiguous())

    def philox(counter: Tensor, key: Tensor) -> Tensor:
        check_philox_args(counter, key)
        return kernels.philox(counter, key)

    def cross_entropy_sample(
        z: Tensor, target: Tensor, rng: Tensor, ignore_index: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        _check_logits_rows(z, "target", target, ignore_index=ignore_index)
        check_rng(rng, z)
        return tuple(kernels.cross_entropy_sample(z, target, rng.contiguous(), ignore_index))

    def ce_grad(z: Tensor, lse: Tensor, label: Tensor, row_scale: Tensor, ignore_index: int) -> Tensor:
        _check_logits_rows(z, "label", label, lse, row_scale, ignore_index)
        return kernels.ce_grad(z, lse, label, row_scale, ignore_index)

    def ce_grad_backward(
        u: Tensor, z: Tensor, lse: Tensor, label: Tensor, row_scale: Tensor, ignore_index: int
    ) -> tuple[Tensor, Tensor]:
        _check_logits_rows(z, "label", label, lse, row_scale, ignore_index)
        if not isinstance(u, torch.Tensor) or u.shape != z.shape or u.dtype != z.dtype:
            raise ValueError(f"argument 'u' must match z ({z.dtype} of shape {tuple(z.shape)})")
        return tuple(kernels.ce_grad_backward(u, z, lse, label, row_scale, ignore_index))

    def site_penalty(
        h: Tensor, g_e: Optional[Tensor], g_i: Optional[Tensor], q: float, noise: str, rng: Tensor
    ) -> Tensor:
        _check_site(h, g_e, g_i, q, noise, rng)
        return kernels.site_penalty(h, g_e, g_i, q, noise, rng.contiguous())

    def site_penalty_backward(
        grad: Tensor, h: Tensor, g_e: Optional[Tensor], g_i: Optional[Tensor], q: float, noise: str, rng: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        _check_site(h, g_e, g_i, q, noise, rng)
        if not isinstance(grad, torch.Tensor) or grad.shape != (2,) or grad.dtype != _acc(h.dtype):
            raise ValueError(f"argument 'grad' must be a {_acc(h.dtype)} tensor of shape (2,)")
        dh, dge, dgi = kernels.site_penalty_backward(grad, h, g_e, g_i, q, noise, rng.contiguous())
        return (dh, dge if dge is not None else h.new_empty((0,)), dgi if dgi is not None else h.new_empty((0,)))

    return {name: fn for name, fn in locals().items() if name in OP_NAMES}


def _none_if_empty(t: Tensor, like: Optional[Tensor]) -> Optional[Tensor]:
    return None if like is None else t


def _register_autograd(qualname: str, name: str, ops: dict) -> None:
    """The autograd formula of op ``name``; ``ops`` maps op names to this backend's ops."""

    if name == "dropout":
        # Linear in x with a mask fixed by rng: backward applies the same op (mask regenerated).
        def setup_context(ctx, inputs, output):
            ctx.p = inputs[1]
            ctx.save_for_backward(inputs[2])

        def backward(ctx, grad):
            (rng,) = ctx.saved_tensors
            return ops["dropout"](grad, ctx.p, rng), None, None

    elif name == "cross_entropy_sample":
        # d loss_r / d z_r = softmax(z_r) - onehot(y_r) = ce_grad row; d lse / d z = softmax(z).
        def setup_context(ctx, inputs, output):
            z, target, _, ignore_index = inputs
            ctx.ignore_index = ignore_index
            # An unused output's gradient stays None instead of zeros: no pass over the logits for it.
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(z, target, output[1])

        def backward(ctx, grad_loss, grad_lse, _grad_yhat):
            z, target, lse = ctx.saved_tensors
            grad_z = None
            if grad_loss is not None:
                grad_z = ops["ce_grad"](z, lse, target, grad_loss.to(lse.dtype), ctx.ignore_index)
            if grad_lse is not None:
                from_lse = (grad_lse[:, None] * torch.exp(z.to(lse.dtype) - lse[:, None])).to(z.dtype)
                grad_z = from_lse if grad_z is None else grad_z + from_lse
            return grad_z, None, None, None

    elif name == "ce_grad":
        # lse is an input for speed, but ce_grad is a function of z alone (lse = logsumexp(z)).
        def setup_context(ctx, inputs, output):
            z, lse, label, row_scale, ignore_index = inputs
            ctx.ignore_index = ignore_index
            ctx.save_for_backward(z, lse, label, row_scale)

        def backward(ctx, u):
            z, lse, label, row_scale = ctx.saved_tensors
            grad_z, grad_scale = ops["ce_grad_backward"](u, z, lse, label, row_scale, ctx.ignore_index)
            return grad_z, None, None, grad_scale, None

    elif name == "ce_grad_backward":
        # Third-order derivatives: composite PyTorch (softmax recomputed from z, so exact).
        def setup_context(ctx, inputs, output):
            u, z, lse, label, row_scale, ignore_index = inputs
            ctx.ignore_index = ignore_index
            ctx.save_for_backward(u, z, label, row_scale)

        def backward(ctx, grad_gz, grad_gs):
            u, z, label, row_scale = ctx.saved_tensors
            with torch.enable_grad():
                u_, z_, rs_ = (t.detach().requires_grad_() for t in (u, z, row_scale))
                lse_ = torch.logsumexp(z_.to(_acc(z.dtype)), dim=-1)
                outs = reference.ce_grad_backward_unchecked(u_, z_, lse_, label, rs_, ctx.ignore_index)
                gu, gz, gs = torch.autograd.grad(
                    outs, (u_, z_, rs_), (grad_gz, grad_gs), create_graph=torch.is_grad_enabled(), allow_unused=True
                )
            return gu, gz, None, None, gs, None

    elif name == "site_penalty":
        def setup_context(ctx, inputs, output):
            h, g_e, g_i, q, noise, rng = inputs
            ctx.q, ctx.noise = q, noise
            ctx.save_for_backward(h, g_e, g_i, rng)

        def backward(ctx, grad):
            h, g_e, g_i, rng = ctx.saved_tensors
            dh, dge, dgi = ops["site_penalty_backward"](grad.contiguous(), h, g_e, g_i, ctx.q, ctx.noise, rng)
            return dh, _none_if_empty(dge, g_e), _none_if_empty(dgi, g_i), None, None, None

    elif name == "site_penalty_backward":
        # Only needed for third-order derivatives: composite PyTorch around the reference.
        def setup_context(ctx, inputs, output):
            grad, h, g_e, g_i, q, noise, rng = inputs
            ctx.q, ctx.noise = q, noise
            ctx.save_for_backward(grad, h, g_e, g_i, rng)

        def backward(ctx, ddh, ddge, ddgi):
            grad, h, g_e, g_i, rng = ctx.saved_tensors
            leaves = [t.detach().requires_grad_() if t is not None else None for t in (grad, h, g_e, g_i)]
            with torch.enable_grad():
                outs = reference.site_penalty_backward(*leaves, ctx.q, ctx.noise, rng)
                pairs = [(o, c) for o, c in zip(outs, (ddh, ddge, ddgi)) if o is not None and c is not None]
                wrt = [t for t in leaves if t is not None]
                got = torch.autograd.grad(
                    [o for o, _ in pairs], wrt, [c for _, c in pairs],
                    create_graph=torch.is_grad_enabled(), allow_unused=True,
                )
            it = iter(got)
            grads = [next(it) if t is not None else None for t in leaves]
            return (*grads, None, None, None)

    else:  # philox: integer outputs, nothing to differentiate
        return
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def _register_backend(backend: str, qualnames: dict) -> dict:
    """Fakes and autograd for one backend's ops; returns {op name: callable op}."""
    ops = {name: getattr(torch.ops.dropreg, qn.split("::")[1]) for name, qn in qualnames.items()}
    for name, qualname in qualnames.items():
        _register_autograd(qualname, name, ops)
    return ops


def _define_python_backend(backend: str, kernels, define) -> dict:
    qualnames = {}
    for name, body in _python_op_bodies(kernels).items():
        qualname = f"dropreg::{name}_{backend}"
        define(qualname, mutates_args=())(body).register_fake(_FAKES[name])
        qualnames[name] = qualname
    return _register_backend(backend, qualnames)


# backend -> {op name -> op}
BACKEND_OPS = {"reference": _define_python_backend("reference", reference, torch.library.custom_op)}

if _ext.HAS_CPU:
    _cpp = {name: f"dropreg::{name}" for name in OP_NAMES}
    for _name, _qualname in _cpp.items():
        torch.library.register_fake(_qualname)(_FAKES[_name])
    torch.library.register_fake("dropreg::dropout_")(lambda x, p, rng: None)
    BACKEND_OPS["cpu"] = BACKEND_OPS["cuda"] = _register_backend("cpu", _cpp)

if _ext.HAS_TRITON:
    from .triton_kernels import cross_entropy as _tk_ce
    from .triton_kernels import dropout as _tk_dropout
    from .triton_kernels import philox as _tk_philox
    from .triton_kernels import site_penalty as _tk_site

    class _TritonKernels:
        dropout = staticmethod(_tk_dropout.dropout)
        philox = staticmethod(_tk_philox.philox)
        cross_entropy_sample = staticmethod(_tk_ce.cross_entropy_sample)
        ce_grad = staticmethod(_tk_ce.ce_grad)
        ce_grad_backward = staticmethod(_tk_ce.ce_grad_backward)
        site_penalty = staticmethod(_tk_site.site_penalty)
        site_penalty_backward = staticmethod(_tk_site.site_penalty_backward)

    # triton_op lets torch.compile trace into the launchers. Under TRITON_INTERPRET=1, wrap_triton
    # hands back the bare interpreted kernel, which cannot run on fake tensors: there the ops are
    # registered as opaque custom ops (with the explicit fakes) instead.
    _interpreted = os.environ.get("TRITON_INTERPRET") == "1" or not hasattr(torch.library, "triton_op")
    _define = torch.library.custom_op if _interpreted else torch.library.triton_op
    BACKEND_OPS["triton"] = _define_python_backend("triton", _TritonKernels, _define)

_DROPOUT_OPS = {b: ops["dropout"] for b, ops in BACKEND_OPS.items()}


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
    _check_dropout(x, p, rng)
    return _DROPOUT_OPS[resolve_backend(x, backend)](x, float(p), rng)


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
        # The kernel wrote through the data pointer: bump the version counter so autograd
        # rejects graphs that saved the old values (as it does for torch's in-place dropout).
        torch.autograd.graph.increment_version(input)
        return input
    return input.copy_(_DROPOUT_OPS[backend](input, p, rng))


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
    :func:`fused_dropout` on a tensor of ones: the mask follows the same Philox contract (element j
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
    mask = fused_dropout(ones, p, make_rng(input.device, seed))
    return input.mul_(mask) if inplace else input * mask


def philox(counter: torch.Tensor, key: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Raw Philox4x32-10 (Random123): ``counter`` int64 (N, 4) and ``key`` int64 (N, 2) holding
    uint32 values; returns the four output words of each row, int64 (N, 4)."""
    check_philox_args(counter, key)
    return BACKEND_OPS[resolve_backend(counter, backend)]["philox"](counter, key)


def cross_entropy_sample(
    z: Tensor, target: Tensor, rng: Tensor, ignore_index: int = -100, *, backend: Optional[str] = None
) -> tuple:
    """Cross-entropy, log-sum-exp and a label sampled from the model's own softmax, in one pass.

    For each row r of the logits z (N, C):
        lse_r = log Σ_c exp(z_rc),  loss_r = lse_r - z_r[y_r],
        ŷ_r = argmax_c (z_rc + G_rc) ~ softmax(z_r)   (Gumbel-max; G from the Philox Gumbel stream)
    Rows whose target is ``ignore_index`` get loss 0 and ŷ = ignore_index. ``loss`` and ``lse`` are
    differentiable in z (d loss_r/d z_r = softmax(z_r) - onehot(y_r)); the draw is not.

    Shapes: z (N, C) float64/float32/float16/bfloat16; target (N,) int64; returns loss (N,),
    lse (N,) in float32 (float64 for float64 z) and yhat (N,) int64.
    """
    _check_logits_rows(z, "target", target, ignore_index=ignore_index)
    check_rng(rng, z)
    return BACKEND_OPS[resolve_backend(z, backend)]["cross_entropy_sample"](z, target, rng, ignore_index)


def ce_grad(
    z: Tensor,
    lse: Tensor,
    label: Tensor,
    row_scale: Tensor,
    ignore_index: int = -100,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """G = row_scale ⊙ (softmax(z) - onehot(label)): the gradient of Σ_r row_scale_r · CE(z_r, label_r).

    One pass over z; ``lse`` must be logsumexp(z) (from :func:`cross_entropy_sample`). Differentiable
    in z and row_scale with the backward ``u ↦ row_scale ⊙ p ⊙ (u - ⟨p, u⟩)`` (the softmax Jacobian
    is symmetric), so it can sit inside ``create_graph=True`` graphs. Rows with label ==
    ignore_index are 0.

    Shapes: z (N, C); lse, row_scale (N,) float32 (float64 for float64 z); label (N,) int64;
    returns (N, C) in z's dtype.
    """
    _check_logits_rows(z, "label", label, lse, row_scale, ignore_index)
    return BACKEND_OPS[resolve_backend(z, backend)]["ce_grad"](z, lse, label, row_scale, ignore_index)


def site_penalty(
    h: Tensor,
    g_e: Optional[Tensor],
    g_i: Optional[Tensor],
    q: float,
    noise: str,
    rng: Tensor,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """[Σ (g_e ⊙ h)², Σ g_i ⊙ η ⊙ h] in one pass, with η drawn in-kernel and a deterministic reduction.

    η has mean 0 and variance q/(1-q): ``noise="rademacher"`` gives ±sqrt(q/(1-q)), ``"dropout"``
    gives m/(1-q) - 1 with m ~ Bernoulli(1-q). A missing (None) g_e or g_i contributes 0. The
    backward is elementwise and regenerates η from ``rng``:
    dh = 2a·g_e²·h + b·g_i·η, dg_e = 2a·g_e·h², dg_i = b·η·h for output gradient [a, b].

    Shapes: h, g_e, g_i share one shape; returns (2,) float32 (float64 for float64 h).
    """
    _check_site(h, g_e, g_i, q, noise, rng)
    q = float(q)
    return BACKEND_OPS[resolve_backend(h, backend)]["site_penalty"](h, g_e, g_i, q, noise, rng)
