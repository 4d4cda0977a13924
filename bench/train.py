"""End-to-end training steps: the same model trained with torch's dropout, with ours, and with
dropout's explicit + implicit regularizer instead of dropout (plain autograd vs ours).

A *case* (:class:`TrainCase`) builds a model and one batch; a *variant* (:class:`Variant`) decides how
that model is trained: it gets its own deep copy of the model (same initial weights for every
variant), may change it, and returns the loss function of a step. Both live in plain lists,
:data:`CASES` and :data:`VARIANTS`; a new model or a new way of training is one more entry, and the
runner, the table, the JSON and the plots pick it up.

Variants: ``eager`` (``nn.Dropout``, ``F.cross_entropy``), ``dropreg`` (the same with
:func:`dropreg_ext.replace_dropout` and the forward under :func:`dropreg_ext.patch_functional`),
``reg_plain`` (the objective J + Σ λ_i R_i + T of docs/design.md
§2, explicit="sampled" + implicit with Rademacher noise, in plain autograd: the reference's
``regularizer_objective``, tested against the fused one), ``reg_fused`` (the same objective by
:class:`dropreg_ext.DropoutRegularizer` told the model's output layer, ``head=``) and
``reg_fused_generic`` (the same without ``head=``: every cotangent goes through autograd from the
logits). Every model must therefore have a double backward: the LSTM is :class:`dropreg_ext.LSTM`
(plain tensor ops).

One timed step is ``loss_fn(inputs, target).backward(); opt.step(); opt.zero_grad(set_to_none=True)``
with plain SGD; on the CPU a few more steps of each regularized variant run under torch.profiler to
show where the time goes (:func:`phase_rows`). Throughput is ``units_per_step / median step time``
(samples for the MLP, tokens for the language models). Peak memory is the peak of one step above the model and optimizer
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
from torch.profiler import record_function

import dropreg_ext as dr
from dropreg_ext.reference import VJP_RANGE

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


class LSTMLanguageModel(nn.Module):
    """embedding -> dropout -> (one-layer :class:`dropreg_ext.LSTM` -> dropout) x layers -> Linear
    over the vocabulary: dropout on every non-recurrent connection (Zaremba et al.), batch-first
    tokens, each dropout an ``nn.Dropout`` (what the variants replace). The LSTM is in plain ops, which
    have a double backward (cuDNN's fused ``nn.LSTM`` on CUDA has none, and the regularized variants
    differentiate twice)."""

    def __init__(self, vocab: int, dim: int, layers: int, p: float = 0.5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.drop_in = nn.Dropout(p)
        self.layers = nn.ModuleList(dr.LSTM(dim, dim) for _ in range(layers))
        self.drops = nn.ModuleList(nn.Dropout(p) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.drop_in(self.embed(tokens)).transpose(0, 1)  # (T, B, dim): the layer is time-major
        for layer, drop in zip(self.layers, self.drops):
            x = drop(layer(x)[0])
        return self.head(x.transpose(0, 1))


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
    variants: tuple = ()  # the variants to run (names); empty: all of VARIANTS
    available: Callable[[], bool] = lambda: True  # False: the case is left out (a missing optional package)


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


class GPT2LM(nn.Module):
    """Hugging Face's GPT-2 (random weights, ``attn_implementation="eager"``: the attention probabilities,
    B·H·T² elements per layer, go through ``nn.functional.dropout``, where torch's dropout keeps a mask)
    returning logits."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int, p: float = 0.1) -> None:
        super().__init__()
        import transformers

        config = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=dim, n_layer=layers, n_head=heads,
                                         resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, attn_implementation="eager")
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits


def _gpt2_workload(device: torch.device, vocab: int, dim: int, layers: int, heads: int, batch: int,
                   seq: int) -> Workload:
    return _token_workload(GPT2LM(vocab, dim, layers, heads, seq), device, vocab, batch, seq)


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


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
    # The row users quote: torch's dropout vs ours in a real model (time and peak memory); the
    # regularized variants are the other cases' business.
    TrainCase(
        "gpt2_eager_attention",
        "tokens",
        {
            "small": dict(vocab=8192, dim=256, layers=4, heads=8, batch=4, seq=512),
            "large": dict(vocab=50257, dim=768, layers=12, heads=12, batch=8, seq=512),
        },
        _gpt2_workload,
        variants=("eager", "dropreg"),
        available=_has_transformers,
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
    """replace_dropout, and the forward under patch_functional (Hugging Face's eager attention drops the
    attention probabilities with ``nn.functional.dropout``; the other models make no such call)."""
    if dr.replace_dropout(model) == 0:
        raise RuntimeError("the model has no torch.nn.Dropout to replace")
    cross_entropy = _cross_entropy(model)

    def loss_fn(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with dr.patch_functional():
            return cross_entropy(inputs, target)

    return loss_fn


def _output_layer(model: nn.Module) -> nn.Linear:
    """The Linear layer that produces the logits: ``model.head``, or an ``nn.Sequential``'s last layer."""
    head = model.head if hasattr(model, "head") else model[-1]
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the model's output layer must be an nn.Linear, got {type(head).__name__}")
    return head


def _regularized(model: nn.Module, head: bool) -> LossFn:
    """Ours: :class:`dropreg_ext.DropoutRegularizer` (explicit="sampled", implicit=True) on the
    model's dropout sites, which stop dropping under ``capture()``; with ``head``, told the model's
    output layer (``head=``), so that the implicit term's cotangent needs no product with its weight."""
    if dr.replace_dropout(model) == 0:
        raise RuntimeError("the model has no torch.nn.Dropout to replace")
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True, head=_output_layer(model) if head else None)

    def loss_fn(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with record_function(FORWARD), reg.capture():
            logits = model(inputs)
        with record_function(OBJECTIVE):
            return reg.loss(logits, target)

    return loss_fn


def _regularized_fused(model: nn.Module) -> LossFn:
    return _regularized(model, head=True)


def _regularized_fused_generic(model: nn.Module) -> LossFn:
    return _regularized(model, head=False)


def _regularized_plain(model: nn.Module) -> LossFn:
    """The same objective as :func:`_regularized_fused` in plain autograd:
    :func:`dropreg_ext.reference.regularizer_objective` on the sites of
    :func:`dropreg_ext.record_sites` (the mechanism ``DropoutRegularizer.capture`` uses), with ŷ by
    ``torch.multinomial`` and η by ``torch.randint``: the authors' way of writing it."""
    if dr.replace_dropout(model) == 0:
        raise RuntimeError("the model has no torch.nn.Dropout to replace")

    def loss_fn(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with record_function(FORWARD), dr.record_sites(model) as sites:
            logits = model(inputs)
        with record_function(OBJECTIVE):
            J, explicit, implicit, _ = dr.reference.regularizer_objective(logits, target, sites)
            return J + explicit + implicit

    return loss_fn


EAGER = "eager"
REG_FUSED = "reg_fused"
REG_FUSED_GENERIC = "reg_fused_generic"
REG_PLAIN = "reg_plain"
VARIANTS = [
    Variant(EAGER, _cross_entropy),
    Variant("dropreg", _with_our_dropout),
    Variant(REG_PLAIN, _regularized_plain),
    Variant(REG_FUSED, _regularized_fused),
    Variant(REG_FUSED_GENERIC, _regularized_fused_generic),
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
        loss = loss_fn(work.inputs, work.target)
        with record_function(BACKWARD):
            loss.backward()
        with record_function(OPTIMIZER):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------------------------------
# Where a regularized step's time goes: profiler ranges around its phases
# ---------------------------------------------------------------------------------------------

# The ranges of one step (record_function labels): the model's forward, the objective (the loss
# and the regularizer's terms, which includes the first-order VJPs), the backward (a double backward
# for the regularized variants) and the optimizer. VJP is the regularizer's own range around its
# first-order autograd.grad calls (dropreg_ext.regularizer.VJP_RANGE, also used by the reference).
FORWARD, OBJECTIVE, BACKWARD, OPTIMIZER = "step.forward", "step.objective", "step.backward", "step.optimizer"
PHASES = {"forward": FORWARD, "objective": OBJECTIVE, "first-order VJPs": VJP_RANGE, "backward": BACKWARD,
          "optimizer": OPTIMIZER}
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")
PROFILED_STEPS = 3


def phase_rows(case: TrainCase, steps: dict) -> list:
    """Per regularized variant of ``steps``: the milliseconds per step of each phase (wall time of its
    range on the main thread), of our kernels (self time of the ``dropreg::`` ops, all phases) and of
    the matrix products (all phases), from ``PROFILED_STEPS`` steps under torch.profiler (CPU: the
    profiler's own overhead is included, so the phases add up to more than the timed step)."""
    rows = []
    for name in (REG_PLAIN, REG_FUSED, REG_FUSED_GENERIC):
        if name not in steps:
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED_STEPS):
                steps[name]()
        events = prof.key_averages()
        by_key = {e.key: e for e in events}

        def per_step(us: float) -> float:
            return us / 1e3 / PROFILED_STEPS

        row = {"section": "train_phases", "case": case.name, "provider": name}
        for phase, label in PHASES.items():
            row[phase] = per_step(by_key[label].cpu_time_total) if label in by_key else 0.0
        row["our kernels"] = per_step(sum(e.self_cpu_time_total for e in events if e.key.startswith("dropreg::")))
        row["matmuls"] = per_step(sum(e.self_cpu_time_total for e in events if e.key in MATMULS))
        rows.append(row)
    return rows


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
    steps = {variant.name: make_step(variant, work) for variant in VARIANTS
             if not case.variants or variant.name in case.variants}
    timings = time_fns(steps, cfg.device, cfg.train_reps)
    rows = []
    for name, step in steps.items():
        rows.append(_row(case, name, work, timings[name], peak_bytes(step, cfg.device)))
    by_name = {r["provider"]: r for r in rows}
    for row in rows:
        row["speedup_vs_eager"] = by_name[EAGER]["median_ms"] / row["median_ms"]
        if row["provider"] in (REG_FUSED, REG_FUSED_GENERIC, REG_PLAIN) and REG_PLAIN in by_name:
            row["speedup_vs_reg_plain"] = by_name[REG_PLAIN]["median_ms"] / row["median_ms"]
    if cfg.device.type == "cpu":  # on a GPU the ranges' CPU times are launch times
        rows += phase_rows(case, steps)
    return rows


def run(cfg: Config, progress: Callable[[str], None]) -> list:
    """Every case under every variant (variants timed in interleaved rounds); ``progress(label)``
    is called before each case."""
    return [row for case in CASES if case.available() for row in run_case(case, cfg, progress)]
