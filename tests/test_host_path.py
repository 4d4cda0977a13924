"""The per-call host path: every public call dispatches exactly its kernels, and a regularized training
step dispatches no op that waits for the device.

Counted with a ``TorchDispatchMode`` (``bench.overhead.OpCounter``), which sees each op issued below
autograd, forward and backward apart: on a GPU each is one launch at least. Run on real CPU tensors,
and the forwards also on fake CUDA tensors (``FakeTensorMode``: the Python layer takes its CUDA path,
the ops run their fake kernels), so the CUDA path of the Python layer is checked on a machine
without a GPU (autograd's engine needs a real device for a backward, and the backwards are C++
nodes that take no device-dependent path). A CUDA graph capture of a whole regularized step runs
where a GPU is.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import dropreg_ext as dr
from bench.overhead import OpCounter

pytestmark = pytest.mark.skipif(not dr._ext.HAS_CPU, reason="dropreg_ext._C not loaded")

DEVICES = ["cpu", pytest.param("cuda-fake", marks=pytest.mark.skipif(not dr._ext.HAS_CUDA, reason="no CUDA build"))]


@contextlib.contextmanager
def on(device: str):
    """Tensors made inside are on ``device``: real CPU tensors, or fake CUDA ones."""
    if device == "cpu":
        yield torch.device("cpu")
    else:
        with FakeTensorMode():
            yield torch.device("cuda")


def _inputs(device):
    x = torch.randn(64, 16, device=device, requires_grad=True)
    z = torch.randn(8, 5, device=device, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, -100, 1, 0], device=device)
    h, g_e, g_i = (torch.randn(64, device=device, requires_grad=True) for _ in range(3))
    return x, z, t, h, g_e, g_i


def _calls(device) -> dict:
    """name -> (forward() -> output, the ops its forward may dispatch, those of output.backward(ones))."""
    x, z, t, h, g_e, g_i = _inputs(device)
    module = dr.Dropout(0.3)
    rng = dr.ops.make_rng(device)
    return {
        "functional.dropout": (lambda: dr.functional.dropout(x, 0.3), ["dropout_draw"], ["dropout"]),
        "functional.dropout(seed)": (lambda: dr.functional.dropout(x, 0.3, seed=7), ["dropout_draw"], ["dropout"]),
        # (On fake tensors the module hands the input to torch: a FakeTensor is a tensor subclass.)
        **({"Dropout module": (lambda: module(x), ["dropout_draw"], ["dropout"])} if device.type == "cpu" else {}),
        "functional.dropout(inplace)": (
            lambda: dr.functional.dropout(x.detach().clone(), 0.3, inplace=True), ["clone", "dropout_draw_"], None,
        ),
        "fused_dropout(rng)": (lambda: dr.ops.fused_dropout(x, 0.3, rng), ["dropout"], ["dropout"]),
        "cross_entropy_sample": (
            lambda: dr.ops.cross_entropy_sample(z, t)[0], ["cross_entropy_sample_draw"], ["ce_grad"],
        ),
        "cross_entropy_sample_grad": (
            lambda: dr.ops.cross_entropy_sample_grad(z, t)[0],
            ["cross_entropy_sample_grad_draw"],
            ["cross_entropy_sample_grad_backward"],
        ),
        "site_penalty": (
            lambda: dr.ops.site_penalty(h, g_e, g_i, 0.3, "rademacher"), ["site_penalty_draw"],
            ["site_penalty_backward"],
        ),
        "site_penalty(rng)": (
            lambda: dr.ops.site_penalty(h, g_e, g_i, 0.3, "dropout", rng), ["site_penalty"],
            ["site_penalty_backward"],
        ),
    }


CALLS = list(_calls(torch.device("cpu")))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CALLS)
def test_ops_dispatched_per_call(device, name):
    """Forward and backward of each public call dispatch exactly their kernels: no random_, fill_,
    zeros, copy or other helper op (each would be a launch on a GPU)."""
    with on(device) as dev:
        calls = _calls(dev)
        if name not in calls:
            pytest.skip(f"{name} is not run on {device}")
        forward, want_fwd, want_bwd = calls[name]
        with OpCounter() as fwd:
            out = forward()
        assert fwd.ops == want_fwd, f"{name} forward on {device}: dispatched {fwd.ops}, expected {want_fwd}"
        if want_bwd is None or device != "cpu":
            return
        grad = torch.ones_like(out)
        with OpCounter() as bwd:
            out.backward(grad)
        assert bwd.ops == want_bwd, f"{name} backward on {device}: dispatched {bwd.ops}, expected {want_bwd}"


@pytest.mark.parametrize("name", CALLS)
def test_autograd_node_contract(name):
    """The C++ autograd nodes behave as torch's own: named, saved state freed by a backward that does
    not retain the graph (a second backward raises torch's error), retained with retain_graph=True
    (the same gradient twice), and forward-mode AD refused with a message saying so."""
    forward, _, want_bwd = _calls(torch.device("cpu"))[name]
    if want_bwd is None:
        pytest.skip("in place: no node of ours")
    out = forward()
    assert out.grad_fn.name().startswith("dropreg::") and out.grad_fn.name().endswith("Backward")
    grad = torch.ones_like(out)
    leaf = out.grad_fn.next_functions[0][0].variable  # the call's first input
    first = torch.autograd.grad(out, leaf, grad, retain_graph=True)
    again = torch.autograd.grad(out, leaf, grad)
    assert torch.equal(first[0], again[0])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out, leaf, grad)


def test_forward_mode_ad_is_refused():
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(16)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones(16))
        with pytest.raises(NotImplementedError, match="dropreg::dropout: forward-mode AD is not implemented"):
            dr.functional.dropout(dual, 0.5)


# The public calls that take a C entry point (csrc/entry.cpp) when their state is drawn, by the
# entry's name: the call, on plain CPU tensors that require grad.
def _entry_calls() -> dict:
    x, z, t, h, g_e, g_i = _inputs("cpu")
    return {
        "dropout": lambda: dr.functional.dropout(x, 0.3),
        "cross_entropy_sample": lambda: dr.ops.cross_entropy_sample(z, t),
        "cross_entropy_sample_grad": lambda: dr.ops.cross_entropy_sample_grad(z, t, true_scale=torch.rand(8)),
        "site_penalty": lambda: dr.ops.site_penalty(h, g_e, None, 0.3, "dropout"),
    }


class _Passthrough(TorchFunctionMode):
    """A __torch_function__ mode that changes nothing: with it active, the public calls must go through
    the registered op (Python sees it), not the C entry point."""

    def __init__(self) -> None:
        super().__init__()
        self.funcs: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


def _differentiable(outputs) -> list:
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [o for o in outputs if o.requires_grad]


@pytest.mark.parametrize("name", list(_entry_calls()))
def test_entry_point_is_the_registered_op(name, monkeypatch):
    """A public call on plain tensors takes its C entry point, and gives what the registered <op>_draw
    gives at the same generator state, bit for bit, gradients included; under a __torch_function__
    mode it takes the registered op, which the mode sees."""
    taken = []
    entry = dr.ops.ENTRIES[name]
    monkeypatch.setitem(dr.ops.ENTRIES, name, lambda *args: taken.append(name) or entry(*args))
    call = _entry_calls()[name]
    leaves = None
    results = []
    for mode in (contextlib.nullcontext(), _Passthrough()):
        torch.manual_seed(0)
        with mode:
            out = call()
        outs = out if isinstance(out, tuple) else (out,)
        first = _differentiable(out)[0]
        leaves = leaves or [e[0].variable for e in first.grad_fn.next_functions if e[0] is not None]
        grads = torch.autograd.grad(first, leaves, torch.ones_like(first))
        results.append((outs, grads))
        if isinstance(mode, _Passthrough):
            assert f"{name}_draw" in [str(getattr(f, "__name__", f)) for f in mode.funcs], mode.funcs
    assert taken == [name], "the C entry point serves the plain call only"
    (outs_entry, grads_entry), (outs_op, grads_op) = results
    assert len(outs_entry) == len(outs_op)
    for a, b in zip(outs_entry + grads_entry, outs_op + grads_op):
        assert torch.equal(a, b)


def test_entry_point_argument_errors():
    """The entry points name a wrongly typed argument (the Python layer checks values before)."""
    x = torch.randn(4)
    with pytest.raises(TypeError, match="argument 'p' must be a float, got str"):
        dr._ext.C.dropout(x, "0.5", None)
    with pytest.raises(TypeError, match="argument 'noise' must be a str, got int"):
        dr._ext.C.site_penalty(x, None, None, 0.5, 1, None)
    with pytest.raises(TypeError, match="takes 4 positional arguments, got 3"):
        dr._ext.C.cross_entropy_sample(x, x, -100)


def test_counter_sees_helper_ops():
    """The count can fail: torch's own dropout dispatches more than one op per call."""
    x = torch.randn(16, requires_grad=True)
    with OpCounter() as counter:
        torch.nn.functional.dropout(x, 0.5)
    assert len(counter.ops) > 1, counter.ops


# Ops that make the host wait for the device (a read of device data, or a copy between the host and the
# device), or whose output shape depends on data.
SYNCING = {
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "nonzero_static", "masked_select",
    "unique", "_unique2", "unique_consecutive", "multinomial", "repeat_interleave", "bincount", "histc",
}


class SyncCheck(TorchDispatchMode):
    """Records every op that syncs (``SYNCING``) and every copy between devices."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        indices = args[1] if name == "index" and len(args) > 1 else ()
        bool_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        between_devices = name in ("copy_", "_to_copy") and len({t.device.type for t in tensors}) > 1
        if name in SYNCING or bool_index or between_devices:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _regularized_step(device, explicit: str, head: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(11, 16, device=device), dr.Dropout(0.3), torch.nn.Linear(16, 16, device=device),
        torch.nn.Tanh(), dr.Dropout(0.2), torch.nn.Linear(16, 11, device=device),
    )
    reg = dr.DropoutRegularizer(model, explicit=explicit, implicit=True, head=model[-1] if head else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 11, (4, 6), device=device)
    target = torch.randint(0, 11, (4, 6), device=device)
    target[0, 0] = -100

    def step():
        with reg.capture():
            logits = model(tokens)
        reg.loss(logits, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


@pytest.mark.parametrize("explicit,head", [("sampled", True), ("sampled", False), ("true", False)])
def test_regularized_step_dispatches_no_sync(explicit, head):
    """A training step with DropoutRegularizer (forward under capture, reg.loss, backward, SGD step)
    dispatches no op that waits for the device, so it can run ahead of the GPU and be captured."""
    step, _ = _regularized_step(torch.device("cpu"), explicit, head)
    with SyncCheck() as check:
        step()
    assert check.syncs == [], f"host-syncing ops in a regularized step: {check.syncs}"


def test_sync_check_sees_syncs():
    """The check can fail: .item() and a boolean mask index are seen."""
    x = torch.randn(8)
    with SyncCheck() as check:
        x.sum().item()
        x[x > 0]
    assert "_local_scalar_dense" in check.syncs and len(check.syncs) >= 2, check.syncs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_regularized_step():
    """A whole regularized step (forward, reg.loss, backward, SGD step) captured in one CUDA graph:
    each replay draws fresh masks and noise, and its values equal an eager step's taken from the same
    parameters at the same generator state (the graph reserves the generator's offsets as the eager
    step does, in the same order)."""
    dr.set_backend("auto")
    step, model = _regularized_step("cuda", "sampled", True)
    params = list(model.parameters())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    updates = []
    for replay in range(2):
        before = [p.detach().clone() for p in params]
        state = gen.get_state()
        graph.replay()
        torch.cuda.synchronize()
        replayed = [p.detach().clone() for p in params]
        updates.append([a - b for a, b in zip(replayed, before)])
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        gen.set_state(state)
        step()
        torch.cuda.synchronize()
        for i, (p, r) in enumerate(zip(params, replayed)):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, i=i, k=replay: f"replay {k}, parameter {i}: graph vs eager: {m}")
    assert any(not torch.equal(a, b) for a, b in zip(*updates)), "two replays made the same update: same noise"

