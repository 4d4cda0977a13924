"""The training benchmark (bench/train.py) on tiny models: every case builds, every variant that runs
on the device takes a step with a finite loss, the regularized GPT-2 case sees its attention dropout
as sites, the phase table has its columns (host time on the CPU; the GPU's device-time attribution
on synthetic profiler events), the autocast and TF32 settings of the GPU preset run and are undone,
and the CUDA-only variant (the captured step) is absent on the CPU and runs on a GPU."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import requires_cuda
from torch.autograd import DeviceType

import dropreg_ext as dr
from bench import config, output, train
from bench.checks import WHOLE_CASE
from bench.config import Reps

# Tiny sizes of every case (the test fails for a case added without one).
TINY = {
    "mlp": dict(batch=8, hidden=16),
    "lstm_lm": dict(vocab=50, dim=8, layers=2, batch=2, seq=5),
    "transformer_block": dict(vocab=50, dim=16, heads=2, ff=32, batch=2, seq=8),
    "gpt2_eager_attention": dict(vocab=50, dim=16, layers=2, heads=2, batch=2, seq=8),
    "gpt2_regularized": dict(vocab=50, dim=16, layers=2, heads=2, batch=2, seq=8),
}
ONE_STEP = Reps(warmup=0, min_reps=1, max_reps=1, budget_s=0.0)


def _case(name: str) -> train.TrainCase:
    case = next(c for c in train.CASES if c.name == name)
    if not case.available():
        pytest.skip(f"{name} needs an optional package (transformers)")
    return dataclasses.replace(case, sizes={"small": TINY[name], "large": TINY[name]})


def _cfg(device: str, **changes) -> config.Config:
    return dataclasses.replace(config.make_config("quick", torch.device(device)), train_reps=ONE_STEP, **changes)


def test_every_case_has_tiny_sizes():
    assert sorted(c.name for c in train.CASES) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_case_variants_give_finite_losses(name):
    """Each variant the case runs on the CPU: a finite loss, finite gradients, and a whole step."""
    case, cfg = _case(name), _cfg("cpu")
    torch.manual_seed(0)
    work = case.build(cfg.device, **TINY[name])
    variants = [v for v in train.case_variants(case) if v.runs_on(cfg.device)]
    assert variants and variants[0].name == train.EAGER
    for variant in variants:
        model = copy.deepcopy(work.model).train()
        loss = variant.setup(model)(work.inputs, work.target)
        assert loss.dim() == 0 and math.isfinite(float(loss)), (name, variant.name)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads), (name, variant.name)
        train.make_step(variant, work, cfg)()


def test_gpt2_regularized_attention_dropout_is_a_site():
    """Under patch_functional the eager attention's nn.functional.dropout is a site: per layer the
    attention probabilities (B, H, T, T), besides the dropout modules; head= is GPT-2's lm_head."""
    case = _case("gpt2_regularized")
    sizes = TINY["gpt2_regularized"]
    assert case.variants == (train.EAGER, train.REG_PLAIN, train.REG_FUSED)
    work = case.build(torch.device("cpu"), **sizes)
    model = work.model.train()
    dr.replace_dropout(model)
    assert train._output_layer(model) is model.model.lm_head
    with dr.patch_functional(), dr.record_sites(model) as sites:
        model(work.inputs)
    probs = (sizes["batch"], sizes["heads"], sizes["seq"], sizes["seq"])
    assert sum(tuple(s.h.shape) == probs for s in sites) == sizes["layers"]
    assert len(sites) == 1 + 3 * sizes["layers"]  # embeddings; attention, its output and the MLP per layer


def test_run_case_on_cpu_rows_phases_and_cuda_only_note():
    """run_case on the CPU: one row per variant that runs there (not the captured one), in float32,
    the ratios, a phase row per eager regularized variant with every column; the report says the
    CUDA-only variant was not run."""
    case, cfg = _case("lstm_lm"), _cfg("cpu")
    rows = list(train.run_case(case, cfg, lambda label: None))
    steps = [r for r in rows if r["section"] == "train"]
    assert [r["provider"] for r in steps] == [v.name for v in train.case_variants(case) if not v.captured]
    assert train.REG_FUSED_GRAPH in case.variants
    for r in steps:
        assert r["precision"] == "float32" and r["median_ms"] > 0 and math.isfinite(r["speedup_vs_eager"])
    assert all("speedup_vs_reg_plain" in r for r in steps if r["provider"] in train.REGULARIZED)
    phases = [r for r in rows if r["section"] == "train_phases"]
    assert [r["provider"] for r in phases] == [train.REG_PLAIN, train.REG_FUSED, train.REG_FUSED_GENERIC]
    headers, body = output.phase_table_rows(rows)
    assert headers == ["case", "variant", "clock", *output.PHASE_COLUMNS]
    assert all(row[2] == "host" for row in body) and all(len(row) == len(headers) for row in body)
    for r in phases:
        assert r["forward"] > 0 and r["backward"] > 0 and r["objective"] >= r["first-order VJPs"] > 0
        assert r["matmuls"] > 0 and (r["our kernels"] > 0) == (r["provider"] != train.REG_PLAIN)
    notes = output.train_notes(rows, {"device_type": "cpu"})
    assert notes == [f"lstm_lm: {train.REG_FUSED_GRAPH} runs on CUDA only: not run on cpu"]
    assert (case.name, train.REG_FUSED_GRAPH) in train.cuda_only_variants()


def test_steps_are_kept_when_the_phases_are_cut_short(monkeypatch, tmp_path):
    """run_case yields the step rows before it profiles the phases, and the runner writes what it has on
    an interrupt (gpu_check.sh's time limit sends SIGINT): results.json then holds the steps."""
    import bench.__main__ as runner

    def interrupted(*args):
        raise KeyboardInterrupt

    case, cfg = _case("mlp"), _cfg("cpu")
    monkeypatch.setattr(train, "phase_rows", interrupted)
    monkeypatch.setattr(train, "CASES", [case])
    with pytest.raises(KeyboardInterrupt):
        runner.run_sections(["train"], cfg, {"device_tag": "test"}, str(tmp_path))
    with open(tmp_path / "results.json") as f:
        rows = json.load(f)["rows"]
    assert [r["provider"] for r in rows] == [v.name for v in train.case_variants(case)]
    assert {r["section"] for r in rows} == {"train"}


def test_a_failing_variant_is_a_row_on_a_gpu_and_raises_elsewhere():
    """On a GPU a failing variant (a capture that fails) becomes a train_error row with the error's first
    line, so the other variants still run; on the CPU the error propagates."""
    def fail():
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    case, errors = _case("lstm_lm"), []
    on_gpu = SimpleNamespace(device=torch.device("cuda"))
    assert train._attempt(fail, on_gpu, case, train.REG_FUSED_GRAPH, errors) is None
    assert errors == [{"section": "train_error", "case": "lstm_lm", "provider": train.REG_FUSED_GRAPH,
                       "error": "RuntimeError: operation not permitted when stream is capturing"}]
    with pytest.raises(RuntimeError, match="stream is capturing"):
        train._attempt(fail, _cfg("cpu"), case, train.REG_FUSED_GRAPH, [])
    assert train._attempt(lambda: 7, on_gpu, case, train.REG_FUSED, errors) == 7 and len(errors) == 1


def test_a_failing_case_is_a_row_on_a_gpu_and_raises_elsewhere(monkeypatch):
    """run: on a GPU a case that fails midway keeps the rows it yielded, adds a train_error row and the
    next case runs; on the CPU the error propagates."""
    def run_case(case, cfg, progress):
        yield {"section": "train", "case": case.name}
        if case.name == "mlp":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    cases = [_case("mlp"), _case("transformer_block")]
    monkeypatch.setattr(train, "CASES", cases)
    monkeypatch.setattr(train, "run_case", run_case)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = list(train.run(SimpleNamespace(device=torch.device("cuda"), train_tf32=False), lambda label: None))
    assert rows == [{"section": "train", "case": "mlp"},
                    {"section": "train_error", "case": "mlp", "provider": WHOLE_CASE,
                     "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"},
                    {"section": "train", "case": "transformer_block"}]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        list(train.run(_cfg("cpu"), lambda label: None))


def test_autocast_and_tf32_as_on_a_gpu():
    """The GPU preset's settings on the CPU: the steps run under bf16 autocast (logits in bf16, the
    loss finite), the rows say so, and the TF32 setting is restored after the section."""
    assert config.make_config("check", torch.device("cuda")).train_autocast == "bfloat16"
    assert config.make_config("check", torch.device("cuda")).train_tf32
    assert config.make_config("check", torch.device("cpu")).train_autocast is None
    cfg = _cfg("cpu", train_autocast="bfloat16", train_tf32=True)
    assert train.precision(cfg) == "bfloat16 autocast + tf32"
    case = _case("gpt2_regularized")
    work = case.build(cfg.device, **TINY["gpt2_regularized"])
    seen = []
    work.model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    variant = next(v for v in train.VARIANTS if v.name == train.REG_FUSED)
    train.make_step(variant, work, cfg)()
    assert seen == [torch.bfloat16]
    previous = torch.get_float32_matmul_precision()
    with train.tf32_matmuls(True):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == previous


def _event(name, start, end, kernels_us=(), parent=None, device=DeviceType.CPU):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                           kernels=[SimpleNamespace(duration=us) for us in kernels_us], cpu_parent=parent)


def test_device_phase_attribution():
    """A kernel counts for the op that launched it and for every phase range holding that op's start
    on the host clock, whichever thread launched it (the backward's ops run on the autograd thread,
    outside the main thread's range tree); for our ops when a dropreg op launched it or called the op
    that did; for the matmuls when a matrix product op launched it."""
    forward = _event(train.FORWARD, 0, 100)
    objective = _event(train.OBJECTIVE, 100, 300)
    vjp = _event(train.VJP_RANGE, 150, 250, parent=objective)
    backward = _event(train.BACKWARD, 300, 600)
    optimizer = _event(train.OPTIMIZER, 600, 700)
    linear = _event("aten::linear", 10, 40, parent=forward)
    matmul = _event("aten::matmul", 155, 180, parent=vjp)
    site_bwd = _event("dropreg::site_penalty_backward", 400, 420)  # autograd thread: no parent
    events = [
        forward, objective, vjp, backward, optimizer, linear,
        _event("aten::addmm", 12, 30, kernels_us=(50,), parent=linear),
        _event("dropreg::cross_entropy_sample_grad", 110, 120, kernels_us=(20,), parent=objective),
        matmul,
        _event("aten::mm", 160, 170, kernels_us=(30, 5), parent=matmul),
        _event("aten::clone", 171, 172, kernels_us=(2,), parent=matmul),  # in a phase, not a matmul's kernel
        _event("aten::empty", 401, 402, kernels_us=(1,), parent=site_bwd),
        site_bwd,
        _event("aten::mul", 500, 510, kernels_us=(7,)),
        _event("aten::_foreach_add_", 610, 620, kernels_us=(3,), parent=optimizer),
        _event("kernel", 12, 62, device=DeviceType.CUDA),  # the kernels themselves: counted through their ops
        _event(train.FORWARD, 0, 100, device=DeviceType.CUDA),  # the GPU's copy of a range: not a range here
    ]
    ms = train.device_phase_ms(events)
    assert ms == pytest.approx({"forward": 0.050, "objective": 0.057, "first-order VJPs": 0.037, "backward": 0.008,
                                "optimizer": 0.003, "our kernels": 0.021, "matmuls": 0.085})


@requires_cuda
def test_cuda_run_case_captured_lstm_step():
    """On a GPU: the LSTM-LM case under bf16 autocast with its captured variant, which replays with a
    finite time, a ratio against the uncaptured step, and device-time phases."""
    case, cfg = _case("lstm_lm"), _cfg("cuda", train_autocast="bfloat16", train_tf32=True)
    rows = list(train.run_case(case, cfg, lambda label: None))
    assert [r for r in rows if r["section"] == "train_error"] == []
    steps = {r["provider"]: r for r in rows if r["section"] == "train"}
    assert list(steps) == [v.name for v in train.case_variants(case)]
    graph = steps[train.REG_FUSED_GRAPH]
    assert graph["precision"] == "bfloat16 autocast + tf32" and math.isfinite(graph["speedup_vs_reg_fused"])
    phases = [r for r in rows if r["section"] == "train_phases"]
    assert phases and all(r["clock"] == "device" and r["backward"] > 0 and r["matmuls"] > 0 for r in phases)
    assert all(r["our kernels"] > 0 for r in phases if r["provider"] != train.REG_PLAIN)
