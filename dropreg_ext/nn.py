"""Modules: :class:`Dropout` and :func:`replace_dropout`."""

from __future__ import annotations

import torch

from . import ops
from ._checks import check_prob

__all__ = ["Dropout", "replace_dropout"]


class Dropout(torch.nn.Dropout):
    r"""Drop-in :class:`torch.nn.Dropout` with fused, mask-free kernels.

    During training, zeroes each element with probability ``p`` and scales the rest by
    :math:`1/(1-p)`: :math:`y = m \odot x / (1-p)`, :math:`m_i \sim \mathrm{Bernoulli}(1-p)`.
    The mask comes from a counter-based Philox stream and is regenerated in backward, so no mask
    is stored (PyTorch keeps one byte per element). Same constructor, ``state_dict`` and
    ``train()/eval()`` behaviour as :class:`torch.nn.Dropout`; the backend is chosen with
    :func:`dropreg_ext.set_backend`.

    Args:
        p: probability of an element to be zeroed. Default: 0.5
        inplace: do the operation in place. Default: False

    Shape:
        - Input: :math:`(*)`, any shape, float64/float32/float16/bfloat16.
        - Output: :math:`(*)`, same shape as the input.

    Example::

        >>> m = dropreg_ext.Dropout(p=0.2)
        >>> y = m(torch.randn(20, 16))
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(check_prob(p, "p"), inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.dropout(input, self.p, self.training, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}, backend={ops.get_backend()}"


def replace_dropout(model: torch.nn.Module) -> int:
    """Swap every :class:`torch.nn.Dropout` inside ``model`` for :class:`Dropout`, in place.

    Keeps ``p``, ``inplace`` and the training flag of each module. Subclasses of
    ``torch.nn.Dropout`` with their own behaviour (and ``Dropout1d/2d/3d``, ``AlphaDropout``) are
    left alone. Returns the number of modules replaced.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) is torch.nn.Dropout:
        raise ValueError(
            "argument 'model' is itself a torch.nn.Dropout; replace it with dropreg_ext.Dropout(p) directly"
        )
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                new = Dropout(child.p, child.inplace)
                new.train(child.training)
                setattr(parent, name, new)
                count += 1
    return count
