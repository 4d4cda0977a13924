r"""The training objectives compared by the reproduction (paper §3–5), all on the same model.

Every objective maps ``(model, x, y)`` to a scalar whose ``backward()`` gives the method's update;
the model is in training mode and its dropout layers are :class:`dropreg_ext.Dropout` sites with
drop probability q. With J the cross-entropy of the model without dropout, η a dropout mask and
λ = ½·q/(1−q) (the second-order Taylor coefficient, ``scale=1``; the authors' code uses q/(1−q),
``scale=2``; no per-method tuning):

==========================  ====================================================================
``none``                    J (dropout layers switched off)
``dropout``                 DROPOUT_1: ℓ(F(x, η)) with one mask per step (ordinary dropout)
``dropout_k{k}``            DROPOUT_k: (1/k) Σ_j ℓ(F(x, η_j)); the same mean gradient as dropout,
                            its noise covariance divided by k (Algorithm 1)
``explicit``                J + λ Σ_i R_i, R_i = (1/N) Σ (g_i ⊙ h_i)² with g_i the gradient at site i
                            of the loss on a label ŷ ~ softmax(F(x)) (R_approx: explicit effect only)
``explicit_scale2``         the same with 2λ = q/(1−q), the coefficient of the authors' code
``explicit_identity``       J + λ Σ_i R_i with H_out replaced by I/C (the authors' ``jreg_hess_id``,
                            paper §5.2): g_i the gradient at site i of ⟨v, z⟩, v a Rademacher vector
                            per logit row, and R_i divided by the C classes
``explicit_true``           the same as ``explicit`` with the true label in place of ŷ (R̃_approx,
                            eq. 5.1)
``explicit_implicit``       J + λ Σ_i R_i + T, T = Σ_i ⟨∂J/∂h_i, η_i ⊙ h_i⟩ with Rademacher η_i of
                            variance q/(1−q): R_approx + ξ_approx, both effects (Algorithm 2)
``dropout_k{k}_noise``      DROPOUT_k + √(1−1/k)·ξ_approx: the noise DROPOUT_k removed, put back in
                            its Taylor approximation (Fig. 4, Algorithm 4)
``dropout_k{k}_drop_noise`` DROPOUT_k + √(1−1/k)·ξ̃_drop, ξ̃_drop = (ℓ(F(x, η¹)) − ℓ(F(x, η²)))/√2 with
                            two more fresh masks: the exact dropout noise put back (§3.1, Fig. 2;
                            the authors' ``drop_fix_noise``)
==========================  ====================================================================
"""

from __future__ import annotations

import contextlib
import math
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


def _dropout_k_drop_noise(k: int) -> Objective:
    """DROPOUT_k plus √(1−1/k)·(ℓ(η¹) − ℓ(η²))/√2 from two more dropout forwards: its gradient is the
    exact dropout gradient noise, rescaled to what DROPOUT_k removed (the authors' ``dropout_noise``)."""

    def objective(model: nn.Module, x, y: torch.Tensor) -> torch.Tensor:
        loss = dr.k_sample_loss(model, x, y, k)
        first, second = (cross_entropy(model(x), y) for _ in range(2))
        return loss + math.sqrt(1 - 1 / k) * (first - second) / math.sqrt(2)

    return objective


def _regularizer(explicit, implicit: bool, scale: float = 1.0) -> Objective:
    def objective(model: nn.Module, x, y: torch.Tensor) -> torch.Tensor:
        reg = dr.DropoutRegularizer(model, explicit=explicit, implicit=implicit, scale=scale)
        with reg.capture():
            logits = model(x)
        return reg.loss(logits, y)

    return objective


def _identity_hessian(model: nn.Module, x, y: torch.Tensor) -> torch.Tensor:
    """J + Σ_i λ_i R_i with H_out = I/C in place of diag(p) − ppᵀ: g_i = ∂⟨v, z⟩/∂h_i for a Rademacher v
    (one per logit, E[vvᵀ] = I), R_i = (1/(N·C)) Σ (g_i ⊙ h_i)². The library has no such term (it is a
    baseline, not dropout's regularizer), so it is written here in plain autograd on the captured sites."""
    with dr.record_sites(model) as sites:
        logits = model(x)
    z = logits.reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(z, y.reshape(-1))
    v = torch.randint(0, 2, z.shape, device=z.device, dtype=z.dtype) * 2 - 1
    grads = torch.autograd.grad(z, [s.o for s in sites], v, create_graph=True, allow_unused=True)
    penalty = sum(0.5 * s.q / (1 - s.q) * (g * s.h).square().sum() for s, g in zip(sites, grads) if g is not None)
    return loss + penalty / z.numel()


def make_methods(k_values: tuple = (2, 4, 8), k_noise: int = 8) -> list:
    """The methods in table order: no regularization, DROPOUT_1, DROPOUT_k for each k in
    ``k_values``, the explicit regularizers, explicit + implicit, DROPOUT_{k_noise} + √(1−1/k)·ξ_approx
    and + √(1−1/k)·ξ̃_drop."""
    methods = [
        Method("none", "no regularization", _no_regularization),
        Method("dropout", "dropout (DROPOUT_1)", _dropout_k(1)),
    ]
    methods += [Method(f"dropout_k{k}", f"DROPOUT_{k}", _dropout_k(k), cost=k) for k in k_values]
    methods += [
        Method("explicit", "explicit R_approx (sampled ŷ)", _regularizer("sampled", implicit=False), cost=3),
        Method("explicit_scale2", "explicit R_approx, λ = q/(1−q) (scale=2)",
               _regularizer("sampled", implicit=False, scale=2.0), cost=3),
        Method("explicit_identity", "explicit with H_out = I/C (identity Hessian)", _identity_hessian, cost=3),
        Method("explicit_true", "explicit R̃ (true label)", _regularizer("true", implicit=False), cost=3),
        Method("explicit_implicit", "explicit + implicit (R_approx + ξ)", _regularizer("sampled", implicit=True),
               cost=4),
        Method(
            f"dropout_k{k_noise}_noise",
            f"DROPOUT_{k_noise} + √(1−1/{k_noise})·ξ_approx",
            _dropout_k(k_noise, implicit_correction=True),
            cost=k_noise + 2,
        ),
        Method(f"dropout_k{k_noise}_drop_noise", f"DROPOUT_{k_noise} + √(1−1/{k_noise})·ξ̃_drop (exact noise)",
               _dropout_k_drop_noise(k_noise), cost=k_noise + 2),
    ]
    return methods

