"""Triton kernels and their launchers (no autograd, no argument checks: the registered ops in
``dropreg_ext.ops`` check before they launch); installed as ``dropreg_ext.triton_kernels``.

One launcher per op, under the op's name (``dropreg_ext.ops`` registers them as
``dropreg::<op>_triton``). The launches go through ``torch.library.wrap_triton`` so that the
``triton_op`` registrations trace under ``torch.compile``. On a machine without a GPU the kernels
run under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from .cross_entropy import (
    ce_grad,
    ce_grad_backward,
    cross_entropy_sample,
    cross_entropy_sample_grad,
    cross_entropy_sample_grad_backward,
)
from .dropout import dropout
from .dropout_indexed import dropout_indexed
from .philox import philox
from .site_penalty import site_penalty, site_penalty_backward

__all__ = [
    "dropout",
    "dropout_indexed",
    "philox",
    "cross_entropy_sample",
    "cross_entropy_sample_grad",
    "cross_entropy_sample_grad_backward",
    "ce_grad",
    "ce_grad_backward",
    "site_penalty",
    "site_penalty_backward",
]
