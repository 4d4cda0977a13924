"""``dr.patch_functional``: torch's dropout functions run the fused ops, for models that call
``torch.nn.functional.dropout`` directly (Hugging Face Llama, Mistral, Qwen apply attention-probability
dropout that way: the largest dropout tensors of a transformer).

While on, ``torch.nn.functional.dropout``, ``dropout1d/2d/3d``, ``alpha_dropout`` and
``feature_alpha_dropout`` are wrappers with torch's signatures that call
:mod:`dropreg_ext.functional` (and, inside :meth:`DropoutRegularizer.capture`, make each call that
would drop a regularizer site). Torch's own modules call these functions, so ``torch.nn.Dropout``
and ``nn.MultiheadAttention``'s dropout are fused too. What the kernels do not cover
(:func:`dropreg_ext.functional.covered`) goes to torch's original function.

The patch is process-wide, like ``torch.backends`` flags: every thread sees it. Each call returns a
handle whose ``__exit__`` restores the state the call found, so ``with`` blocks nest (inner blocks
restore in order); overlapping ``with`` blocks in different threads can restore each other's state,
so threads should turn it on once, before they start. Code that bound a function before the patch
(``from torch.nn.functional import dropout``) keeps torch's; ``F.scaled_dot_product_attention`` keeps
its own dropout.
"""

from __future__ import annotations

import functools
import threading

import torch.nn.functional as F

from . import functional, nn
from ._checks import check_prob

__all__ = ["patch_functional", "functional_patched"]

_lock = threading.Lock()


def _wrap(name: str):
    ours = getattr(functional, name)
    original = functional.TORCH_FUNCTIONS[name]
    alpha = "alpha" in name

    def patched(input, p=0.5, training=not alpha, inplace=False):  # torch's defaults: alpha ones off
        if not functional.covered(input):
            return original(input, p, training, inplace)
        recording = nn._recording
        if recording is not None and isinstance(training, bool):
            q = check_prob(p, "p")
            if recording.is_functional_site(training, q):
                if alpha:
                    nn.raise_alpha_site(f"torch.nn.functional.{name}")
                return recording.record(input, q, functional.mask_shape(name, input))
        return ours(input, p, training, inplace)

    functools.update_wrapper(patched, original)
    patched.__doc__ = (f"torch.nn.functional.{name}, patched by dropreg_ext.patch_functional to run "
                       f"dropreg_ext.functional.{name} (torch's: dropreg_ext.functional.TORCH_FUNCTIONS[{name!r}])."
                       f"\n\n{original.__doc__ or ''}")
    return patched


_PATCHED = {name: _wrap(name) for name in functional.TORCH_FUNCTIONS}


def functional_patched() -> bool:
    """True while :func:`patch_functional` is on."""
    return all(getattr(F, name) is fn for name, fn in _PATCHED.items())


def _set(enabled: bool) -> None:
    source = _PATCHED if enabled else functional.TORCH_FUNCTIONS
    for name, fn in source.items():
        setattr(F, name, fn)


class _Patch:
    """What :func:`patch_functional` returns: a context manager that restores the state before the call."""

    def __init__(self, previous: bool, enabled: bool) -> None:
        self._previous = previous
        self.enabled = enabled

    def __enter__(self) -> "_Patch":
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            _set(self._previous)

    def __repr__(self) -> str:
        return f"patch_functional(enabled={self.enabled})"


def patch_functional(enabled: bool = True) -> _Patch:
    """Route torch's dropout functions to the fused ops (``enabled=True``) or back to torch's.

    Takes effect at the call and stays, or, used as ``with dr.patch_functional(): ...``, until the
    block ends, which restores what was there before (see the module docstring for nesting and
    threads). Works under ``torch.compile``: the compiled code traces the wrappers.

    Example::

        >>> with dr.patch_functional():
        ...     loss = llama(**batch).loss     # attention-probability dropout fused, no mask stored
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"argument 'enabled' must be a bool, got {type(enabled).__name__}")
    with _lock:
        previous = functional_patched()
        _set(enabled)
    return _Patch(previous, enabled)
