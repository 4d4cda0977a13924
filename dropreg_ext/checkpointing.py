"""Activation checkpointing that never redraws a dropout mask.

A fused dropout's mask is a pure function of the ``[seed, offset]`` it draws (docs/design.md §3). A
recomputed forward under ``torch.utils.checkpoint`` therefore gets the first forward's masks exactly
when it draws the same states: with ``preserve_rng_state=True`` (torch's default) torch restores the
generator before recomputing, and so it does. With ``preserve_rng_state=False`` torch does not, and
every dropout (torch's and ours) would draw a new mask in the recompute: silently wrong gradients.
:func:`checkpoint_context` closes that gap for non-reentrant checkpointing: the recompute replays
each draw's result instead of drawing again.
"""

from __future__ import annotations

import torch

from . import ops

__all__ = ["checkpoint_context"]

# The ops that read the generator: every <op>_draw of the C++ backends, the in-place dropout's, and the
# state alone (which the Python backends' draws call).
_DRAW_OPS = ("rng_state", "dropout_draw_", *(f"{name}_draw" for name in ops.DRAWS))


def checkpoint_context():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
    context_fn=dr.checkpoint_context)``: the recomputed forward reuses the outputs of the first forward's
    draws (the drawn state, and the output of the op that drew it), and recomputes everything else. The
    masks are the first forward's whatever ``preserve_rng_state`` says; the price is that a dropout that
    draws its own state keeps its output through the checkpointed region.

    Built on torch's selective activation checkpointing (``create_selective_checkpoint_contexts``).
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    draws = {getattr(torch.ops.dropreg, name).default for name in _DRAW_OPS if hasattr(torch.ops.dropreg, name)}

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in draws else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
