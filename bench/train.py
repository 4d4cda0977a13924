"""End-to-end training steps: the same model trained with torch's dropout, with ours, and with
dropout's explicit + implicit regularizer instead of dropout (plain autograd vs ours).

A *case* (:class:`TrainCase`) builds a model and one batch; a *variant* (:class:`Variant`) decides how
that model is trained: it gets its own deep copy of the model (same initial weights for every
variant), may change it, and returns the loss function of a step. Both live in plain lists,
:data:`CASES` and :data:`VARIANTS`; a new model or a new way of training is one more entry, and the
runner, the table, the JSON and the plots pick it up.

Variants: ``eager`` (``nn.Dropout``, ``F.cross_entropy``), ``dropreg`` (the same with
:func:`dropreg_ext.replace_dropout`), ``reg_plain`` (the objective J + Σ λ_i R_i + T of DESIGN.md §2,
explicit="sampled" + implicit with Rademacher noise, in plain autograd: :func:`plain_objective`) and
``reg_fused`` (the same objective by :class:`dropreg_ext.DropoutRegularizer`). Every model must
therefore have a double backward: the LSTM is written in plain ops (:class:`LSTMLayer`).

One timed step is ``loss_fn(inputs, target).backward(); opt.step(); opt.zero_grad(set_to_none=True)``
with plain SGD. Throughput is ``units_per_step / median step time`` (samples for the MLP, tokens
for the language models). Peak memory is the peak of one step above the model and optimizer
state (gradients are freed at the end of each step, so they count inside it).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import dropreg_ext as dr

from .config import Config, dtype_name
from .measure import Timing, peak_bytes, time_fns

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def mlp(in_features: int, hidden: int, classes: int) -> nn.Module:
    """The dropout-paper MLP: dropout 0.2 on the input, 0.5 after each hidden ReLU layer."""
    return nn.Sequential(
        nn.Dropout(0.2),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, classes),
    )


class _Stack(torch.autograd.Function):
    """``torch.stack(tensors, dim)`` with ``grad.unbind(dim)`` as its (differentiable) backward. Torch's
    own stack backward selects each slice, and the double backward of T selects zero-fills and adds T
    full-size tensors: O(T²) work per step of the regularized variants, which unbind's backward (one
    stack) avoids."""

    @staticmethod
    def forward(ctx, dim: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.dim = dim
        return torch.stack(tensors, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return (None, *grad.unbind(ctx.dim))


class LSTMLayer(nn.Module):
    r"""One LSTM layer over a batch-first sequence, in plain torch ops, so that it has a double
    backward (the regularized variants differentiate the model twice; cuDNN's fused ``nn.LSTM`` on
    CUDA has no double backward). Gates in ``nn.LSTM``'s order and initialization::

        [i f g o] = W_ih x_t + b + W_hh h_{t-1},   c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g),   h_t = σ(o) ⊙ tanh(c_t)

    The input projection of all T steps is one matrix product; the loop does one ``addmm`` per step.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = x.new_zeros(x.shape[0], self.hidden_size)
        w_hh = self.weight_hh.t()
        outputs = []
        # unbind, not xw[:, t]: its backward is one stack, not T zero-filled copies
        for xw_t in F.linear(x, self.weight_ih, self.bias).unbind(1):
            i, f, g, o = torch.addmm(xw_t, h, w_hh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return _Stack.apply(1, *outputs)


class LSTMLanguageModel(nn.Module):
    """embedding -> dropout -> (:class:`LSTMLayer` -> dropout) x layers -> Linear over the vocabulary:
    dropout on every non-recurrent connection (Zaremba et al.), batch-first tokens."""

    def __init__(self, vocab: int, dim: int, layers: int, p: float = 0.5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.drop_in = nn.Dropout(p)
        self.lstm = nn.Sequential(*(m for _ in range(layers) for m in (LSTMLayer(dim, dim), nn.Dropout(p))))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.drop_in(self.embed(tokens))))


class TransformerBlock(nn.Module):
    """Pre-norm encoder block with every dropout as an ``nn.Dropout`` module: on the attention
    probabilities, on both residual branches and inside the feed-forward (``nn.TransformerEncoderLayer``
    applies its attention dropout inside ``F.multi_head_attention_forward``, out of a module's reach)."""

    def __init__(self, dim: int, heads: int, ff: int, p: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(p)
        self.proj = nn.Linear(dim, dim)
        self.resid_drop1 = nn.Dropout(p)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Dropout(p), nn.Linear(ff, dim))
        self.resid_drop2 = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = self.attn_drop((q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1))
        x = x + self.resid_drop1(self.proj((att @ v).transpose(1, 2).reshape(b, t, d)))
        return x + self.resid_drop2(self.ff(self.norm2(x)))


class TransformerTagger(nn.Module):
    """embedding -> one :class:`TransformerBlock` -> Linear over the vocabulary, per token."""

    def __init__(self, vocab: int, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = TransformerBlock(dim, heads, ff)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(tokens)))


# ---------------------------------------------------------------------------------------------
# Cases: a model and one batch, at a "small" (CPU) or "large" (GPU) scale
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    model: nn.Module
    inputs: torch.Tensor
    target: torch.Tensor
    units_per_step: int


@dataclasses.dataclass(frozen=True)
class TrainCase:
    name: str
    unit: str  # what throughput counts: "samples" or "tokens"
    sizes: dict  # scale ("small" | "large") -> keyword arguments of build
    build: Callable[..., Workload]


def _mlp_workload(device: torch.device, batch: int, hidden: int) -> Workload:
    model = mlp(784, hidden, 10)
    x = torch.randn(batch, 784, device=device)
    return Workload(model, x, torch.randint(0, 10, (batch,), device=device), batch)


def _token_workload(model: nn.Module, device: torch.device, vocab: int, batch: int, seq: int) -> Workload:
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
    return Workload(model, tokens[:, :-1], tokens[:, 1:], batch * seq)


def _lstm_workload(device: torch.device, vocab: int, dim: int, layers: int, batch: int, seq: int) -> Workload:
    return _token_workload(LSTMLanguageModel(vocab, dim, layers), device, vocab, batch, seq)


def _transformer_workload(
    device: torch.device, vocab: int, dim: int, heads: int, ff: int, batch: int, seq: int
) -> Workload:
    return _token_workload(TransformerTagger(vocab, dim, heads, ff), device, vocab, batch, seq)


CASES = [
    TrainCase(
        "mlp",
        "samples",
        {"small": dict(batch=256, hidden=2048), "large": dict(batch=4096, hidden=4096)},
        _mlp_workload,
    ),
    TrainCase(
        "lstm_lm",
        "tokens",
        {
            "small": dict(vocab=10_000, dim=200, layers=1, batch=20, seq=35),
            "large": dict(vocab=10_000, dim=1024, layers=2, batch=64, seq=70),
        },
        _lstm_workload,
    ),
    TrainCase(
        "transformer_block",
        "tokens",
        {
            "small": dict(vocab=2_000, dim=256, heads=4, ff=1024, batch=8, seq=64),
            "large": dict(vocab=10_000, dim=1024, heads=16, ff=4096, batch=16, seq=512),
        },
        _transformer_workload,
    ),
]


# ---------------------------------------------------------------------------------------------
# Variants: how a case's model is trained
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """``setup(model)`` receives a private copy of the case's model, may modify it in place, and
    returns the step's loss function ``loss_fn(inputs, target)``."""

    name: str
    setup: Callable[[nn.Module], LossFn]


def _cross_entropy(model: nn.Module) -> LossFn:
    def loss_fn(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    return loss_fn


def _with_our_dropout(model: nn.Module) -> LossFn:
    if dr.replace_dropout(model) == 0:
        raise RuntimeError("the model has no torch.nn.Dropout to replace")
    return _cross_entropy(model)


def _regularized_fused(model: nn.Module) -> LossFn:
    """Ours: :class:`dropreg_ext.DropoutRegularizer` (explicit="sampled", implicit=True) on the
    model's dropout sites, which stop dropping under ``capture()``."""
    if dr.replace_dropout(model) == 0:
        raise RuntimeError("the model has no torch.nn.Dropout to replace")
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True)

    def loss_fn(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with reg.capture():
            logits = model(inputs)
        return reg.loss(logits, target)

    return loss_fn


class SiteRecorder(nn.Module):
    """Stands in for an ``nn.Dropout`` under :func:`plain_objective`: it does not drop, but passes h
    through a fresh autograd node ``o = h.view_as(h)`` (a leaf when h needs no gradient) and appends
    ``(h, o, p)`` to the shared list ``sites``, so that gradients w.r.t. o are taken *at the site*."""

    def __init__(self, p: float, sites: list) -> None:
        super().__init__()
        self.p = p
        self.sites = sites

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        o = h.view_as(h) if h.requires_grad else h.detach().requires_grad_()
        self.sites.append((h, o, self.p))
        return o


def plain_objective(logits: torch.Tensor, target: torch.Tensor, sites: list) -> torch.Tensor:
    """``J + Σ_i λ_i R_i + T`` of DESIGN.md §2 (explicit="sampled", implicit, Rademacher noise) in plain
    autograd, the baseline of the fused regularizer::

        J = CE(z, y) (mean),   ŷ ~ softmax(z) (detached),   g_e = ∂ Σ_r CE(z_r, ŷ_r) / ∂o,   g_i = ∂J / ∂o
        R_i = λ_i Σ (g_e ⊙ h)² / N,   λ_i = ½ q/(1-q),   T = Σ_i Σ g_i ⊙ η ⊙ h,   η = ±sqrt(q/(1-q))

    both gradients with ``create_graph=True``, so that ``backward()`` differentiates through them.
    """
    z = logits.reshape(-1, logits.shape[-1])
    y = target.reshape(-1)
    J = F.cross_entropy(z, y)
    yhat = torch.multinomial(torch.softmax(z.detach(), dim=-1), 1).squeeze(1)
    outs = [o for _, o, _ in sites]
    g_e = torch.autograd.grad(F.cross_entropy(z, yhat, reduction="sum"), outs, create_graph=True)
    g_i = torch.autograd.grad(J, outs, create_graph=True)
    explicit = implicit = J.new_zeros(())
    for (h, _, q), ge, gi in zip(sites, g_e, g_i):
        sign = torch.randint(0, 2, h.shape, device=h.device, dtype=h.dtype) * 2 - 1
        eta = sign * math.sqrt(q / (1 - q))
        explicit = explicit + 0.5 * q / (1 - q) * ((ge * h) ** 2).sum()
        implicit = implicit + (gi * eta * h).sum()
    sites.clear()
    return J + explicit / z.shape[0] + implicit


def _regularized_plain(model: nn.Module) -> LossFn:
    """The same objective as :func:`_regularized_fused`, by :func:`plain_objective`: every
    ``nn.Dropout`` of the model becomes a :class:`SiteRecorder`."""
    sites: list = []
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, SiteRecorder(child.p, sites))
                count += 1
    if count == 0:
        raise RuntimeError("the model has no torch.nn.Dropout to replace")

    def loss_fn(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sites.clear()
        return plain_objective(model(inputs), target, sites)

    return loss_fn


EAGER = "eager"
REG_FUSED = "reg_fused"
REG_PLAIN = "reg_plain"
VARIANTS = [
    Variant(EAGER, _cross_entropy),
    Variant("dropreg", _with_our_dropout),
    Variant(REG_PLAIN, _regularized_plain),
    Variant(REG_FUSED, _regularized_fused),
]


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------


def make_step(variant: Variant, work: Workload) -> Callable[[], None]:
    """One SGD training step of ``variant`` on a fresh copy of the workload's model."""
    model = copy.deepcopy(work.model).train()
    loss_fn = variant.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        loss_fn(work.inputs, work.target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _row(case: TrainCase, variant: str, work: Workload, timing: Timing, peak: int) -> dict:
    return {
        "section": "train",
        "case": case.name,
        "provider": variant,
        "mode": "step",
        "dtype": dtype_name(next(work.model.parameters()).dtype),
        **dataclasses.asdict(timing),
        "unit": case.unit,
        "units_per_step": work.units_per_step,
        "throughput": work.units_per_step / (timing.median_ms / 1e3),
        "peak_bytes": peak,
    }


def run_case(case: TrainCase, cfg: Config, progress: Callable[[str], None]) -> list:
    torch.manual_seed(0)
    work = case.build(cfg.device, **case.sizes[cfg.train_scale])
    work.model.to(cfg.device)
    progress(f"train {case.name}")
    steps = {variant.name: make_step(variant, work) for variant in VARIANTS}
    timings = time_fns(steps, cfg.device, cfg.train_reps)
    rows = []
    for name, step in steps.items():
        rows.append(_row(case, name, work, timings[name], peak_bytes(step, cfg.device)))
    by_name = {r["provider"]: r for r in rows}
    for row in rows:
        row["speedup_vs_eager"] = by_name[EAGER]["median_ms"] / row["median_ms"]
        if row["provider"] in (REG_FUSED, REG_PLAIN) and REG_PLAIN in by_name:
            row["speedup_vs_reg_plain"] = by_name[REG_PLAIN]["median_ms"] / row["median_ms"]
    return rows


def run(cfg: Config, progress: Callable[[str], None]) -> list:
    """Every case under every variant (variants timed in interleaved rounds); ``progress(label)``
    is called before each case."""
    return [row for case in CASES for row in run_case(case, cfg, progress)]
