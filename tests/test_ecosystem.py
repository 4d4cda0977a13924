"""Ecosystem fit: torch.compile, mixed precision, host syncs and CUDA graphs.

- torch.compile: a whole training step (forward, loss, backward, SGD update) of a model with
  dr.Dropout compiles with ``fullgraph=True`` and reproduces eager for the same seed; a regularized
  step (``reg.capture()`` / ``reg.loss`` / ``backward``) compiles (with graph breaks), reproduces
  eager exactly and warns once per process. Inductor's ``fallback_random`` makes compiled RNG calls
  use eager's generator, so ``torch.manual_seed`` gives both the same masks.
- Mixed precision: autocast models run through dr.Dropout in bf16/f16, and every op follows the
  low-precision rule: its error against float64 math on the same inputs (same mask, noise, labels)
  is at most twice the error of the same computation done by eager PyTorch in the input dtype.
- Host syncs: no op path syncs with the host (Python-level guard on CPU; CUDA sync debug mode).
- CUDA graphs: replays draw fresh masks; eager with the same seed is reproducible.

Compiles cost seconds here: the file compiles twice (one of them in a subprocess, for a fresh
warned-once flag).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    acc_dtype,
    assert_bitwise_equal,
    op_backends,
    requires_cuda,
)

import dropreg_ext as dr
from dropreg_ext import reference as R

REPO = Path(__file__).resolve().parents[1]
LOW_DTYPES = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    """Inductor's RNG calls fall back to eager's generator (same masks for the same manual_seed);
    dynamo state is reset before and after. (Config changes go through ``config.patch``:
    pytest's monkeypatch deletes a torch config entry on undo instead of restoring it.)"""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def test_compile_fullgraph_training_step_matches_eager(fresh_dynamo):
    """forward + cross-entropy + backward + SGD update as ONE graph (dynamo traces ``backward()`` where
    ``trace_autograd_ops`` exists; older torch: forward and loss in one graph, backward by AOTAutograd's
    compiled backward). Two steps, same seed: same masks bit for bit, same losses/grads/weights to
    float64 rounding (inductor may fuse the arithmetic differently)."""
    traces_backward = hasattr(torch._dynamo.config, "trace_autograd_ops")
    with torch._dynamo.config.patch(trace_autograd_ops=True) if traces_backward else contextlib.nullcontext():
        _compiled_training_step_matches_eager(traces_backward)


def _compiled_training_step_matches_eager(traces_backward: bool) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16, bias=False), dr.Dropout(0.4), torch.nn.Linear(16, 3, bias=False)
    ).double()
    params = list(model.parameters())
    initial = [p.detach().clone() for p in params]
    x = torch.randn(6, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    lr = 0.1

    def forward_loss(inp, target):
        h = model[1](model[0](inp))
        return F.cross_entropy(model[2](h), target), h

    def update():
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)

    def step(inp, target):
        loss, h = forward_loss(inp, target)
        loss.backward()
        update()
        return loss.detach(), h.detach()

    if traces_backward:
        compiled_step = torch.compile(step, fullgraph=True)
    else:
        compiled_forward = torch.compile(forward_loss, fullgraph=True)

        def compiled_step(inp, target):
            loss, h = compiled_forward(inp, target)
            loss.backward()
            update()
            return loss.detach(), h.detach()

    def train(fn):
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
                p.grad = torch.zeros_like(p)
        torch.manual_seed(1234)
        history = []
        for _ in range(2):
            for p in params:
                p.grad.zero_()
            loss, h = fn(x, y)
            history.append((loss, h, [p.grad.clone() for p in params], [p.detach().clone() for p in params]))
        return history

    compiled, eager = train(compiled_step), train(step)
    tight = dict(rtol=1e-12, atol=1e-14)
    for i, ((loss_c, h_c, g_c, w_c), (loss_e, h_e, g_e, w_e)) in enumerate(zip(compiled, eager)):
        assert_bitwise_equal(h_c == 0, h_e == 0, f"step {i}: dropout mask, compiled vs eager")
        assert 0 < int((h_e == 0).sum()) < h_e.numel(), "dropout dropped nothing or everything"
        torch.testing.assert_close(h_c, h_e, **tight, msg=f"step {i}: dropout output")
        torch.testing.assert_close(loss_c, loss_e, **tight, msg=f"step {i}: loss")
        for a, b in zip(g_c + w_c, g_e + w_e):
            torch.testing.assert_close(a, b, **tight, msg=f"step {i}: grads / weights")
    assert not torch.equal(eager[0][1] == 0, eager[1][1] == 0), "the two steps must draw different masks"


# Runs in a fresh interpreter: the package warns once per process, so "once" needs a fresh flag.
_REGULARIZER_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    import torch
    import torch._inductor.config as inductor_config
    import dropreg_ext as dr

    inductor_config.fallback_random = True
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), dr.Dropout(0.3),
                                torch.nn.Linear(12, 4)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, -100, 2])
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True)

    def step(inp, target):
        with reg.capture():
            z = model(inp)
        loss = reg.loss(z, target)
        loss.backward()
        return loss.detach()

    def run(fn, seed):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = fn(x, y)
        return [loss] + [p.grad.clone() for p in model.parameters()] + [reg.last[k] for k in sorted(reg.last)]

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a, b))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning is shown: "once" must be the package's doing
        compiled = torch.compile(step)
        equal = []
        for seed in (11, 12):
            c, e = run(compiled, seed), run(step, seed)
            equal.append(same(c, e))
        terms = [float(reg.last["explicit"]), float(reg.last["implicit"])]
        other = torch.compile(lambda inp, target: step(inp, target))
        run(other, 13)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    print(json.dumps({"equal": equal, "terms": terms,
                      "compile_warnings": [m for m in messages if "torch.compile" in m]}))
    """
)


def test_compile_regularized_step_matches_eager_and_warns_once():
    """``with reg.capture(): z = model(x)``, ``reg.loss(z, y).backward()`` under torch.compile
    (fullgraph=False): the sites and the objective run eagerly behind graph breaks, so loss, grads and
    terms equal eager's bit for bit for the same seed; exactly one UserWarning about torch.compile
    in the process, though two functions are compiled and three compiled steps run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _REGULARIZER_COMPILE_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["equal"] == [True, True], "compiled regularized step differs from eager"
    assert all(t != 0 for t in result["terms"]), f"no site was recorded: terms {result['terms']}"
    warned = result["compile_warnings"]
    assert len(warned) == 1, f"expected exactly one torch.compile warning, got {len(warned)}: {warned}"
    assert "DropoutRegularizer" in warned[0]


@requires_cuda
def test_compile_fullgraph_triton_backend_cuda(fresh_dynamo):
    """The triton backend's ops are ``triton_op``s: on a GPU, torch.compile(fullgraph=True) traces
    into their launchers (wrap_triton) instead of treating them as opaque. Dropout forward+backward,
    cross-entropy with sampling and the site penalty with its backward, compiled vs eager on the
    same RNG states: dropout, ŷ and the site-penalty backward bit for bit, the reductions to float32
    rounding (inductor may lay the graph out differently around them)."""
    if "triton" not in dr.ops.available_backends("cuda"):
        pytest.skip("triton not available on cuda")
    dr.set_backend("triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 33, device="cuda", generator=gen)
    z = torch.randn(64, 3000, device="cuda", generator=gen)
    t = torch.randint(0, 3000, (64,), device="cuda", generator=gen)
    h, ge, gi = (torch.randn(70_000, device="cuda", generator=gen) for _ in range(3))
    rngs = [dr.ops.make_rng("cuda", s) for s in (1, 2, 3)]

    def f(x, z, h, ge, gi):
        y = dr.ops.fused_dropout(x, 0.3, rngs[0])
        loss, lse, yhat = dr.ops.cross_entropy_sample(z, t, rngs[1])
        pen = dr.ops.site_penalty(h, ge, gi, 0.2, "rademacher", rngs[2])
        return y, loss, lse, yhat, pen

    def run(fn):
        xl, hl = x.clone().requires_grad_(), h.clone().requires_grad_()
        y, loss, lse, yhat, pen = fn(xl, z, hl, ge, gi)
        gx, gh = torch.autograd.grad(y.sum() + pen.sum(), (xl, hl))  # the compiled backward, for compiled
        return y, gx, loss, lse, yhat, pen, gh

    compiled = run(torch.compile(f, fullgraph=True))
    eager = run(f)
    names = ("dropout", "dropout grad", "loss", "lse", "yhat", "site penalty", "site penalty grad")
    for name, c, e in zip(names, compiled, eager):
        if name in ("loss", "lse", "site penalty"):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert_bitwise_equal(c, e, f"{name}, compiled vs eager")
    assert_bitwise_equal(eager[0], R.dropout(x, 0.3, rngs[0]), "dropout vs reference")


# ------------------------------------------------------------------------------------------------
# Mixed precision: autocast
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_linear_dropout_linear(device, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), dr.Dropout(0.5), torch.nn.Linear(32, 4)).to(device)
    seen = []
    model[1].register_forward_hook(lambda m, inputs, out: seen.append((inputs[0].detach(), out.detach())))
    x = torch.randn(16, 8, device=device)
    torch.manual_seed(3)
    with torch.autocast(device, dtype=dtype):
        out = model(x)
    (h, dropped), = seen
    assert h.dtype == dropped.dtype == out.dtype == dtype, "dropout must keep its input's low-precision dtype"
    torch.manual_seed(3)
    assert_bitwise_equal(dropped, dr.functional.dropout(h, 0.5), "dropout under autocast == plain call")
    assert 0 < int((dropped == 0).sum()) < dropped.numel()
    out.float().pow(2).mean().backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())
    assert bool((model[0].bias.grad != 0).any()), "no gradient reached the layer before the dropout"


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_regularizer(device, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), dr.Dropout(0.3),
                                torch.nn.Linear(16, 5)).to(device)
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True)
    x = torch.randn(12, 8, device=device)
    y = torch.randint(0, 5, (12,), device=device)
    with torch.autocast(device, dtype=dtype):
        with reg.capture():
            z = model(x)
        loss = reg.loss(z, y)
    assert z.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    assert all(bool(torch.isfinite(v)) for v in reg.last.values())
    assert float(reg.last["explicit"]) > 0
    for p in model.parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())


# ------------------------------------------------------------------------------------------------
# The low-precision rule (flash-attention's): for f16/bf16 inputs,
#   max|ours - exact| <= 2 · max|eager PyTorch in the input dtype - exact| + slack,
# "exact" = the same math in float64 on the same (rounded) inputs with the same mask / noise / labels.
# ------------------------------------------------------------------------------------------------

SLACK = 1e-6  # absolute: only matters where both errors are (near) zero


def _assert_low_precision_rule(ours, eager, exact, what: str) -> None:
    err_ours = (ours.detach().cpu().double() - exact).abs().max().item() if exact.numel() else 0.0
    err_eager = (eager.detach().cpu().double() - exact).abs().max().item() if exact.numel() else 0.0
    assert math.isfinite(err_ours), f"{what}: non-finite output"
    assert err_ours <= 2 * err_eager + SLACK, (
        f"{what}: error vs float64 {err_ours:.3g} > 2 x same-dtype PyTorch error {err_eager:.3g} + {SLACK}"
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _small(be) -> bool:
    return be.name == "triton" and be.device == "cpu"  # interpreter: tiny sizes only


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("be", op_backends("dropout"))
def test_low_precision_rule_fused_dropout(be, dtype):
    n = 256 if _small(be) else 10_007
    p = 0.3
    x = torch.randn(n, generator=_gen(1), dtype=torch.float64).to(dtype)
    rng = dr.ops.make_rng("cpu", 77)
    keep = R.dropout_keep(x.shape, p, rng)
    exact = torch.where(keep, x.double() / (1 - p), 0.0)
    eager = x * keep.to(dtype) * (1.0 / (1 - p))  # what torch's own dropout computes in dtype
    ours = dr.ops.fused_dropout(x.to(be.device), p, rng.to(be.device), backend=be.name)
    assert ours.dtype == dtype
    _assert_low_precision_rule(ours, eager, exact, f"{be} {dtype} dropout")


def _logits(dtype, n, c, seed, ignore_index=-100):
    gen = _gen(seed)
    z = (3 * torch.randn(n, c, generator=gen, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, c, (n,), generator=gen)
    t[1::3] = ignore_index
    return z, t


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("be", op_backends("cross_entropy_sample"))
def test_low_precision_rule_cross_entropy_sample(be, dtype):
    n, c = (4, 33) if _small(be) else (64, 257)
    z, t = _logits(dtype, n, c, seed=2)
    valid = t != -100
    zd = z.double()
    exact_lse = torch.logsumexp(zd, -1)
    exact_loss = torch.where(valid, exact_lse - zd.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1), 0.0)
    eager_lse = torch.logsumexp(z, -1)
    eager_loss = F.cross_entropy(z, t, reduction="none")
    loss, lse, _ = dr.ops.cross_entropy_sample(z.to(be.device), t.to(be.device), dr.ops.make_rng(be.device, 5),
                                               backend=be.name)
    assert loss.dtype == lse.dtype == acc_dtype(dtype)
    _assert_low_precision_rule(lse, eager_lse, exact_lse, f"{be} {dtype} lse")
    _assert_low_precision_rule(loss, eager_loss, exact_loss, f"{be} {dtype} loss")


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("be", op_backends("ce_grad"))
def test_low_precision_rule_ce_grad(be, dtype):
    """G = s ⊙ (softmax(z) - onehot(y)); eager = autograd of F.cross_entropy(z, y, reduction='none')
    in dtype with cotangent s."""
    n, c = (4, 33) if _small(be) else (64, 257)
    z, t = _logits(dtype, n, c, seed=3)
    row_scale = torch.rand(n, generator=_gen(4)) + 0.5  # float32
    zd = z.double()
    valid = (t != -100).double()[:, None]
    onehot = F.one_hot(torch.where(t != -100, t, 0), c).double()
    exact = (torch.softmax(zd, -1) - onehot) * row_scale.double()[:, None] * valid
    z_leaf = z.clone().requires_grad_()
    (eager,) = torch.autograd.grad(F.cross_entropy(z_leaf, t, reduction="none"), z_leaf, row_scale.to(dtype))
    lse = torch.logsumexp(z.float(), -1)  # what cross_entropy_sample hands to ce_grad
    ours = dr.ops.ce_grad(z.to(be.device), lse.to(be.device), t.to(be.device), row_scale.to(be.device),
                          backend=be.name)
    assert ours.dtype == dtype
    _assert_low_precision_rule(ours, eager, exact, f"{be} {dtype} ce_grad")


@pytest.mark.parametrize("noise", R.NOISE_KINDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("be", op_backends("site_penalty"))
def test_low_precision_rule_site_penalty(be, dtype, noise):
    n = 64 if _small(be) else 4099
    q = 0.3
    gen = _gen(6)
    h, g_e, g_i = (torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    rng = dr.ops.make_rng("cpu", 9)
    eta = R.site_noise((n,), q, noise, rng, torch.float64)
    hd, ged, gid = h.double(), g_e.double(), g_i.double()
    exact = torch.stack([((ged * hd) ** 2).sum(), (gid * eta * hd).sum()])
    eager = torch.stack([((g_e * h) ** 2).sum(), (g_i * eta.to(dtype) * h).sum()])
    ours = dr.ops.site_penalty(h.to(be.device), g_e.to(be.device), g_i.to(be.device), q, noise, rng.to(be.device),
                               backend=be.name)
    assert ours.dtype == acc_dtype(dtype)
    for k, term in enumerate(("explicit", "implicit")):
        _assert_low_precision_rule(ours[k:k + 1], eager[k:k + 1], exact[k:k + 1], f"{be} {dtype} {noise} {term}")


# ------------------------------------------------------------------------------------------------
# Host syncs
# ------------------------------------------------------------------------------------------------

# Tensor methods that copy device data to the host (a sync on CUDA).
_SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    """Make every Python-level read of tensor data raise while the block runs. On CPU this checks
    the Python layer (ops.py, nn.py, functional.py, the autograd formulas); the C++ launchers read
    rng inside the kernel by construction (checks.h: DROPREG_CHECK_RNG inspects metadata only), which
    the CUDA tests below check with the sync debug mode."""
    own = {name: torch.Tensor.__dict__[name] for name in _SYNCING_METHODS if name in torch.Tensor.__dict__}

    def forbid(name):
        def method(self, *args, **kwargs):
            raise HostSync(f"host sync: Tensor.{name}() called on a {tuple(self.shape)} tensor")
        return method

    for name in _SYNCING_METHODS:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        for name in _SYNCING_METHODS:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)  # back to the inherited C method


def _op_workloads(device: str) -> dict:
    """name -> callable running one public op path (forward and, where differentiable, backward)."""
    gen = _gen(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(grad)

    x = rand(64, 16, grad=True)
    z = rand(8, 5, grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, -100, 1, 0], device=device)
    h, ge, gi = rand(64, grad=True), rand(64, grad=True), rand(64, grad=True)
    scale = torch.ones(8, device=device)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), dr.Dropout(0.3),
                                torch.nn.Linear(32, 5)).to(device)
    channel = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), dr.Dropout2d(0.3)).to(device)
    img = rand(2, 3, 6, 6)
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True)

    def backward(out):
        out.sum().backward()

    def regularized():
        with reg.capture():
            logits = model(x[:8])
        reg.loss(logits, t).backward()

    def with_rng(fn):
        return lambda: fn(dr.ops.make_rng(device))

    return {
        "functional.dropout": lambda: backward(dr.functional.dropout(x, 0.3)),
        "functional.dropout-inplace": lambda: dr.functional.dropout(x.detach().clone(), 0.3, inplace=True),
        "functional.dropout-seed": lambda: backward(dr.functional.dropout(x, 0.3, seed=5)),
        "fused_dropout": with_rng(lambda rng: backward(dr.ops.fused_dropout(x, 0.3, rng))),
        "cross_entropy_sample": with_rng(lambda rng: backward(dr.ops.cross_entropy_sample(z, t, rng)[0])),
        "ce_grad": lambda: backward(dr.ops.ce_grad(z, torch.logsumexp(z.detach(), -1), t, scale)),
        "site_penalty": with_rng(lambda rng: backward(dr.ops.site_penalty(h, ge, gi, 0.3, "dropout", rng))),
        "Dropout-module": lambda: backward(model(x)),
        "Dropout2d-module": lambda: backward(channel(img)),
        "LockedDropout": lambda: backward(dr.LockedDropout(0.3)(x.view(4, 16, 16))),
        "regularizer-loss-backward": regularized,
    }


WORKLOADS = list(_op_workloads("cpu"))


@pytest.mark.parametrize("workload", WORKLOADS)
def test_no_host_sync_cpu_backend(workload):
    """The cpu backend's op paths never read tensor data from Python. (The reference backend may sync:
    it validates labels with bool(); Triton on CPU runs in the interpreter, which is numpy, so only
    its CUDA run below says anything.)"""
    if not dr._ext.HAS_CPU:
        pytest.skip("dropreg_ext._C not loaded")
    dr.set_backend("cpu")
    run = _op_workloads("cpu")[workload]
    with no_host_sync():
        run()


def test_no_host_sync_guard_catches_syncs():
    """The guard sees Python-level syncs: the reference (allowed to sync: it validates labels with
    bool()) trips it, and so does a plain .item()."""
    with no_host_sync(), pytest.raises(HostSync):
        torch.ones(2).sum().item()
    dr.set_backend("reference")
    run = _op_workloads("cpu")["cross_entropy_sample"]
    with no_host_sync(), pytest.raises(HostSync):
        run()
    assert torch.ones(()).item() == 1.0, "methods restored"


@requires_cuda
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_sync_cuda_debug_mode(backend, workload):
    """torch.cuda.set_sync_debug_mode("error"): any synchronizing CUDA call in the op path raises."""
    if backend not in dr.ops.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available on cuda")
    dr.set_backend(backend)
    run = _op_workloads("cuda")[workload]
    run()  # warm-up: Triton compiles, allocator caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# CUDA graphs
# ------------------------------------------------------------------------------------------------


def _cuda_graph_capture(fn, warmups: int = 2):
    """Warm up on a side stream, capture ``fn()`` into a CUDA graph; returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replays_draw_fresh_masks(backend):
    """Each replay draws a fresh [seed, offset] on the device and its mask is the one the contract
    gives for that state: the graph returns its rng too, and every replay's output is checked bit
    for bit against the reference at the state that replay drew."""
    if backend not in dr.ops.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available on cuda")
    dr.set_backend(backend)
    x = torch.randn(4096, device="cuda")

    def fn():
        rng = dr.ops.make_rng("cuda")
        return dr.ops.fused_dropout(x, 0.5, rng), rng, dr.functional.dropout(x, 0.5)

    graph, (out, rng, out_functional) = _cuda_graph_capture(fn)
    states, masks = [], []
    for i in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(out, R.dropout(x, 0.5, rng), f"replay {i}: output vs reference at its rng")
        states.append(tuple(rng.tolist()))
        masks.append(out_functional == 0)
        frac = masks[-1].float().mean().item()
        assert abs(frac - 0.5) < 0.05, f"replay {i}: fraction dropped {frac}"
    assert len(set(states)) == 3, f"replays drew repeated rng states {states}"
    for i in range(3):
        for j in range(i):
            assert not torch.equal(masks[i], masks[j]), f"replays {j} and {i} drew the same mask"
    torch.manual_seed(21)
    first = dr.functional.dropout(x, 0.5)
    torch.manual_seed(21)
    assert_bitwise_equal(dr.functional.dropout(x, 0.5), first, "eager, same seed")


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_explicit_seed(backend):
    """An explicit seed builds its state with fill kernels (no host-to-device copy): it can be
    captured, no sync happens (sync debug mode "error"), and every replay gives that seed's mask."""
    if backend not in dr.ops.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available on cuda")
    dr.set_backend(backend)
    x = torch.randn(4096, device="cuda")
    expected = R.dropout(x, 0.5, torch.tensor([77, 0], device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = dr.functional.dropout(x, 0.5, seed=77)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_bitwise_equal(eager, expected, "eager, explicit seed")
    graph, out = _cuda_graph_capture(lambda: dr.functional.dropout(x, 0.5, seed=77))
    for i in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise_equal(out, expected, f"replay {i}, explicit seed")


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_regularizer_ops_draw_fresh_noise(backend):
    """The site noise and the Gumbel draw read rng in-kernel: each replay's values are the
    reference's at the states that replay drew (returned by the graph), and differ across replays."""
    if backend not in dr.ops.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available on cuda")
    dr.set_backend(backend)
    h = torch.randn(4096, device="cuda")
    z = torch.randn(256, 50, device="cuda")
    t = torch.randint(0, 50, (256,), device="cuda")

    def fn():
        rng_site, rng_ce = dr.ops.make_rng("cuda"), dr.ops.make_rng("cuda")
        pen = dr.ops.site_penalty(h, h, h, 0.3, "rademacher", rng_site)
        _, _, yhat = dr.ops.cross_entropy_sample(z, t, rng_ce)
        return pen, yhat, rng_site, rng_ce

    graph, (pen, yhat, rng_site, rng_ce) = _cuda_graph_capture(fn)
    seen = []
    for i in range(2):
        graph.replay()
        torch.cuda.synchronize()
        want = R.site_penalty(h, h, h, 0.3, "rademacher", rng_site)
        torch.testing.assert_close(pen, want, rtol=1e-5, atol=1e-4, msg=lambda m, i=i: f"replay {i} penalty: {m}")
        assert torch.equal(yhat, R.cross_entropy_sample(z, t, rng_ce)[2]), f"replay {i}: yhat vs reference"
        seen.append((pen.clone(), yhat.clone()))
    assert seen[0][0][1] != seen[1][0][1], "implicit term: same noise in two replays"
    assert not torch.equal(seen[0][1], seen[1][1]), "yhat: same Gumbel draw in two replays"
    assert seen[0][0][0] == seen[1][0][0], "explicit term has no noise: equal across replays"


@requires_cuda
def test_make_graphed_callables_module_fwd_bwd():
    """A model with dr.Dropout through torch.cuda.make_graphed_callables: forward and backward replay,
    fresh masks per call, gradients consistent with the mask of that call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), dr.Dropout(0.5), torch.nn.Linear(64, 4)).cuda()
    x = torch.randn(32, 16, device="cuda")
    graphed = torch.cuda.make_graphed_callables(model, (x,))
    outs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = graphed(x)
        out.sum().backward()
        outs.append(out.detach().clone())
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    torch.cuda.synchronize()
    assert not torch.equal(outs[0], outs[1]), "two graphed calls drew the same mask"
