"""Models of the reproduction, every dropout a :class:`dropreg_ext.Dropout` *site*.

The regularizers differentiate the loss twice (``autograd.grad(create_graph=True)`` and then
``backward()``), so every layer must support double backward. The LSTM is therefore written here in
plain tensor ops, as the authors did ("we need to use own lstm for second order derivative": cuDNN's
LSTM has no double backward). PyTorch's CPU ``nn.LSTM`` does support it (checked with torch 2.14),
but its stacked layers hide the between-layer activations the regularizer needs as sites, and the
same code must run on CUDA, where ``nn.LSTM`` dispatches to cuDNN.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import dropreg_ext as dr


class _Stack(torch.autograd.Function):
    """``torch.stack(tensors, dim)`` with ``grad.unbind(dim)`` as its (differentiable) backward. Torch's
    own stack backward selects each slice, and the double backward of T selects zero-fills and adds T
    full-size tensors: O(T²) work per regularized step, which unbind's backward (one stack) avoids."""

    @staticmethod
    def forward(ctx, dim: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.dim = dim
        return torch.stack(tensors, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return (None, *grad.unbind(ctx.dim))


class LSTMLayer(nn.Module):
    r"""One LSTM layer over a whole sequence, in plain ops (so it has any order of derivatives).

    Gates in ``nn.LSTM``'s order (i, f, g, o) and with its initialization U(-1/√H, 1/√H)::

        [i f g o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
        c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g),    h_t = σ(o) ⊙ tanh(c_t)

    The input projection of all T steps is one matrix product; the loop does one ``addmm`` per step,
    and the T outputs are stacked by :class:`_Stack`, whose backward keeps the double backward O(T).
    The one LSTM layer of the project: the reproduction and the training benchmark both use it.

    Shape:
        - input: (T, B, input_size); state: ((B, H), (B, H)), or None for zeros
        - output: (T, B, H) and the final state ((B, H), (B, H))
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor, state: Optional[tuple] = None) -> tuple:
        if state is None:
            state = (x.new_zeros(x.shape[1], self.hidden_size),) * 2
        h, c = state
        xw = F.linear(x, self.weight_ih, self.bias_ih + self.bias_hh)
        w_hh = self.weight_hh.t()
        outputs = []
        for xw_t in xw.unbind(0):  # unbind, not xw[t]: its backward is one stack, not T zero-filled copies
            i, f, g, o = torch.addmm(xw_t, h, w_hh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return _Stack.apply(0, *outputs), (h, c)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


class LSTMLanguageModel(nn.Module):
    """AWD-LSTM-style word model with a **tied** decoder (the decoder weight is the embedding, as in the
    authors' code), so the last layer has ``emsize`` units and the others ``nhid``.

    Dropout sites (one :class:`dropreg_ext.Dropout` each, drop probability ``q``, element-wise masks):
    the embedding output, the output of every layer but the last (between layers), and the last
    layer's output (before the decoder). AWD-LSTM's DropConnect on ``W_hh`` and its embedding dropout
    are not used.

    ``forward((tokens, state))`` takes tokens (T, B) and the initial state of every layer (``None``:
    zeros) and returns logits (T, B, V); the detached final state is kept in :attr:`last_state`, so
    truncated backpropagation through time can carry it to the next window. The input is one tuple
    so that :func:`dropreg_ext.k_sample_loss` can call ``model(x)`` k times from the same state.
    """

    def __init__(self, vocab: int, emsize: int, nhid: int, nlayers: int, q: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, emsize)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        sizes = [emsize] + [nhid] * (nlayers - 1) + [emsize]
        self.layers = nn.ModuleList(LSTMLayer(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.drop_embedding = dr.Dropout(q)
        self.drop_between = nn.ModuleList(dr.Dropout(q) for _ in range(nlayers - 1))
        self.drop_output = dr.Dropout(q)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab))
        self.last_state = None

    def initial_state(self, batch: int) -> list:
        w = self.embedding.weight
        return [(w.new_zeros(batch, layer.hidden_size), w.new_zeros(batch, layer.hidden_size)) for layer in self.layers]

    def forward(self, inputs: tuple) -> torch.Tensor:
        tokens, state = inputs
        if state is None:
            state = self.initial_state(tokens.shape[1])
        x = self.drop_embedding(self.embedding(tokens))
        final = []
        for index, layer in enumerate(self.layers):
            x, layer_state = layer(x, state[index])
            final.append(tuple(s.detach() for s in layer_state))
            x = self.drop_between[index](x) if index < len(self.layers) - 1 else self.drop_output(x)
        self.last_state = final
        return F.linear(x, self.embedding.weight, self.decoder_bias)


def mlp(in_features: int, hidden: int, layers: int, classes: int, q: float) -> nn.Sequential:
    """A dropout site with drop probability ``q`` on the input (the analogue of the LSTM's embedding
    site), then ``layers`` hidden ReLU layers of width ``hidden``, each followed by a site, then a
    linear classifier."""
    blocks = [dr.Dropout(q)]
    for index in range(layers):
        blocks += [nn.Linear(in_features if index == 0 else hidden, hidden), nn.ReLU(), dr.Dropout(q)]
    return nn.Sequential(*blocks, nn.Linear(hidden, classes))
