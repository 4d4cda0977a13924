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
logits) and, on CUDA only, ``reg_fused_graph`` (the ``reg_fused`` step captured whole in a CUDA graph
and replayed: :func:`capture_step`). The regularized forwards run under
:func:`dropreg_ext.patch_functional`, so that dropout called as a function (Hugging Face's eager
attention) is a site too. Every model must have a double backward: the LSTM is
:class:`dropreg_ext.LSTM` (plain tensor ops).

One timed step is ``loss_fn(inputs, target).backward(); opt.step(); opt.zero_grad(set_to_none=True)``
with plain SGD. On a GPU it runs as its users train (:attr:`bench.config.Config.train_autocast`): the
forward and the loss under ``torch.autocast`` to bfloat16, the backward and the update outside it,
and TF32 for the float32 matrix products that remain. A few more steps of each regularized variant
run under torch.profiler to show where the time goes (:func:`phase_rows`: host time of each phase on
the CPU, device time of the kernels each phase launches on a GPU). Throughput is
``units_per_step / median step time`` (samples for the MLP, tokens for the language models). Peak
memory is the peak of one step above the model and optimizer state (gradients are freed at the end of
each step, so they count inside it; a captured step's is that of its capture, whose memory the graph
keeps).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import record_function

import dropreg_ext as dr
from dropreg_ext.reference import VJP_RANGE

from .checks import (
    DROPREG,
    EAGER,
    GPT2_REG_CASE,
    LSTM_CASE,
    REG_FUSED,
    REG_FUSED_GENERIC,
    REG_FUSED_GRAPH,
    REG_PLAIN,
    WHOLE_CASE,
)
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
    variants: tuple = ()  # the variants to run (names); empty: every variant of VARIANTS that is not captured
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
    returning logits; :attr:`head` is its output layer, ``lm_head`` (tied to the token embedding)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int, p: float = 0.1) -> None:
        super().__init__()
        import transformers

        config = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=dim, n_layer=layers, n_head=heads,
                                         resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, attn_implementation="eager")
        self.model = transformers.GPT2LMHeadModel(config)

    @property
    def head(self) -> nn.Linear:
        return self.model.lm_head

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


# GPT-2 small (124M parameters) on a batch of 8 x 512 tokens: the "large" scale of both GPT-2 cases.
GPT2_SMALL = dict(vocab=50257, dim=768, layers=12, heads=12, batch=8, seq=512)

CASES = [
    # The cases the GPU verdict judges (bench/checks.py, gpu_verdict) come first, so that a run cut short
    # by bench/gpu_check.sh's time limit has measured them.
    # Launch-bound on a GPU (thousands of small ops per step): also as one captured CUDA graph.
    TrainCase(
        LSTM_CASE,
        "tokens",
        {
            "small": dict(vocab=10_000, dim=200, layers=1, batch=20, seq=35),
            "large": dict(vocab=10_000, dim=1024, layers=2, batch=64, seq=70),
        },
        _lstm_workload,
        variants=(EAGER, DROPREG, REG_PLAIN, REG_FUSED, REG_FUSED_GENERIC, REG_FUSED_GRAPH),
    ),
    # GPT-2 small (at "large") regularized: every dropout a site, the attention probabilities' through
    # patch_functional, head= its lm_head. "small" is a few-layer GPT-2 that fits the CPU budget.
    TrainCase(
        GPT2_REG_CASE,
        "tokens",
        {
            "small": dict(vocab=4096, dim=128, layers=2, heads=4, batch=4, seq=128),
            "large": GPT2_SMALL,
        },
        _gpt2_workload,
        variants=(EAGER, REG_PLAIN, REG_FUSED),
        available=_has_transformers,
    ),
    TrainCase(
        "mlp",
        "samples",
        {"small": dict(batch=256, hidden=2048), "large": dict(batch=4096, hidden=4096)},
        _mlp_workload,
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
            "large": GPT2_SMALL,
        },
        _gpt2_workload,
        variants=(EAGER, DROPREG),
        available=_has_transformers,
    ),
]


# ---------------------------------------------------------------------------------------------
# Variants: how a case's model is trained
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """``setup(model)`` receives a private copy of the case's model, may modify it in place, and
    returns the step's loss function ``loss_fn(inputs, target)``. ``captured``: the whole step is
    captured in a CUDA graph and replayed (:func:`capture_step`; CUDA only)."""

    name: str
    setup: Callable[[nn.Module], LossFn]
    captured: bool = False

    def runs_on(self, device: torch.device) -> bool:
        return device.type == "cuda" or not self.captured


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
    model's dropout sites, which stop dropping under ``capture()`` (the functional ones too, under
    ``patch_functional``); with ``head``, told the model's output layer (``head=``), so that the
    implicit term's cotangent needs no product with its weight."""
    if dr.replace_dropout(model) == 0:
        raise RuntimeError("the model has no torch.nn.Dropout to replace")
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True, head=_output_layer(model) if head else None)

    def loss_fn(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with record_function(FORWARD), dr.patch_functional(), reg.capture():
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
        with record_function(FORWARD), dr.patch_functional(), dr.record_sites(model) as sites:
            logits = model(inputs)
        with record_function(OBJECTIVE):
            J, explicit, implicit, _ = dr.reference.regularizer_objective(logits, target, sites)
            return J + explicit + implicit

    return loss_fn


VARIANTS = [
    Variant(EAGER, _cross_entropy),
    Variant(DROPREG, _with_our_dropout),
    Variant(REG_PLAIN, _regularized_plain),
    Variant(REG_FUSED, _regularized_fused),
    Variant(REG_FUSED_GENERIC, _regularized_fused_generic),
    Variant(REG_FUSED_GRAPH, _regularized_fused, captured=True),
]
REGULARIZED = (REG_PLAIN, REG_FUSED, REG_FUSED_GENERIC, REG_FUSED_GRAPH)


def case_variants(case: TrainCase) -> list:
    """The variants ``case`` runs, in the order of VARIANTS."""
    return [v for v in VARIANTS if v.name in case.variants or (not case.variants and not v.captured)]


def cuda_only_variants() -> list:
    """(case, variant name) of every variant that runs on CUDA only."""
    return [(case.name, v.name) for case in CASES for v in case_variants(case) if not v.runs_on(torch.device("cpu"))]


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------


def precision(cfg: Config) -> str:
    """How the steps' arithmetic runs, as a row field: ``float32``, or ``bfloat16 autocast + tf32``."""
    parts = [f"{cfg.train_autocast} autocast"] if cfg.train_autocast else []
    parts += ["tf32"] if cfg.train_tf32 else []
    return " + ".join(parts) or "float32"


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 for float32 matrix products inside the block (``torch.set_float32_matmul_precision("high")``,
    the flag in a form every supported torch takes), the previous setting restored after it."""
    previous = torch.get_float32_matmul_precision()
    if enabled:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def capture_step(update: Callable[[], None], opt: torch.optim.Optimizer, warmup: int = 3) -> "CapturedStep":
    """``update`` (forward, loss, backward, optimizer step) captured in one CUDA graph, as torch's CUDA
    semantics notes capture a whole network: warm-up iterations on a side stream, the gradients set
    to None before the capture (so that the captured backward allocates them from the graph's private
    pool and each replay overwrites them), the capture, then replays. The inputs and parameters are
    static tensors, as the graph needs; each replay draws fresh masks and noise (the ops reserve
    their generator offsets graph-safely)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            opt.zero_grad(set_to_none=True)
            update()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.cuda.graph(graph):
        update()
    torch.cuda.synchronize()
    return CapturedStep(graph, torch.cuda.max_memory_allocated() - base)


@dataclasses.dataclass(eq=False)  # hashable by identity: the timer keys its batch sizes by the function
class CapturedStep:
    """A captured step: calling it replays the graph. ``peak_bytes``: the peak of its capture above
    what was live before it (a replay allocates nothing: the graph keeps its memory)."""

    graph: "torch.cuda.CUDAGraph"
    peak_bytes: int

    def __call__(self) -> None:
        self.graph.replay()


def make_step(variant: Variant, work: Workload, cfg: Config) -> Callable[[], None]:
    """One SGD training step of ``variant`` on a fresh copy of the workload's model: the forward and
    the loss under autocast where ``cfg`` asks for it, the backward and the update outside it."""
    model = copy.deepcopy(work.model).train()
    loss_fn = variant.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    dtype = getattr(torch, cfg.train_autocast) if cfg.train_autocast else None

    def update() -> None:
        with torch.autocast(cfg.device.type, dtype, enabled=dtype is not None):
            loss = loss_fn(work.inputs, work.target)
        with record_function(BACKWARD):
            loss.backward()
        with record_function(OPTIMIZER):
            opt.step()

    if variant.captured:
        return capture_step(update, opt)

    def step() -> None:
        update()
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
PROFILED_STEPS = {"cpu": 3, "cuda": 1}  # on a GPU, device times vary little and the traces are long


def host_phase_ms(events: list) -> dict:
    """Milliseconds of each phase (wall time of its range on the main thread), of our kernels (self
    time of the ``dropreg::`` ops) and of the matrix products, summed over ``events`` (the profiler's
    ``key_averages()``): the CPU, where the ops run where they are called."""
    by_key = {e.key: e for e in events}
    row = {phase: by_key[label].cpu_time_total / 1e3 if label in by_key else 0.0 for phase, label in PHASES.items()}
    row["our kernels"] = sum(e.self_cpu_time_total for e in events if e.key.startswith("dropreg::")) / 1e3
    row["matmuls"] = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e3
    return row


def _names_up(event) -> Iterator[str]:
    """The names of ``event`` and of the ops it was called from (on its thread)."""
    while event is not None:
        yield event.name
        event = event.cpu_parent


def device_phase_ms(events: list) -> dict:
    """Milliseconds of device time of the kernels launched in each phase, by our ops and by the
    matrix products, from the profiler's ``events()`` (CPU and CUDA activity). A kernel belongs to the
    op that launched it (the profiler links them) and to every phase whose range, on the host clock,
    holds that op's start: the backward's ops run on the autograd engine's thread, not inside the
    main thread's range, but while it waits in it. Nested phases (the VJPs in the objective) both
    count it, as on the CPU. Our kernels: launched by a ``dropreg::`` op or an op it called; matmuls:
    launched by a matrix product op itself (not, say, a copy that ``aten::matmul`` makes)."""
    host = [e for e in events if e.device_type == DeviceType.CPU]
    spans = {phase: [e.time_range for e in host if e.name == label] for phase, label in PHASES.items()}
    us = dict.fromkeys([*PHASES, "our kernels", "matmuls"], 0.0)
    for event in host:
        if not event.kernels:
            continue
        kernel_us = sum(k.duration for k in event.kernels)
        start = event.time_range.start
        for phase, ranges in spans.items():
            if any(r.start <= start <= r.end for r in ranges):
                us[phase] += kernel_us
        us["our kernels"] += kernel_us if any(n.startswith("dropreg::") for n in _names_up(event)) else 0.0
        us["matmuls"] += kernel_us if event.name in MATMULS else 0.0
    return {key: value / 1e3 for key, value in us.items()}


def phase_rows(case: TrainCase, steps: dict, device: torch.device) -> list:
    """Per eager regularized variant of ``steps``: milliseconds per step of each phase, of our kernels
    (the ``dropreg::`` ops, all phases) and of the matrix products (all phases), from a few steps under
    torch.profiler. ``clock``: ``host`` on the CPU (wall time of the ranges and self time of the ops;
    the profiler's own overhead is included, so the phases add up to more than the timed step),
    ``device`` on a GPU (the kernels' time, :func:`device_phase_ms`)."""
    rows = []
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    count = PROFILED_STEPS[device.type]
    for name in (REG_PLAIN, REG_FUSED, REG_FUSED_GENERIC):
        if name not in steps:
            continue
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(count):
                steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        ms = device_phase_ms(prof.events()) if device.type == "cuda" else host_phase_ms(prof.key_averages())
        rows.append({"section": "train_phases", "case": case.name, "provider": name,
                     "clock": "device" if device.type == "cuda" else "host",
                     **{key: value / count for key, value in ms.items()}})
    return rows


def _row(case: TrainCase, variant: str, work: Workload, timing: Timing, peak: int, cfg: Config) -> dict:
    return {
        "section": "train",
        "case": case.name,
        "provider": variant,
        "mode": "step",
        "dtype": dtype_name(next(work.model.parameters()).dtype),
        "precision": precision(cfg),
        **dataclasses.asdict(timing),
        "unit": case.unit,
        "units_per_step": work.units_per_step,
        "throughput": work.units_per_step / (timing.median_ms / 1e3),
        "peak_bytes": peak,
    }


def _error_row(case: TrainCase, what: str, exc: Exception) -> dict:
    """A ``train_error`` row (case, what failed, the error's first line), also printed on stderr."""
    message = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    print(f"train {case.name} {what} failed: {message}", file=sys.stderr)
    return {"section": "train_error", "case": case.name, "provider": what, "error": message}


def _attempt(fn: Callable[[], object], cfg: Config, case: TrainCase, what: str, errors: list) -> object:
    """``fn()``; on a GPU, where one failing variant must not cost the rest of the run, a failure
    instead appends its ``train_error`` row to ``errors`` and returns None. On the CPU it raises."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported as a row, and on stderr
        if cfg.device.type != "cuda":
            raise
        errors.append(_error_row(case, what, exc))
        return None


def _ready_step(variant: Variant, work: Workload, cfg: Config) -> Callable[[], None]:
    """make_step, and on a GPU one step taken at once, so that a variant that fails there fails
    here, before the timing of the others."""
    step = make_step(variant, work, cfg)
    if cfg.device.type == "cuda":
        step()
    return step


def run_case(case: TrainCase, cfg: Config, progress: Callable[[str], None]) -> Iterator[dict]:
    """The rows of ``case``: one per variant's step and the failures (``train_error``), then the phase
    rows, which take longest to measure on a GPU (a generator: a run cut short there keeps the steps)."""
    torch.manual_seed(0)
    work = case.build(cfg.device, **case.sizes[cfg.train_scale])
    work.model.to(cfg.device)
    progress(f"train {case.name}")
    steps, errors = {}, []
    for variant in case_variants(case):
        if variant.runs_on(cfg.device):
            step = _attempt(lambda v=variant: _ready_step(v, work, cfg), cfg, case, variant.name, errors)
            if step is not None:
                steps[variant.name] = step
    if EAGER not in steps:
        raise RuntimeError(f"train {case.name}: the eager step, every ratio's reference, failed: {errors}")
    timings = time_fns(steps, cfg.device, cfg.train_reps)
    rows = []
    for name, step in steps.items():
        peak = step.peak_bytes if isinstance(step, CapturedStep) else peak_bytes(step, cfg.device)
        rows.append(_row(case, name, work, timings[name], peak, cfg))
    by_name = {r["provider"]: r for r in rows}
    for row in rows:
        row["speedup_vs_eager"] = by_name[EAGER]["median_ms"] / row["median_ms"]
        if row["provider"] in REGULARIZED and REG_PLAIN in by_name:
            row["speedup_vs_reg_plain"] = by_name[REG_PLAIN]["median_ms"] / row["median_ms"]
        if row["provider"] == REG_FUSED_GRAPH and REG_FUSED in by_name:
            row["speedup_vs_reg_fused"] = by_name[REG_FUSED]["median_ms"] / row["median_ms"]
    yield from rows + errors
    phase_errors: list = []
    yield from _attempt(lambda: phase_rows(case, steps, cfg.device), cfg, case, "phases", phase_errors) or []
    yield from phase_errors


def run(cfg: Config, progress: Callable[[str], None]) -> Iterator[dict]:
    """Every case under its variants (timed in interleaved rounds), with TF32 matrix products where
    ``cfg`` asks for them; ``progress(label)`` is called before each case. The rows come case by case
    (a generator), so that the runner can write each case's rows before the next one starts. On a GPU
    a case that fails (its eager step, an out-of-memory error) ends with a ``train_error`` row
    (variant :data:`bench.checks.WHOLE_CASE`) and the next case runs; on the CPU the error propagates."""
    with tf32_matmuls(cfg.train_tf32):
        for case in CASES:
            if not case.available():
                continue
            try:
                yield from run_case(case, cfg, progress)
            except Exception as exc:  # noqa: BLE001 - reported as a row, and on stderr
                if cfg.device.type != "cuda":
                    raise
                yield _error_row(case, WHOLE_CASE, exc)
                torch.cuda.empty_cache()  # what the failed case held, for the next one
