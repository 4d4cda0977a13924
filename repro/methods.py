r"""The training objectives compared by the reproduction (paper §3–5), all on the same model.

Every objective maps ``(model, x, y)`` to a scalar whose ``backward()`` gives the method's update;
the model is in training mode and its dropout layers are :class:`dropreg_ext.Dropout` sites with
drop probability q. With J the cross-entropy of the model without dropout, η a dropout mask and
λ = ½·q/(1−q) (the Taylor coefficient, ``scale=1``: no per-method tuning):

========================  ====================================================================
``none``                  J (dropout layers switched off)
``dropout``               DROPOUT_1: ℓ(F(x, η)) with one mask per step (ordinary dropout)
``dropout_k{k}``          DROPOUT_k: (1/k) Σ_j ℓ(F(x, η_j)); the same mean gradient as dropout,
                          its noise covariance divided by k (Algorithm 1)
``explicit``              J + λ Σ_i R_i, R_i = (1/N) Σ (g_i ⊙ h_i)² with g_i the gradient at site i
                          of the loss on a label ŷ ~ softmax(F(x)) (R_approx: explicit effect only)
``explicit_true``         the same with the true label in place of ŷ (R̃_approx, eq. 5.1)
``explicit_implicit``     J + λ Σ_i R_i + T, T = Σ_i ⟨∂J/∂h_i, η_i ⊙ h_i⟩ with Rademacher η_i of
                          variance q/(1−q): R_approx + ξ_approx, both effects (Algorithm 2)
``dropout_k{k}_noise``    DROPOUT_k + √(1−1/k)·ξ_approx: the noise DROPOUT_k removed, put back
                          (Algorithm 4)
========================  ====================================================================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import dropreg_ext as dr

Objective = Callable[[nn.Module, object, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A named training objective: ``objective(model, x, y)`` returns the loss to backpropagate.
    ``cost`` is a rough step cost relative to dropout, used only to start long runs first when runs
    go to parallel workers."""

    name: str
    label: str
    objective: Objective
    cost: float = 1.0


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """Switch the model's :class:`dropreg_ext.Dropout` layers to identity (eval mode) for a block."""
    layers = [m for m in model.modules() if isinstance(m, dr.Dropout) and m.training]
    for layer in layers:
        layer.eval()
    try:
        yield
    finally:
        for layer in layers:
            layer.train()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all positions of (..., C) logits and (...) targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _no_regularization(model: nn.Module, x, y: torch.Tensor) -> torch.Tensor:
    with dropout_off(model):
        return cross_entropy(model(x), y)


def _dropout_k(k: int, implicit_correction: bool = False) -> Objective:
    def objective(model: nn.Module, x, y: torch.Tensor) -> torch.Tensor:
        return dr.k_sample_loss(model, x, y, k, implicit_correction=implicit_correction)

    return objective


def _regularizer(explicit, implicit: bool) -> Objective:
    def objective(model: nn.Module, x, y: torch.Tensor) -> torch.Tensor:
        reg = dr.DropoutRegularizer(model, explicit=explicit, implicit=implicit)
        with reg.capture():
            logits = model(x)
        return reg.loss(logits, y)

    return objective


def make_methods(k_values: tuple = (2, 4, 8), k_noise: int = 8) -> list:
    """The methods in table order: no regularization, DROPOUT_1, DROPOUT_k for each k in
    ``k_values``, the explicit regularizers, explicit + implicit, DROPOUT_{k_noise} + √(1−1/k)·ξ."""
    methods = [
        Method("none", "no regularization", _no_regularization),
        Method("dropout", "dropout (DROPOUT_1)", _dropout_k(1)),
    ]
    methods += [Method(f"dropout_k{k}", f"DROPOUT_{k}", _dropout_k(k), cost=k) for k in k_values]
    methods += [
        Method("explicit", "explicit R_approx (sampled ŷ)", _regularizer("sampled", implicit=False), cost=3),
        Method("explicit_true", "explicit R̃ (true label)", _regularizer("true", implicit=False), cost=3),
        Method("explicit_implicit", "explicit + implicit (R_approx + ξ)", _regularizer("sampled", implicit=True),
               cost=4),
        Method(
            f"dropout_k{k_noise}_noise",
            f"DROPOUT_{k_noise} + √(1−1/{k_noise})·ξ",
            _dropout_k(k_noise, implicit_correction=True),
            cost=k_noise + 2,
        ),
    ]
    return methods

