""":class:`LSTM`: a drop-in for :class:`torch.nn.LSTM` written in plain tensor ops, so that it has a
double backward on every device (cuDNN's LSTM has none), with its between-layer dropout as
:class:`dropreg_ext.Dropout` modules: regularizer sites for :class:`dropreg_ext.DropoutRegularizer`."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_prob
from .nn import Dropout

__all__ = ["LSTM"]


class _Stack(torch.autograd.Function):
    """``torch.stack(tensors, dim)`` with ``grad.unbind(dim)`` as its (differentiable) backward. Torch's
    own stack backward selects each slice, and the double backward of T selects zero-fills and adds T
    full-size tensors: O(T²) work per double backward, which unbind's backward (one stack) avoids."""

    @staticmethod
    def forward(ctx, dim: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.dim = dim
        return torch.stack(tensors, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return (None, *grad.unbind(ctx.dim))


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"argument '{name}' must be an int >= 1, got {value!r}")
    return value


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"argument '{name}' must be a bool, got {type(value).__name__}")
    return value


class LSTM(nn.Module):
    r"""Multi-layer LSTM with :class:`torch.nn.LSTM`'s interface, in plain tensor ops: it has any order
    of derivatives on every device, which the double backward of :class:`dropreg_ext.DropoutRegularizer`
    needs (on a GPU, ``nn.LSTM`` runs cuDNN, whose LSTM has no double backward).

    Each layer l computes, for every time step t, with gates in ``nn.LSTM``'s order (i, f, g, o)::

        [i f g o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
        c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g),    h_t = σ(o) ⊙ tanh(c_t)

    where x_t is the input for l = 0 and the previous layer's h_t, passed through dropout, for l > 0.
    The between-layer dropout (``dropout`` > 0, ``num_layers`` > 1) is ``num_layers - 1`` modules
    :class:`dropreg_ext.Dropout` in :attr:`dropouts`: fused dropout in training, and the sites of the
    regularizers inside :meth:`DropoutRegularizer.capture` (and of :func:`dropreg_ext.record_sites`).

    Parameters, their names (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
    ``bias_hh_l{k}``), shapes and initialization U(-1/√H, 1/√H) are ``nn.LSTM``'s, so the
    ``state_dict`` of one loads into the other. The input projection of all T steps is one matrix
    product per layer; the loop does one ``addmm`` per step.

    Args:
        input_size: the number of features of the input x.
        hidden_size: the number of features of the hidden state h.
        num_layers: the number of stacked layers. Default: 1
        bias: if ``False``, the layers have no ``b_ih`` and ``b_hh``. Default: ``True``
        batch_first: if ``True``, input and output are (N, L, H) instead of (L, N, H); the states
            keep their (num_layers, N, H) shape. Default: ``False``
        dropout: drop probability of the dropout on the output of every layer but the last.
            Default: 0
        bidirectional, proj_size: accepted for ``nn.LSTM``'s signature; only their defaults
            (``False``, 0) are supported, others raise ``NotImplementedError``.
        device, dtype: of the parameters, as for ``nn.LSTM``.

    Inputs: input, (h_0, c_0)
        - **input**: (L, N, H_in), (N, L, H_in) with ``batch_first``, or (L, H_in) unbatched.
          A ``PackedSequence`` raises ``NotImplementedError``: pad the sequences instead.
        - **h_0**, **c_0**: (num_layers, N, H) ((num_layers, H) unbatched); zeros if ``hx`` is ``None``.

    Outputs: output, (h_n, c_n)
        - **output**: (L, N, H) ((N, L, H) with ``batch_first``, (L, H) unbatched): h_t of the last layer.
        - **h_n**, **c_n**: (num_layers, N, H) ((num_layers, H) unbatched): the final states.

    Example::

        >>> lstm = dropreg_ext.LSTM(10, 20, num_layers=2, dropout=0.3)
        >>> lstm.load_state_dict(torch.nn.LSTM(10, 20, num_layers=2).state_dict())
        >>> output, (h_n, c_n) = lstm(torch.randn(5, 3, 10))
        >>> reg = dropreg_ext.DropoutRegularizer(lstm_model)   # its dropout: one site per call
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.input_size = _positive_int(input_size, "input_size")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.bias = _check_bool(bias, "bias")
        self.batch_first = _check_bool(batch_first, "batch_first")
        self.dropout = check_prob(dropout, "dropout")
        if bidirectional is not False:
            raise NotImplementedError(
                f"dropreg_ext.LSTM supports only bidirectional=False, got bidirectional={bidirectional!r}"
            )
        if proj_size != 0:
            raise NotImplementedError(f"dropreg_ext.LSTM supports only proj_size=0, got proj_size={proj_size!r}")
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={self.dropout} and num_layers={self.num_layers}",
                stacklevel=2,
            )
        factory = {"device": device, "dtype": dtype}
        gates = 4 * hidden_size
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(gates, layer_input, **factory)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(gates, hidden_size, **factory)))
            if bias:
                self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(gates, **factory)))
                self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(gates, **factory)))
        self.dropouts = nn.ModuleList(Dropout(self.dropout) for _ in range(num_layers - 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter from U(-1/√H, 1/√H), in registration order (as ``nn.LSTM``)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def _layer(self, layer: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple:
        """One layer over the sequence x (T, N, H_in) from the state (h, c) (N, H): ((T, N, H), h_T, c_T)."""
        w_ih = getattr(self, f"weight_ih_l{layer}")
        w_hh = getattr(self, f"weight_hh_l{layer}").t()
        bias = getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}") if self.bias else None
        xw = F.linear(x, w_ih, bias)
        outputs = []
        for xw_t in xw.unbind(0):  # unbind, not xw[t]: its backward is one stack, not T zero-filled copies
            i, f, g, o = torch.addmm(xw_t, h, w_hh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return _Stack.apply(0, *outputs), h, c

    def forward(self, input: torch.Tensor, hx: Optional[tuple] = None) -> tuple:
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise NotImplementedError(
                "dropreg_ext.LSTM does not support a PackedSequence 'input'; pad the sequences (and mask the loss) "
                "instead"
            )
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
            raise ValueError(
                "argument 'input' must be a 3-D (L, N, H_in) tensor ((N, L, H_in) with batch_first) or a 2-D "
                f"unbatched (L, H_in) one, got {tuple(input.shape) if isinstance(input, torch.Tensor) else input!r}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(f"argument 'input' must have input_size={self.input_size} features in its last "
                             f"dimension, got {input.shape[-1]}")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        state_shape = (self.num_layers, x.shape[1], self.hidden_size)
        if hx is None:
            h0 = c0 = x.new_zeros(state_shape)
        else:
            h0, c0 = self._check_state(hx, batched, state_shape)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0:
                x = self.dropouts[layer - 1](x)
            x, h, c = self._layer(layer, x, h0[layer], c0[layer])
            h_n.append(h)
            c_n.append(c)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if not batched:
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), (h_n, c_n)

    def _check_state(self, hx, batched: bool, state_shape: tuple) -> tuple:
        """(h_0, c_0) as (num_layers, N, H) tensors, checked against ``state_shape``."""
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(s, torch.Tensor) for s in hx)):
            raise TypeError("argument 'hx' must be a tuple (h_0, c_0) of two tensors or None")
        expected = state_shape if batched else (state_shape[0], state_shape[2])
        for name, state in zip(("h_0", "c_0"), hx):
            if tuple(state.shape) != expected:
                raise ValueError(f"argument 'hx': {name} must have shape {expected}, got {tuple(state.shape)}")
        return tuple(s if batched else s.unsqueeze(1) for s in hx)

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout != 0:
            text += f", dropout={self.dropout}"
        return text
