"""The fused ops: one registered ``torch.library`` op per backend, and their public wrappers.

Every op exists once per backend, so ``torch.compile`` traces it without graph breaks and
``torch.library.opcheck`` can test it: ``dropreg::<op>`` (C++, the ``cpu`` and ``cuda`` backends,
schemas in ``csrc/ops.cpp``), ``dropreg::<op>_triton`` (``triton_kernels/<file>.py``, a
``triton_op`` where the kernels compile, a plain custom op under ``TRITON_INTERPRET=1``) and
``dropreg::<op>_reference`` (``reference.py``):

=============================  ==============================================  =======================
op                             computes                                        kernels (C++ / Triton)
=============================  ==============================================  =======================
``dropout``                    m ⊙ x / (1 - p), m from the Philox mask stream  ``dropout.cpp/.cu/.py``
``dropout_`` (C++ only)        the same, written into x                        ``dropout.cpp/.cu``
``dropout_indexed``            the same, mask at an affine index (DTensor)     ``dropout_indexed.*``
``philox``                     raw Philox4x32-10 (known-answer tests)          ``philox.cpp/.cu/.py``
``cross_entropy_sample``       loss, log-sum-exp, ŷ ~ softmax(z) in one pass   ``cross_entropy.*``
``cross_entropy_sample_grad``  the same and G = softmax(z) - onehot(ŷ)         ``cross_entropy.*``
``..._grad_backward``          the gradient in z of all of its outputs         ``cross_entropy.*``
``ce_grad``                    row_scale ⊙ (softmax(z) - onehot(label))        ``cross_entropy.*``
``ce_grad_backward``           its VJP (for create_graph graphs)               ``cross_entropy.*``
``site_penalty``               [Σ (g_e ⊙ h)², Σ g_i ⊙ η ⊙ h]                   ``site_penalty.*``
``site_penalty_backward``      its gradients (η regenerated)                   ``site_penalty.*``
=============================  ==============================================  =======================

Each op has one section below with everything Python knows about it: the signature of the Python
backends' ops (``torch.library`` infers their schema from its annotations: they register without the
C++ extension, so the schema is written twice, and ``tests/test_build.py`` holds the two equal), the
fake kernel, the argument checks, the autograd formula (written with the same backend's ops, so a
backward runs on the backend of its forward) and the public wrapper; one loop at the end registers
them for every backend. Adding an op: one section here, its kernels, a schema in ``csrc/ops.cpp``.

Checks: one function per op, read metadata only (no host sync). Every registered op checks its
arguments itself: the C++ ops in their own layer (``csrc/checks.cpp``, shared by the CPU and CUDA
kernels), a Python backend's op by running the Python check in its body; the launchers check
nothing. So the public wrapper calls the op straight away (each argument checked once per call),
and runs the Python check only when the op raised, to replace the op's error by the argument's own
(a list passed as a tensor is named, not reported by the schema parser); while torch.compile
traces, where the ops run their fake kernels, it checks first.

RNG state: each call takes ``rng``, an int64 tensor ``[seed, offset]`` on the input's device (the
counter layout is in ``reference.py``), or draws one itself (``<op>_draw``, the wrappers' rng=None).
:func:`make_rng` draws it from torch's generator of that device, so ``torch.manual_seed`` reproduces
a run, or builds ``[seed, 0]`` from an explicit seed.
The kernels read it themselves: no host sync, and backward regenerates the mask from it instead of
saving one: the only tensor saved for dropout's backward is ``rng`` (2 elements).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional

import torch

from . import _ext, reference
from ._checks import check_float_tensor, check_philox_args, check_prob, check_rng, check_seed
from .backends import (  # noqa: F401  (re-exported: dr.ops is the low-level namespace)
    BACKENDS,
    available_backends,
    get_backend,
    resolve_backend,
    set_backend,
    use_backend,
)
from .reference import acc_dtype

__all__ = [
    "BACKENDS",
    "set_backend",
    "get_backend",
    "use_backend",
    "resolve_backend",
    "available_backends",
    "make_rng",
    "fused_dropout",
    "dropout_indexed",
    "philox",
    "cross_entropy_sample",
    "cross_entropy_sample_grad",
    "ce_grad",
    "site_penalty",
    "BACKEND_OPS",
]

Tensor = torch.Tensor


def make_rng(device, seed: Optional[int] = None) -> torch.Tensor:
    """The per-call RNG state ``[seed, offset]`` (int64, on ``device``), as the ``*_draw`` ops draw it.

    With ``seed=None`` the state comes from torch's generator of ``device``, so ``torch.manual_seed``
    reproduces a run; with an explicit seed it is ``[seed, 0]``. Where the C++ kernels run the
    device (``dropreg::rng_state``): two words of the CPU generator, or on a GPU ``[seed, offset]``
    of the CUDA generator's Philox state, reserved on the host and written by one kernel
    (graph-safe: a captured graph's replays draw fresh states); elsewhere both words are drawn with
    ``torch.randint`` on the device, or an explicit seed is written by fill kernels. Never a host
    sync or a host-to-device copy.
    """
    return _rng_state(torch.device(device), check_seed(seed))


def _rng_state(device: torch.device, seed: Optional[int]) -> torch.Tensor:
    """:func:`make_rng` for a checked seed (None, or the int64 with the seed's bits)."""
    if _native_kernels(device):
        return torch.ops.dropreg.rng_state.default(torch.empty(0, device=device), seed)
    if seed is None:
        return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device)
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    rng[0].fill_(seed)
    return rng


def _native_kernels(device: torch.device) -> bool:
    """True if the C++ kernels run tensors of ``device`` (the cpu / cuda backends)."""
    return (device.type == "cpu" and _ext.HAS_CPU) or (device.type == "cuda" and _ext.HAS_CUDA)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What Python knows about one op (see the module docstring)."""

    name: str
    signature: Callable  # the Python backends' op, typed (the body is unused)
    fake: Callable
    check: Callable  # the op's arguments -> None, or a clear exception naming the argument
    autograd: Optional[Callable] = None  # backend ops -> (setup_context, backward)
    to_schema: Callable = lambda out, *args: out  # kernel outputs -> the schema's outputs


SPECS: dict = {}


def _spec(**fields) -> OpSpec:
    spec = OpSpec(**fields)
    SPECS[spec.name] = spec
    return spec


# Filled by the registration loop at the end: backend -> {op name -> registered op}.
BACKEND_OPS: dict = {}
NATIVE_BACKENDS = ("cpu", "cuda")  # the C++ ops
# The C++ draw ops' entry points from Python, by base op: those csrc/entry.cpp defines.
ENTRIES: dict = {}


def _call(name: str, backend: Optional[str], *args):
    """The registered op ``name`` on the backend that runs it for its first argument; an op's ``rng``
    of None draws a fresh state (its ``_draw`` form, :func:`_draw`). Arguments are checked by the op
    (module docstring); the Python check names a bad argument where the op raised."""
    if _is_compiling():
        SPECS[name].check(*args)
    try:
        on = resolve_backend(args[0], backend)
        i = DRAWS.get(name)
        if i is None or args[i] is not None:
            return BACKEND_OPS[on][name](*args)
        return _draw(name, on, (*args[:i], *args[i + 1:], None))
    except Exception:
        SPECS[name].check(*args)
        raise


def _draw(name: str, backend: str, args: tuple):
    """``<name>_draw(*args)`` on ``backend`` without the state it drew; a single output as that tensor.
    On the C++ backends the call takes the op's entry point in ``_C`` (csrc/entry.cpp: the same
    dispatcher call, without a torch.ops call's boxing; cross_entropy_sample_grad's leaves out the
    empty G_true when true_scale is None), except where Python must see the registered op: an
    argument or mode with ``__torch_function__``, or torch.compile tracing."""
    entry = ENTRIES.get(name) if backend in NATIVE_BACKENDS else None
    if entry is not None and not _has_torch_function(args) and not _is_compiling():
        return entry(*args)
    out = BACKEND_OPS[backend][f"{name}_draw"](*args)[:-1]
    return out[0] if len(out) == 1 else out


_is_compiling = torch.compiler.is_compiling
_has_torch_function = torch._C._has_torch_function


def _empty_like_shape(t: Tensor, dtype=None) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype if dtype is None else dtype, device=t.device)


def _composite_autograd(formula: Callable, lse_index: Optional[int], wrt: tuple) -> tuple:
    """Autograd of a backward op (third-order derivatives), every backend: the VJP of its reference
    ``formula`` by autograd at the saved inputs, so that every higher order works too. ``formula``
    takes the op's arguments without the one at ``lse_index`` (a log-sum-exp it recomputes from z,
    so that its dependence on z is differentiated); ``wrt`` are the positions of the differentiable
    arguments (an optional one may be None)."""

    def setup_context(ctx, inputs, output):
        ctx.tensor_at = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_at))

    def backward(ctx, *cotangents):
        inputs = list(ctx.others)
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
            inputs[i] = t
        leaves = {i: inputs[i].detach().requires_grad_() for i in wrt if inputs[i] is not None}
        inputs = [leaves.get(i, a) for i, a in enumerate(inputs)]
        with torch.enable_grad():
            outs = formula(*(a for i, a in enumerate(inputs) if i != lse_index))
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = [(o, c) for o, c in zip(outs, cotangents) if o is not None and c is not None]
            got = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()), [c for _, c in pairs],
                                      create_graph=torch.is_grad_enabled(), allow_unused=True)
        grads = dict(zip(leaves, got))
        return tuple(grads.get(i) for i in range(len(inputs)))

    return setup_context, backward


# ---------------------------------------------------------------------------------------------
# dropout: y = m ⊙ x / (1 - p)
# ---------------------------------------------------------------------------------------------


def _sig_dropout(x: Tensor, p: float, rng: Tensor) -> Tensor:
    """Signature of ``dropreg::dropout_<backend>``."""


def _check_dropout(x, p, rng) -> None:
    check_float_tensor(x, "x")
    check_prob(p, "p")
    if rng is not None:
        check_rng(rng, x)


def _dropout_autograd(ops: dict) -> tuple:
    # Linear in x with a mask fixed by rng: backward applies the same op (mask regenerated).
    def setup_context(ctx, inputs, output):
        ctx.p = inputs[1]
        ctx.save_for_backward(inputs[2])

    def backward(ctx, grad):
        (rng,) = ctx.saved_tensors
        return ops["dropout"](grad, ctx.p, rng), None, None

    return setup_context, backward


_spec(
    name="dropout",
    signature=_sig_dropout,
    fake=lambda x, p, rng: torch.empty_like(x),
    check=_check_dropout,
    autograd=_dropout_autograd,
)


def fused_dropout(x: Tensor, p: float, rng: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``m ⊙ x / (1 - p)`` with the mask m regenerated from ``rng`` by the Philox contract.

    Args:
        x: tensor of any shape, float64/float32/float16/bfloat16.
        p: drop probability in [0, 1].
        rng: int64 tensor ``[seed, offset]`` on x's device (see :func:`make_rng`).
        backend: override of the current backend for this call.

    Shape: output has x's shape, dtype, device and memory layout (as ``torch.empty_like(x)``: dense
    inputs keep their strides, e.g. channels_last); the mask is keyed by the logical index.
    """
    return _call("dropout", backend, x, check_prob(p, "p"), rng)


# ---------------------------------------------------------------------------------------------
# dropout_indexed: the same with the mask at an affine logical index (a shard's share of a whole mask)
# ---------------------------------------------------------------------------------------------


def _sig_dropout_indexed(x: Tensor, p: float, rng: Tensor, index_strides: list[int], index_base: int) -> Tensor:
    """Signature of ``dropreg::dropout_indexed_<backend>``."""


def _check_dropout_indexed(x, p, rng, index_strides, index_base) -> None:
    _check_dropout(x, p, rng)
    if not isinstance(index_strides, (list, tuple)) or len(index_strides) != x.dim() or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in index_strides
    ):
        raise ValueError(
            f"argument 'index_strides' must be {x.dim()} ints >= 0 (one per dim of x), got {index_strides!r}"
        )
    if isinstance(index_base, bool) or not isinstance(index_base, int) or index_base < 0:
        raise ValueError(f"argument 'index_base' must be an int >= 0, got {index_base!r}")
    largest = index_base + sum((n - 1) * s for n, s in zip(x.shape, index_strides)) if x.numel() else 0
    if largest >= 2**63:
        raise ValueError(f"arguments 'index_strides' {list(index_strides)} and 'index_base' {index_base} give indices "
                         f"of 2^63 or more for x of shape {tuple(x.shape)}")


def _dropout_indexed_autograd(ops: dict) -> tuple:
    # Linear in x with a mask fixed by rng and the index map, as dropout.
    def setup_context(ctx, inputs, output):
        ctx.p, ctx.index_strides, ctx.index_base = inputs[1], inputs[3], inputs[4]
        ctx.save_for_backward(inputs[2])

    def backward(ctx, grad):
        (rng,) = ctx.saved_tensors
        return ops["dropout_indexed"](grad, ctx.p, rng, ctx.index_strides, ctx.index_base), None, None, None, None

    return setup_context, backward


_spec(
    name="dropout_indexed",
    signature=_sig_dropout_indexed,
    fake=lambda x, p, rng, index_strides, index_base: torch.empty_like(x),
    check=_check_dropout_indexed,
    autograd=_dropout_indexed_autograd,
)


def dropout_indexed(x: Tensor, p: float, rng: Optional[Tensor], index_strides: list, index_base: int, *,
                    backend: Optional[str] = None) -> Tensor:
    """:func:`fused_dropout` with the mask read at the logical index ``index_base + Σ_k i_k·index_strides[k]``
    of the element at position (i_0, .., i_{n-1}) instead of its own row-major index.

    For x the box [offset, offset + x.shape) of a row-major tensor of shape G (a shard of a sharded
    tensor), ``index_strides`` = G's row-major strides and ``index_base`` = Σ_k offset_k·index_strides[k]
    give every element the mask the whole tensor gives it; that is how :func:`dropreg_ext.functional.dropout`
    drops a DTensor. ``rng=None`` draws a fresh state in the op.

    Args:
        x: tensor of any shape, float64/float32/float16/bfloat16.
        p: drop probability in [0, 1].
        rng: int64 ``[seed, offset]`` on x's device, or None.
        index_strides: one int >= 0 per dim of x.
        index_base: int >= 0; every index must stay below 2^63.
    """
    return _call("dropout_indexed", backend, x, check_prob(p, "p"), rng, list(index_strides), index_base)


# ---------------------------------------------------------------------------------------------
# philox: raw Philox4x32-10
# ---------------------------------------------------------------------------------------------


def _sig_philox(counter: Tensor, key: Tensor) -> Tensor:
    """Raw Philox4x32-10 (Random123): ``counter`` int64 (N, 4) and ``key`` int64 (N, 2) holding
    uint32 values; returns the four output words of each row, int64 (N, 4)."""


_spec(
    name="philox",
    signature=_sig_philox,
    check=check_philox_args,
    fake=lambda c, k: torch.empty((c.shape[0], 4), dtype=torch.int64, device=c.device),
)


def philox(counter: Tensor, key: Tensor, *, backend: Optional[str] = None) -> Tensor:
    return _call("philox", backend, counter, key)


# ---------------------------------------------------------------------------------------------
# cross_entropy_sample, ce_grad, ce_grad_backward: cross-entropy with a sampled label
# ---------------------------------------------------------------------------------------------


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
    if target.device != z.device:
        raise ValueError(f"argument '{target_name}' must be on the device of 'z' ({z.device}), got {target.device}")
    _check_row_values(z, "lse", lse)
    _check_row_values(z, "row_scale", row_scale)


def _check_row_values(z, name: str, t) -> None:
    """``t`` None, or per-row values (N,) in z's accumulation dtype on z's device."""
    acc = acc_dtype(z.dtype)
    if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != acc or t.shape != z.shape[:1]):
        raise TypeError(f"argument '{name}' must be a {acc} tensor of shape ({z.shape[0]},)")
    if t is not None and t.device != z.device:
        raise ValueError(f"argument '{name}' must be on the device of 'z' ({z.device}), got {t.device}")


def _sig_cross_entropy_sample(
    z: Tensor, target: Tensor, rng: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Signature of ``dropreg::cross_entropy_sample_<backend>``."""


def _check_cross_entropy_sample(z, target, rng, ignore_index) -> None:
    _check_logits_rows(z, "target", target, ignore_index=ignore_index)
    if rng is not None:
        check_rng(rng, z)


def _cross_entropy_sample_fake(z, target, rng, ignore_index):
    acc = acc_dtype(z.dtype)
    return z.new_empty(z.shape[:1], dtype=acc), z.new_empty(z.shape[:1], dtype=acc), \
        z.new_empty(z.shape[:1], dtype=torch.int64)


def _loss_lse_grad(ops: dict, z, target, lse, grad_loss, grad_lse, ignore_index):
    """The gradient in z of ⟨grad_loss, loss⟩ + ⟨grad_lse, lse⟩ (None if both are None):
    d loss_r / d z_r = softmax(z_r) - onehot(y_r) = a ce_grad row; d lse / d z = softmax(z)."""
    grad_z = None
    if grad_loss is not None:
        grad_z = ops["ce_grad"](z, lse, target, grad_loss.to(lse.dtype), ignore_index)
    if grad_lse is not None:
        from_lse = (grad_lse[:, None] * torch.exp(z.to(lse.dtype) - lse[:, None])).to(z.dtype)
        grad_z = from_lse if grad_z is None else grad_z + from_lse
    return grad_z


def _cross_entropy_sample_autograd(ops: dict) -> tuple:
    def setup_context(ctx, inputs, output):
        z, target, _, ignore_index = inputs
        ctx.ignore_index = ignore_index
        # An unused output's gradient stays None instead of zeros: no pass over the logits for it.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, target, output[1])

    def backward(ctx, grad_loss, grad_lse, _grad_yhat):
        z, target, lse = ctx.saved_tensors
        return _loss_lse_grad(ops, z, target, lse, grad_loss, grad_lse, ctx.ignore_index), None, None, None

    return setup_context, backward


_spec(
    name="cross_entropy_sample",
    signature=_sig_cross_entropy_sample,
    fake=_cross_entropy_sample_fake,
    check=_check_cross_entropy_sample,
    autograd=_cross_entropy_sample_autograd,
    to_schema=lambda out, *args: tuple(out),
)


def cross_entropy_sample(
    z: Tensor, target: Tensor, rng: Optional[Tensor] = None, ignore_index: int = -100, *,
    backend: Optional[str] = None,
) -> tuple:
    """Cross-entropy, log-sum-exp and a label sampled from the model's own softmax, in one pass.

    For each row r of the logits z (N, C):
        lse_r = log Σ_c exp(z_rc),  loss_r = lse_r - z_r[y_r],
        ŷ_r = argmax_c (z_rc + G_rc) ~ softmax(z_r)   (Gumbel-max; G from the Philox Gumbel stream)
    Rows whose target is ``ignore_index`` get loss 0 and ŷ = ignore_index. ``loss`` and ``lse`` are
    differentiable in z (d loss_r/d z_r = softmax(z_r) - onehot(y_r)); the draw is not. G is drawn
    at ``rng`` (``[seed, offset]``, :func:`make_rng`), or at a fresh state of torch's generator when
    ``rng`` is None (the same as ``make_rng(z.device)``, in the op itself: one launch on a GPU).

    Shapes: z (N, C) float64/float32/float16/bfloat16; target (N,) int64; returns loss (N,),
    lse (N,) in float32 (float64 for float64 z) and yhat (N,) int64.
    """
    return _call("cross_entropy_sample", backend, z, target, rng, ignore_index)


def _sig_ce_grad(z: Tensor, lse: Tensor, label: Tensor, row_scale: Tensor, ignore_index: int) -> Tensor:
    """Signature of ``dropreg::ce_grad_<backend>``."""


def _check_ce_grad(z, lse, label, row_scale, ignore_index) -> None:
    _check_logits_rows(z, "label", label, lse, row_scale, ignore_index)


def _ce_grad_autograd(ops: dict) -> tuple:
    # lse is an input for speed, but ce_grad is a function of z alone (lse = logsumexp(z)).
    def setup_context(ctx, inputs, output):
        z, lse, label, row_scale, ignore_index = inputs
        ctx.ignore_index = ignore_index
        ctx.save_for_backward(z, lse, label, row_scale)

    def backward(ctx, u):
        z, lse, label, row_scale = ctx.saved_tensors
        grad_z, grad_scale = ops["ce_grad_backward"](u, z, lse, label, row_scale, ctx.ignore_index)
        return grad_z, None, None, grad_scale, None

    return setup_context, backward


_spec(
    name="ce_grad",
    signature=_sig_ce_grad,
    fake=lambda z, lse, label, rs, ii: _empty_like_shape(z),
    check=_check_ce_grad,
    autograd=_ce_grad_autograd,
)


def ce_grad(
    z: Tensor, lse: Tensor, label: Tensor, row_scale: Tensor, ignore_index: int = -100, *,
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
    return _call("ce_grad", backend, z, lse, label, row_scale, ignore_index)


def _sig_cross_entropy_sample_grad(
    z: Tensor, target: Tensor, rng: Tensor, ignore_index: int, true_scale: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Signature of ``dropreg::cross_entropy_sample_grad_<backend>``; G_true is an empty (0,) tensor
    when true_scale is None."""


def _check_true_scale(z, true_scale) -> None:
    _check_row_values(z, "true_scale", true_scale)
    if true_scale is not None and true_scale.requires_grad:
        raise ValueError("argument 'true_scale' is taken as a constant: it must not require grad")


def _check_cross_entropy_sample_grad(z, target, rng, ignore_index, true_scale=None) -> None:
    _check_cross_entropy_sample(z, target, rng, ignore_index)
    _check_true_scale(z, true_scale)


def _cross_entropy_sample_grad_fake(z, target, rng, ignore_index, true_scale=None):
    grad_true = _empty_like_shape(z) if true_scale is not None else z.new_empty((0,))
    return (*_cross_entropy_sample_fake(z, target, rng, ignore_index), _empty_like_shape(z), grad_true)


def _cross_entropy_sample_grad_autograd(ops: dict) -> tuple:
    # G = ce_grad(z, lse, ŷ, 1) and G_true = ce_grad(z, lse, y, true_scale), ŷ fixed by the draw:
    # one backward op for every output's cotangent (cross_entropy_sample_grad_backward).
    def setup_context(ctx, inputs, output):
        z, target, _, ignore_index, *rest = inputs
        true_scale = rest[0] if rest else None
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, target, output[1], true_scale)

    def backward(ctx, grad_loss, grad_lse, _grad_yhat, grad_g, grad_g_true):
        z, target, lse, true_scale = ctx.saved_tensors
        if true_scale is None:  # G_true was the empty placeholder (AOT autograd may hand it zeros)
            grad_g_true = None
        grad_z = None
        if grad_loss is not None or grad_g is not None or grad_g_true is not None:
            grad_z = ops["cross_entropy_sample_grad_backward"](
                None if grad_loss is None else grad_loss.to(lse.dtype), grad_g, grad_g_true, z, lse, target,
                true_scale, ctx.ignore_index,
            )
        if grad_lse is not None:
            from_lse = _loss_lse_grad(ops, z, target, lse, None, grad_lse, ctx.ignore_index)
            grad_z = from_lse if grad_z is None else grad_z + from_lse
        return grad_z, None, None, None, None

    return setup_context, backward


_spec(
    name="cross_entropy_sample_grad",
    signature=_sig_cross_entropy_sample_grad,
    fake=_cross_entropy_sample_grad_fake,
    check=_check_cross_entropy_sample_grad,
    autograd=_cross_entropy_sample_grad_autograd,
    to_schema=lambda out, *args: tuple(out),
)


def cross_entropy_sample_grad(
    z: Tensor,
    target: Tensor,
    rng: Optional[Tensor] = None,
    ignore_index: int = -100,
    *,
    true_scale: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> tuple:
    """:func:`cross_entropy_sample` and the sampled label's gradient G = softmax(z) - onehot(ŷ), in one op.

    The same loss, lse and ŷ as :func:`cross_entropy_sample` for the same ``rng`` (bit for bit), and

        G_r = exp(z_r - lse_r) - onehot(ŷ_r)   on rows whose target is not ``ignore_index``, 0 on the others,

    i.e. ``ce_grad(z, lse, ŷ, 1)``: the cotangent of the regularizer's explicit term. With
    ``true_scale`` (N,) it also returns ``G_true = ce_grad(z, lse, target, true_scale)``, the true
    label's (the implicit term's cotangent with true_scale = 1/N_eff), from the same read of z. Where
    a row fits on chip (on the CPU: in L2) the kernels write the gradients from the row they just
    read, so z is read from memory once instead of once per output. loss, lse, G and G_true are
    differentiable in z, all through one backward op (so G and G_true can sit in a
    ``create_graph=True`` graph); ŷ is not, and true_scale is a constant (it must not require grad).

    Shapes: z (N, C); target (N,) int64; true_scale (N,) in z's accumulation dtype; returns loss (N,),
    lse (N,) (float32; float64 for float64 z), yhat (N,) int64, G (N, C) in z's dtype (contiguous),
    and G_true (N, C) when true_scale is given.
    """
    out = _call("cross_entropy_sample_grad", backend, z, target, rng, ignore_index, true_scale)
    return tuple(out) if true_scale is not None else tuple(out[:4])


# ---------------------------------------------------------------------------------------------
# cross_entropy_sample_grad_backward: the gradient in z of all of the fused op's outputs
# ---------------------------------------------------------------------------------------------


def _sig_cross_entropy_sample_grad_backward(
    grad_loss: Optional[Tensor],
    grad_g: Optional[Tensor],
    grad_g_true: Optional[Tensor],
    z: Tensor,
    lse: Tensor,
    target: Tensor,
    true_scale: Optional[Tensor],
    ignore_index: int,
) -> Tensor:
    """Signature of ``dropreg::cross_entropy_sample_grad_backward_<backend>``."""


def _check_cross_entropy_sample_grad_backward(grad_loss, grad_g, grad_g_true, z, lse, target, true_scale,
                                              ignore_index) -> None:
    _check_logits_rows(z, "target", target, lse, ignore_index=ignore_index)
    _check_row_values(z, "grad_loss", grad_loss)
    _check_row_values(z, "true_scale", true_scale)
    for name, u in (("grad_g", grad_g), ("grad_g_true", grad_g_true)):
        if u is not None and (not isinstance(u, torch.Tensor) or u.shape != z.shape or u.dtype != z.dtype
                              or u.device != z.device):
            raise ValueError(f"argument '{name}' must match z ({z.dtype} of shape {tuple(z.shape)} on {z.device})")
    if grad_g_true is not None and true_scale is None:
        raise ValueError("argument 'grad_g_true' needs the 'true_scale' G_true was made with")


def _cross_entropy_sample_grad_backward_reference(grad_loss, grad_g, grad_g_true, z, target, true_scale, ignore_index):
    lse = torch.logsumexp(z.to(acc_dtype(z.dtype)), dim=-1)  # recomputed, so that it depends on z
    return reference.cross_entropy_sample_grad_backward(grad_loss, grad_g, grad_g_true, z, lse, target, true_scale,
                                                        ignore_index)


_spec(
    name="cross_entropy_sample_grad_backward",
    signature=_sig_cross_entropy_sample_grad_backward,
    check=_check_cross_entropy_sample_grad_backward,
    autograd=lambda ops: _composite_autograd(_cross_entropy_sample_grad_backward_reference, lse_index=4,
                                             wrt=(0, 1, 2, 3)),
    fake=lambda gl, gg, gt, z, lse, target, ts, ii: _empty_like_shape(z),
)


def _sig_ce_grad_backward(
    u: Tensor, z: Tensor, lse: Tensor, label: Tensor, row_scale: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Signature of ``dropreg::ce_grad_backward_<backend>``."""


def _check_ce_grad_backward(u, z, lse, label, row_scale, ignore_index) -> None:
    _check_logits_rows(z, "label", label, lse, row_scale, ignore_index)
    if not isinstance(u, torch.Tensor) or u.shape != z.shape or u.dtype != z.dtype or u.device != z.device:
        raise ValueError(f"argument 'u' must match z ({z.dtype} of shape {tuple(z.shape)} on {z.device})")


def _ce_grad_backward_reference(u, z, label, row_scale, ignore_index):
    lse = torch.logsumexp(z.to(acc_dtype(z.dtype)), dim=-1)  # recomputed, so that it depends on z
    return reference.ce_grad_backward_unchecked(u, z, lse, label, row_scale, ignore_index)


_spec(
    name="ce_grad_backward",
    signature=_sig_ce_grad_backward,
    check=_check_ce_grad_backward,
    autograd=lambda ops: _composite_autograd(_ce_grad_backward_reference, lse_index=2, wrt=(0, 1, 4)),
    fake=lambda u, z, lse, label, rs, ii: (_empty_like_shape(z), rs.new_empty(rs.shape)),
    to_schema=lambda out, *args: tuple(out),
)


# ---------------------------------------------------------------------------------------------
# site_penalty, site_penalty_backward: the explicit and implicit terms of one dropout site
# ---------------------------------------------------------------------------------------------


def _check_site(h, g_e, g_i, q, noise, rng) -> None:
    check_float_tensor(h, "h")
    for name, g in (("g_e", g_e), ("g_i", g_i)):
        if g is not None:
            check_float_tensor(g, name)
            if g.shape != h.shape or g.dtype != h.dtype or g.device != h.device:
                raise ValueError(
                    f"argument '{name}' must match h ({h.dtype} of shape {tuple(h.shape)} on {h.device}), "
                    f"got {g.dtype} of shape {tuple(g.shape)} on {g.device}"
                )
    if check_prob(q, "q") >= 1.0:
        raise ValueError("argument 'q' must be in [0, 1) for a site penalty, got 1.0")
    if noise not in reference.NOISE_KINDS:
        raise ValueError(f"argument 'noise' must be one of {reference.NOISE_KINDS}, got {noise!r}")
    if rng is not None:
        check_rng(rng, h)


def _sig_site_penalty(
    h: Tensor, g_e: Optional[Tensor], g_i: Optional[Tensor], q: float, noise: str, rng: Tensor
) -> Tensor:
    """Signature of ``dropreg::site_penalty_<backend>``."""


def _site_penalty_autograd(ops: dict) -> tuple:
    def setup_context(ctx, inputs, output):
        h, g_e, g_i, q, noise, rng = inputs
        ctx.q, ctx.noise = q, noise
        ctx.save_for_backward(h, g_e, g_i, rng)

    def backward(ctx, grad):
        h, g_e, g_i, rng = ctx.saved_tensors
        dh, dge, dgi = ops["site_penalty_backward"](grad.contiguous(), h, g_e, g_i, ctx.q, ctx.noise, rng)
        return dh, None if g_e is None else dge, None if g_i is None else dgi, None, None, None

    return setup_context, backward


_spec(
    name="site_penalty",
    signature=_sig_site_penalty,
    check=_check_site,
    autograd=_site_penalty_autograd,
    fake=lambda h, ge, gi, q, noise, rng: h.new_empty((2,), dtype=acc_dtype(h.dtype)),
)


def site_penalty(
    h: Tensor, g_e: Optional[Tensor], g_i: Optional[Tensor], q: float, noise: str, rng: Optional[Tensor] = None, *,
    backend: Optional[str] = None,
) -> Tensor:
    """[Σ (g_e ⊙ h)², Σ g_i ⊙ η ⊙ h] in one pass, with η drawn in-kernel and a deterministic reduction.

    η has mean 0 and variance q/(1-q): ``noise="rademacher"`` gives ±sqrt(q/(1-q)), ``"dropout"``
    gives m/(1-q) - 1 with m ~ Bernoulli(1-q), drawn at ``rng`` or, when it is None, at a fresh state
    of torch's generator (drawn in the op, kept for its backward). A missing (None) g_e or g_i contributes 0. The
    backward is elementwise and regenerates η from ``rng``:
    dh = 2a·g_e²·h + b·g_i·η, dg_e = 2a·g_e·h², dg_i = b·η·h for output gradient [a, b].

    Shapes: h, g_e, g_i share one shape; returns (2,) float32 (float64 for float64 h).
    """
    return _call("site_penalty", backend, h, g_e, g_i, check_prob(q, "q"), noise, rng)


def _sig_site_penalty_backward(
    grad: Tensor, h: Tensor, g_e: Optional[Tensor], g_i: Optional[Tensor], q: float, noise: str, rng: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Signature of ``dropreg::site_penalty_backward_<backend>``; an empty tensor stands for the
    gradient of a missing g_e / g_i."""


def _check_site_backward(grad, h, g_e, g_i, q, noise, rng) -> None:
    _check_site(h, g_e, g_i, q, noise, rng)
    acc = acc_dtype(h.dtype)
    if not isinstance(grad, torch.Tensor) or grad.shape != (2,) or grad.dtype != acc or grad.device != h.device:
        raise ValueError(f"argument 'grad' must be a {acc} tensor of shape (2,) on {h.device}")


def _site_penalty_backward_fake(grad, h, ge, gi, q, noise, rng):
    return (
        _empty_like_shape(h),
        _empty_like_shape(h, ge.dtype) if ge is not None else h.new_empty((0,)),
        _empty_like_shape(h, gi.dtype) if gi is not None else h.new_empty((0,)),
    )


def _site_backward_outputs(out, grad, h, *args):
    dh, dge, dgi = out
    return dh, h.new_empty((0,)) if dge is None else dge, h.new_empty((0,)) if dgi is None else dgi


_spec(
    name="site_penalty_backward",
    signature=_sig_site_penalty_backward,
    fake=_site_penalty_backward_fake,
    check=_check_site_backward,
    autograd=lambda ops: _composite_autograd(reference.site_penalty_backward, lse_index=None, wrt=(0, 1, 2, 3)),
    to_schema=_site_backward_outputs,
)


# ---------------------------------------------------------------------------------------------
# Registration: the Python backends' ops from the signatures, fakes and autograd for every backend
# ---------------------------------------------------------------------------------------------


def _python_body(spec: OpSpec, kernel: Callable) -> Callable:
    @functools.wraps(spec.signature)
    def body(*args):
        spec.check(*args)
        return spec.to_schema(kernel(*args), *args)

    return body


def _register_autograd(ops: dict, qualnames: dict, native: bool = False) -> None:
    """The Python autograd of the ops in ``qualnames``; for the C++ ops (``native``) only where C++
    registered none: the first-order ops' autograd is C++ (csrc/autograd.cpp), the backward ops'
    (third order) is composite PyTorch from here."""
    for name, qualname in qualnames.items():
        if native and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"):
            continue
        if SPECS[name].autograd is not None:
            setup_context, backward = SPECS[name].autograd(ops)
            torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def _define_python_backend(backend: str, kernels, define) -> dict:
    qualnames = {name: f"dropreg::{name}_{backend}" for name in SPECS}
    for name, spec in SPECS.items():
        define(qualnames[name], mutates_args=())(_python_body(spec, getattr(kernels, name))).register_fake(spec.fake)
    ops = {name: getattr(torch.ops.dropreg, f"{name}_{backend}") for name in SPECS}
    _register_autograd(ops, qualnames)
    return {**ops, **{f"{name}_draw": _python_draw(ops[name], i) for name, i in DRAWS.items()}}


# The ops that draw their own state, by their base op and the position of its `rng`: ``<op>_draw`` takes
# the base op's arguments with `rng` replaced by a trailing `seed` (int or None; every argument
# passed) and returns the base op's outputs followed by the state ``[seed, offset]`` it used. The C++
# ones (schemas in csrc/ops.cpp) are one launch on a GPU; a Python backend's is make_rng and the op.
DRAWS = {"dropout": 2, "dropout_indexed": 2, "cross_entropy_sample": 2, "cross_entropy_sample_grad": 2,
         "site_penalty": 5}


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _python_draw(op: Callable, rng_index: int) -> Callable:
    def draw(*args):
        *base, seed = args
        rng = _rng_state(base[0].device, seed)
        return (*_as_tuple(op(*base[:rng_index], rng, *base[rng_index:])), rng)

    return draw


def _draw_fake(fake: Callable, rng_index: int, n_args: int) -> Callable:
    def draw_fake(*args):
        *base, _ = (*args, *(None,) * (n_args - len(args)))  # the schema's defaults are None; seed unused
        rng = base[0].new_empty((2,), dtype=torch.int64)
        return (*_as_tuple(fake(*base[:rng_index], rng, *base[rng_index:])), rng)

    return draw_fake


BACKEND_OPS["reference"] = _define_python_backend("reference", reference, torch.library.custom_op)

if _ext.HAS_CPU:
    for _name, _s in SPECS.items():
        torch.library.register_fake(f"dropreg::{_name}")(_s.fake)
    torch.library.register_fake("dropreg::dropout_")(lambda x, p, rng: None)
    torch.library.register_fake("dropreg::dropout_draw_")(lambda x, p, seed=None: x.new_empty((2,), dtype=torch.int64))
    torch.library.register_fake("dropreg::rng_state")(
        lambda like, seed=None: like.new_empty((2,), dtype=torch.int64)
    )
    for _name, _index in DRAWS.items():
        _n_args = len(getattr(torch.ops.dropreg, f"{_name}_draw").default._schema.arguments)
        torch.library.register_fake(f"dropreg::{_name}_draw")(_draw_fake(SPECS[_name].fake, _index, _n_args))
    _native = {name: getattr(torch.ops.dropreg, name) for name in SPECS}
    BACKEND_OPS["cpu"] = BACKEND_OPS["cuda"] = {
        **_native, **{f"{name}_draw": getattr(torch.ops.dropreg, f"{name}_draw") for name in DRAWS}
    }
    _register_autograd(_native, {name: f"dropreg::{name}" for name in SPECS}, native=True)
    ENTRIES.update({name: getattr(_ext.C, name) for name in DRAWS if hasattr(_ext.C, name)})

if _ext.HAS_TRITON:
    from . import triton_kernels

    # triton_op lets torch.compile trace into the launchers. Under TRITON_INTERPRET=1, wrap_triton
    # hands back the bare interpreted kernel, which cannot run on fake tensors: there the ops are
    # registered as opaque custom ops (with the explicit fakes) instead.
    _interpreted = os.environ.get("TRITON_INTERPRET") == "1" or not hasattr(torch.library, "triton_op")
    _define = torch.library.custom_op if _interpreted else torch.library.triton_op
    BACKEND_OPS["triton"] = _define_python_backend("triton", triton_kernels, _define)
