"""The fused dropout modules (:class:`Dropout`, :class:`Dropout1d`/``2d``/``3d``,
:class:`AlphaDropout`, :class:`FeatureAlphaDropout`, :class:`LockedDropout`),
:func:`replace_dropout`, and :func:`record_sites`: how a forward pass turns the modules (and, under
:func:`dropreg_ext.patch_functional`, torch's dropout functions) into the *sites* of dropout's
regularizers (used by :class:`dropreg_ext.DropoutRegularizer` and by the plain-autograd objective of
the reference).

The modules are drop-ins: torch's constructor, attributes, ``state_dict`` and forward semantics;
inputs the kernels do not cover (:func:`dropreg_ext.functional.covered`) go to torch's function."""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional

import torch

from . import backends, functional
from ._checks import check_prob

__all__ = [
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "AlphaDropout",
    "FeatureAlphaDropout",
    "LockedDropout",
    "replace_dropout",
    "Site",
    "record_sites",
]


class _FusedDropout:
    """Forward shared by the fused dropout modules: while :func:`record_sites` records this module's
    model, the call is a site (input passed through and recorded), otherwise the module's own
    dropout (``_drop``)."""

    _torch_name = "dropout"  # torch's function for the inputs the kernels do not cover (None: no such)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        recording = _recording
        if recording is not None and recording.is_site(self):
            return recording.record(input, self.p, self._mask_shape(input))
        if self._torch_name is not None and not functional.covered(input):
            return functional.TORCH_FUNCTIONS[self._torch_name](input, self.p, self.training, self.inplace)
        return self._drop(input)


class Dropout(_FusedDropout, torch.nn.Dropout):
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

    def _drop(self, input: torch.Tensor) -> torch.Tensor:
        return functional.dropout(input, self.p, self.training, self.inplace)

    def _mask_shape(self, input: torch.Tensor) -> tuple:
        return functional.mask_shape("dropout", input)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}, backend={backends.get_backend()}"


class _ChannelDropout(_FusedDropout):
    """Shared by the channel-dropout modules."""

    _functional = None

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(check_prob(p, "p"), inplace)

    def _drop(self, input: torch.Tensor) -> torch.Tensor:
        return type(self)._functional(input, self.p, self.training, self.inplace)

    def _mask_shape(self, input: torch.Tensor) -> tuple:
        return functional.mask_shape(self._torch_name, input)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}, backend={backends.get_backend()}"


class Dropout1d(_ChannelDropout, torch.nn.Dropout1d):
    """Drop-in :class:`torch.nn.Dropout1d`: zeroes whole channels of (N, C, L) / (C, L) inputs with a
    mask of shape (N, C, 1) drawn by the Philox contract (:func:`functional.broadcast_dropout`)."""

    _functional = staticmethod(functional.dropout1d)
    _torch_name = "dropout1d"


class Dropout2d(_ChannelDropout, torch.nn.Dropout2d):
    """Drop-in :class:`torch.nn.Dropout2d`: zeroes whole feature maps of (N, C, H, W) inputs with a mask
    of shape (N, C, 1, 1) drawn by the Philox contract; other ranks as torch (a warning, channels over
    dims (N, C); a 3-D input is (N, C, L))."""

    _functional = staticmethod(functional.dropout2d)
    _torch_name = "dropout2d"


class Dropout3d(_ChannelDropout, torch.nn.Dropout3d):
    """Drop-in :class:`torch.nn.Dropout3d`: zeroes whole channels of (N, C, D, H, W) / (C, D, H, W)
    inputs with a mask of shape (N, C, 1, 1, 1) drawn by the Philox contract."""

    _functional = staticmethod(functional.dropout3d)
    _torch_name = "dropout3d"


class LockedDropout(_FusedDropout, torch.nn.Module):
    r"""Locked (variational) dropout, as in AWD-LSTM (the paper's model): one mask per sequence,
    shared along the time axis. :math:`y_{t,b,:} = m_{b,:} \odot x_{t,b,:} / (1-p)`.

    Args:
        p: probability of an element of the per-sequence mask to be zeroed. Default: 0.5
        batch_first: inputs are (B, T, *) instead of (T, B, *). Default: False

    Shape:
        - Input: :math:`(T, B, *)` (or :math:`(B, T, *)`), float.
        - Output: same shape. The mask, :math:`(1, B, *)`, is T times smaller than the input.
    """

    def __init__(self, p: float = 0.5, batch_first: bool = False) -> None:
        super().__init__()
        self.p = check_prob(p, "p")
        if not isinstance(batch_first, bool):
            raise TypeError(f"argument 'batch_first' must be a bool, got {type(batch_first).__name__}")
        self.batch_first = batch_first

    _torch_name = None  # torch has no locked dropout

    def _drop(self, input: torch.Tensor) -> torch.Tensor:
        return functional.locked_dropout(input, self.p, self.training, self.batch_first)

    def _mask_shape(self, input: torch.Tensor) -> tuple:
        return functional.mask_shape("locked_dropout", input, self.batch_first)

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_first={self.batch_first}, backend={backends.get_backend()}"


class _FusedAlphaDropout(torch.nn.Module):
    """Shared by the alpha-dropout modules. As torch's, ``inplace`` is accepted and stored but the
    forward never writes into its input. Not regularizer sites: alpha dropout's noise is affine, not
    the multiplicative noise the regularizers expand, so a capture refuses it."""

    _functional = None
    _torch_name = ""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(check_prob(p, "p"), inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        recording = _recording
        if recording is not None and recording.is_functional_site(self.training, self.p):
            raise_alpha_site(type(self).__name__)
        if not functional.covered(input):
            return functional.TORCH_FUNCTIONS[self._torch_name](input, self.p, self.training)
        return type(self)._functional(input, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}, backend={backends.get_backend()}"


def raise_alpha_site(name: str) -> None:
    raise NotImplementedError(
        f"{name} in training mode cannot run inside a DropoutRegularizer capture: alpha dropout's noise is "
        "affine, not the multiplicative dropout noise the regularizers are the expansion of; put it in eval "
        "mode (or use k_sample_loss, which runs the model's own dropout)"
    )


class AlphaDropout(_FusedAlphaDropout, torch.nn.AlphaDropout):
    """Drop-in :class:`torch.nn.AlphaDropout` (SELU networks) on the Philox mask contract, no mask
    stored: :func:`dropreg_ext.functional.alpha_dropout`."""

    _functional = staticmethod(functional.alpha_dropout)
    _torch_name = "alpha_dropout"


class FeatureAlphaDropout(_FusedAlphaDropout, torch.nn.FeatureAlphaDropout):
    """Drop-in :class:`torch.nn.FeatureAlphaDropout`: alpha dropout with one draw per channel (dims
    (N, C)), :func:`dropreg_ext.functional.feature_alpha_dropout`."""

    _functional = staticmethod(functional.feature_alpha_dropout)
    _torch_name = "feature_alpha_dropout"


def replace_dropout(model: torch.nn.Module, *, locked: bool = False, batch_first: bool = False) -> int:
    """Swap torch's dropout modules inside ``model`` for the fused ones, in place.

    ``torch.nn.Dropout`` → :class:`Dropout` (or, with ``locked=True``, :class:`LockedDropout` with
    ``batch_first`` — opt-in, since it changes the mask from per element to per sequence), and
    ``torch.nn.Dropout1d/2d/3d`` → :class:`Dropout1d/2d/3d`, ``torch.nn.AlphaDropout`` /
    ``FeatureAlphaDropout`` → :class:`AlphaDropout` / :class:`FeatureAlphaDropout`. Keeps ``p``,
    ``inplace`` and the training flag. Exact types only: user subclasses are left alone. Returns the
    number of modules replaced.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) in _REPLACEMENTS:
        raise ValueError(
            f"argument 'model' is itself a torch.nn.{type(model).__name__}; "
            "construct the dropreg_ext module directly"
        )
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            kind = type(child)
            if kind not in _REPLACEMENTS:
                continue
            if kind is torch.nn.Dropout and locked:
                new = LockedDropout(child.p, batch_first=batch_first)
            else:
                new = _REPLACEMENTS[kind](child.p, child.inplace)
            new.train(child.training)
            setattr(parent, name, new)
            count += 1
    return count


_REPLACEMENTS = {
    torch.nn.Dropout: Dropout,
    torch.nn.Dropout1d: Dropout1d,
    torch.nn.Dropout2d: Dropout2d,
    torch.nn.Dropout3d: Dropout3d,
    torch.nn.AlphaDropout: AlphaDropout,
    torch.nn.FeatureAlphaDropout: FeatureAlphaDropout,
}


# torch's multiplicative dropout modules: replace_dropout makes them sites; left as torch's, they drop in a capture.
TORCH_DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)


class Site(NamedTuple):
    """One call of a fused dropout module under :func:`record_sites`."""

    h: torch.Tensor  # the activation entering the dropout module
    o: torch.Tensor  # h through a fresh identity node, which the model continued from
    q: float  # drop probability
    version: int  # h._version when recorded: an in-place change afterwards would alter the terms
    # The shape of the mask the dropout would draw, broadcast over h: h's shape for element-wise dropout,
    # smaller where one mask element is shared (channel and locked dropout); None: element-wise.
    mask_shape: Optional[tuple] = None


class _Recording:
    def __init__(self, modules) -> None:
        self.modules = {id(m) for m in modules}
        self.sites: list = []

    def is_site(self, module: torch.nn.Module) -> bool:
        return module.training and module.p > 0 and torch.is_grad_enabled() and id(module) in self.modules

    @staticmethod
    def is_functional_site(training: bool, p: float) -> bool:
        """A dropout call without a module (a patched torch function, an alpha-dropout module): a site
        whenever it would drop."""
        return training and p > 0 and torch.is_grad_enabled()

    # Under torch.compile the site bookkeeping runs eagerly (a graph break), not silently lost.
    @torch.compiler.disable
    def record(self, h: torch.Tensor, q: float, mask_shape: tuple) -> torch.Tensor:
        if q >= 1.0:
            raise ValueError(
                "a Dropout with p = 1 cannot be a regularizer site: its coefficient q/(1-q) is infinite"
            )
        # view_as gives a fresh autograd node, so d(.)/d o is the gradient at the site only (not
        # through skip paths). An input that needs no gradient gets a leaf of its own.
        o = h.view_as(h) if h.requires_grad else h.detach().requires_grad_()
        self.sites.append(Site(h=h, o=o, q=q, version=h._version, mask_shape=mask_shape))
        return o


# The recording in progress (at most one at a time).
_recording: Optional[_Recording] = None


@contextlib.contextmanager
def record_sites(model: torch.nn.Module) -> Iterator[list]:
    """Record the dropout sites of the forward passes run inside the block; yields the list of
    :class:`Site` it fills.

    Every fused dropout module of ``model`` that is in training mode, has ``p > 0`` and runs with
    gradients enabled is a *site*: it does not drop, but returns its input h through a fresh
    identity node o (``h.view_as(h)``, or a leaf when h needs no gradient) and records (h, o, q) and the
    shape of the mask it would have drawn (shared along time for locked dropout, along the spatial dims for
    channel dropout). A module called T times (a recurrent loop) gives T sites. Gradients with respect to o are the
    gradients *at the site*, not the total gradient of h (which would include skip paths).
    Under :func:`dropreg_ext.patch_functional`, every call of torch's ``dropout``/``dropout1d/2d/3d``
    inside the block that would drop is a site too (with its own p), whichever module made it; an
    alpha-dropout call that would drop raises ``NotImplementedError``. Recordings cannot be nested.
    """
    global _recording
    if _recording is not None:
        raise RuntimeError("a DropoutRegularizer capture is already active; captures cannot be nested")
    recording = _Recording(m for m in model.modules() if isinstance(m, _FusedDropout))
    _recording = recording
    try:
        yield recording.sites
    finally:
        _recording = None
