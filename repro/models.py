"""Models of the reproduction, every dropout a :class:`dropreg_ext.Dropout` *site*.

The regularizers differentiate the loss twice (``autograd.grad(create_graph=True)`` and then
``backward()``), so every layer must support double backward. The LSTM layers are therefore
:class:`dropreg_ext.LSTM` (plain tensor ops), as the authors wrote their own ("we need to use own lstm
for second order derivative": cuDNN's LSTM has no double backward). The layers have different widths
(tied decoder), so each is its own one-layer LSTM with its dropout site after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dropreg_ext as dr


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
        self.layers = nn.ModuleList(dr.LSTM(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.drop_embedding = dr.Dropout(q)
        self.drop_between = nn.ModuleList(dr.Dropout(q) for _ in range(nlayers - 1))
        self.drop_output = dr.Dropout(q)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab))
        self.last_state = None

    def initial_state(self, batch: int) -> list:
        w = self.embedding.weight
        return [(w.new_zeros(1, batch, layer.hidden_size), w.new_zeros(1, batch, layer.hidden_size))
                for layer in self.layers]

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
