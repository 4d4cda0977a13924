"""The training objective: ``DropoutRegularizer`` (capture / loss / terms / last) and ``k_sample_loss``.

The fused objective is compared with the plain-autograd one of the reference
(``reference.regularizer_objective``: CE by log_softmax, the site gradients by
``torch.autograd.grad(create_graph=True)``, ŷ and η from ``reference.py`` under the same RNG
sequence as the package), on the sites of ``record_sites``: values and parameter gradients, for
every explicit / implicit / noise choice, on an MLP, a model with an input site and a residual path
around a site, and a recurrent model (one Dropout called three times, (B, T, C) logits with ignored
rows). Then gradcheck and gradgradcheck of the whole objective, the statistical properties (the
sampled explicit term is unbiased for the closed-form value built from full Jacobians; the implicit
term is zero-mean), DROPOUT_k, evaluation / no_grad behaviour and bad input.

RNG sequence of ``reg.loss`` (regularizer.py): the forward inside ``capture()`` draws nothing
(every training-mode Dropout is a site); then ``make_rng`` gives the ŷ state and, when there are
terms to compute, a second ``make_rng`` gives the base state of the site noise, site i using
base + [0, 4·i].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS, CUDA_BACKENDS, op_backends
from torch.utils._python_dispatch import TorchDispatchMode

import dropreg_ext as dr
from dropreg_ext import reference as R

IGNORE = -100
F64 = torch.float64
REG_OPS = ("cross_entropy_sample", "ce_grad", "ce_grad_backward", "site_penalty", "site_penalty_backward")


def _reg_backends(params):
    for op in REG_OPS:
        params = op_backends(op, params)
    return params


REG_BACKENDS = _reg_backends(CPU_BACKENDS)
# backends for the large grids: interpreted Triton costs ~1 s per objective, it gets its own few cases
FAST_BACKENDS = [p for p in REG_BACKENDS if p.id != "triton-interp"]
TRITON_BACKENDS = [p for p in REG_BACKENDS if p.id == "triton-interp"]
CHECKED_BACKENDS = FAST_BACKENDS  # cpu and reference check class indices on the host
# The statistical tests run on the default backend: the other backends' ŷ and η are bit-identical to
# it (test_cross_entropy, test_site_penalty), so repeating the draws there adds time, not coverage.
STAT_BACKEND = "cpu" if dr._ext.HAS_CPU else "reference"


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def mlp(q=0.3, d_in=3, d_h=5, c=4, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, d_h), torch.nn.Tanh(), dr.Dropout(q), torch.nn.Linear(d_h, c)
    ).double()


class SkipNet(torch.nn.Module):
    """A site on the input (h needs no gradient) and a residual path around a second site: the
    site gradient is ∂(·)/∂o through l2 only, not the total gradient of h."""

    def __init__(self, classes=4):
        super().__init__()
        self.drop_in = dr.Dropout(0.2)
        self.l1 = torch.nn.Linear(3, 5)
        self.drop = dr.Dropout(0.4)
        self.l2 = torch.nn.Linear(5, 5)
        self.out = torch.nn.Linear(5, classes)

    def forward(self, x):
        h = torch.tanh(self.l1(self.drop_in(x)))
        return self.out(h + torch.tanh(self.l2(self.drop(h))))


class RecurrentNet(torch.nn.Module):
    """One Dropout called T times: d_t = drop(h_t) feeds the logits at t and the next state, so
    site t's gradient comes from all later steps. x (B, T, 3) → logits (B, T, 4)."""

    def __init__(self, q=0.25):
        super().__init__()
        self.inp = torch.nn.Linear(3, 4)
        self.rec = torch.nn.Linear(4, 4)
        self.drop = dr.Dropout(q)
        self.out = torch.nn.Linear(4, 4)

    def forward(self, x):
        d = x.new_zeros(x.shape[0], 4)
        logits = []
        for t in range(x.shape[1]):
            d = self.drop(torch.tanh(self.inp(x[:, t]) + self.rec(d)))
            logits.append(self.out(d))
        return torch.stack(logits, 1)


class ChannelNet(torch.nn.Module):
    """Channel and locked dropout are sites too: Dropout1d on (B, C, L) features and LockedDropout
    (batch_first) on (B, T, H) features; every element of a site is treated as independent."""

    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 5)
        self.drop1d = dr.Dropout1d(0.3)
        self.locked = dr.LockedDropout(0.2, batch_first=True)
        self.out = torch.nn.Linear(3 * 5, 4)

    def forward(self, x):  # x (B, 3, 4) → logits (B, 4)
        h = self.drop1d(torch.tanh(self.l1(x)))  # (B, 3, 5): B sequences of 3 steps
        return self.out(self.locked(h).flatten(1))


def make_case(name, seed=0):
    """(model, x, target) in float64, targets with ignored rows."""
    gen = torch.Generator().manual_seed(100 + seed)
    if name == "mlp":
        model = mlp(seed=seed)
        x = torch.randn(5, 3, generator=gen, dtype=F64)
        target = torch.tensor([0, 3, IGNORE, 1, 2])
    elif name == "channel":
        torch.manual_seed(seed)
        model = ChannelNet().double()
        x = torch.randn(3, 3, 4, generator=gen, dtype=F64)
        target = torch.tensor([1, IGNORE, 3])
    elif name == "skip":
        torch.manual_seed(seed)
        model = SkipNet().double()
        x = torch.randn(4, 3, generator=gen, dtype=F64)
        target = torch.tensor([2, IGNORE, 0, 3])
    elif name == "wide":  # more classes than the output layer has inputs (C = 9 > d = 5), as in a language model
        torch.manual_seed(seed)
        model = SkipNet(classes=9).double()
        x = torch.randn(6, 3, generator=gen, dtype=F64)
        target = torch.tensor([2, IGNORE, 8, 0, 5, 3])
    else:
        torch.manual_seed(seed)
        model = RecurrentNet().double()
        x = torch.randn(2, 3, 3, generator=gen, dtype=F64)
        target = torch.tensor([[1, IGNORE, 3], [0, 2, IGNORE]])
    return model, x, target


# ------------------------------------------------------------------------------------------------
# The fused objective against the plain-autograd one (reference.regularizer_objective, docs/design.md §2)
# ------------------------------------------------------------------------------------------------


def run_package(model, x, target, seed, ignore_index=IGNORE, head=None, **kwargs):
    reg = dr.DropoutRegularizer(model, head=head, **kwargs)
    torch.manual_seed(seed)
    with reg.capture():
        logits = model(x)
    loss = reg.loss(logits, target, ignore_index)
    return reg, loss


def run_plain(model, x, target, seed, ignore_index=IGNORE, **kwargs):
    """The plain-autograd objective (reference.regularizer_objective) on the sites of one forward,
    drawing the RNG states in the package's order (ŷ first, then each site's noise)."""
    torch.manual_seed(seed)
    with dr.record_sites(model) as sites:
        logits = model(x)
    rng_label = dr.ops.make_rng(logits.device)
    J, ex, im, yhat = R.regularizer_objective(logits, target, sites, ignore_index=ignore_index, rng_label=rng_label,
                                              rng_noise=lambda: dr.ops.make_rng(logits.device), **kwargs)
    return J, ex, im, yhat, len(sites)


TIGHT = dict(rtol=1e-9, atol=1e-12)


def assert_matches_plain(model, x, target, seed=7, ignore_index=IGNORE, head=None, **kwargs):
    """Package objective == plain objective: value, reg.last terms and every parameter gradient."""
    params = [p for p in model.parameters()]
    reg, loss = run_package(model, x, target, seed, ignore_index, head, **kwargs)
    got = torch.autograd.grad(loss, params)
    J, ex, im, _, n_sites = run_plain(model, x, target, seed, ignore_index, **kwargs)
    want_loss = J + ex + im
    want = torch.autograd.grad(want_loss, params)
    assert n_sites > 0
    torch.testing.assert_close(reg.last["loss"], J.detach(), **TIGHT)
    torch.testing.assert_close(reg.last["explicit"], ex.detach(), **TIGHT)
    torch.testing.assert_close(reg.last["implicit"], im.detach(), **TIGHT)
    torch.testing.assert_close(loss.detach(), want_loss.detach(), **TIGHT)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a, b, **TIGHT, msg=lambda m, name=name: f"grad of {name}: {m}")
    return reg


# explicit × implicit × noise; the noise kind only matters with the implicit term
CONFIGS = [
    pytest.param(explicit, implicit, noise, id=f"{explicit}-{'imp' if implicit else 'noimp'}-{noise}")
    for explicit in ("sampled", "true", None)
    for implicit, noise in ((True, "rademacher"), (True, "dropout"), (False, "rademacher"))
]


@pytest.mark.parametrize("model_name", ["mlp", "skip", "recurrent", "channel"])
@pytest.mark.parametrize("explicit, implicit, noise", CONFIGS)
@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_objective_matches_plain_autograd(be, explicit, implicit, noise, model_name):
    dr.set_backend(be.name)
    model, x, target = make_case(model_name)
    reg = assert_matches_plain(model, x, target, explicit=explicit, implicit=implicit, noise=noise,
                               scale=1.5, noise_scale=0.7)
    if explicit is not None:
        assert float(reg.last["explicit"]) > 0
    if implicit:
        assert float(reg.last["implicit"]) != 0


@pytest.mark.parametrize("model_name", ["mlp", "recurrent"])
@pytest.mark.parametrize("be", TRITON_BACKENDS)
def test_objective_matches_plain_autograd_triton(be, model_name):
    dr.set_backend(be.name)
    model, x, target = make_case(model_name)
    assert_matches_plain(model, x, target, explicit="sampled" if model_name == "mlp" else "true", implicit=True,
                         noise="rademacher" if model_name == "mlp" else "dropout")


CUDA_REG_BACKENDS = _reg_backends(CUDA_BACKENDS)


@pytest.mark.parametrize("model_name, explicit, implicit, noise", [
    pytest.param("mlp", "sampled", True, "rademacher", id="mlp-sampled-imp-rademacher"),
    pytest.param("skip", None, True, "dropout", id="skip-noexp-imp-dropout"),
    pytest.param("recurrent", "true", True, "dropout", id="recurrent-true-imp-dropout"),
    pytest.param("channel", "sampled", False, "rademacher", id="channel-sampled-noimp"),
])
@pytest.mark.parametrize("be", CUDA_REG_BACKENDS)
def test_objective_matches_plain_autograd_cuda(be, model_name, explicit, implicit, noise):
    """On a GPU: the objective, its three terms and every parameter gradient equal the plain-autograd
    objective's (float64, same RNG draws from the CUDA generator)."""
    dr.set_backend(be.name)
    model, x, target = make_case(model_name)
    model.cuda()
    reg = assert_matches_plain(model, x.cuda(), target.cuda(), explicit=explicit, implicit=implicit, noise=noise,
                               scale=1.5, noise_scale=0.7)
    if explicit is not None:
        assert float(reg.last["explicit"]) > 0
    if implicit:
        assert float(reg.last["implicit"]) != 0


@pytest.mark.parametrize("head", [False, True], ids=["generic", "head"])
@pytest.mark.parametrize("be", CUDA_REG_BACKENDS)
def test_float32_transformer_sized_objective_matches_plain_cuda(be, head):
    """A float32 MLP at GPU sizes (batch 256, width 1024, 32000 classes, so the logits take the CUDA
    block mode and Triton several chunks), with and without head=: objective and gradients within
    float32 accuracy of the plain-autograd objective."""
    dr.set_backend(be.name)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), dr.Dropout(0.1),
                                torch.nn.Linear(1024, 32000)).cuda()
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(256, 512, device="cuda", generator=gen)
    target = torch.randint(0, 32000, (256,), device="cuda", generator=gen)
    target[::7] = IGNORE
    params = list(model.parameters())
    reg, loss = run_package(model, x, target, 5, head=model[-1] if head else None, explicit="sampled", implicit=True)
    got = torch.autograd.grad(loss, params)
    J, ex, im, _, _ = run_plain(model, x, target, 5, explicit="sampled", implicit=True)
    want = torch.autograd.grad(J + ex + im, params)
    torch.testing.assert_close(reg.last["loss"], J.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reg.last["explicit"], ex.detach(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(reg.last["implicit"], im.detach(), rtol=1e-4, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_default_coefficients(be):
    """scale = noise_scale = 1 by default: λ_i = ½·q/(1-q)."""
    dr.set_backend(be.name)
    model, x, target = make_case("skip")
    assert_matches_plain(model, x, target, explicit="sampled", implicit=True, noise="dropout")


@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_sampled_label_equal_to_ignore_index_still_counts(be):
    """ignore_index may be a class index (torch.nn.functional.cross_entropy allows it). Rows are
    excluded by their target (DESIGN §2); on a valid row, ŷ_r ~ softmax(z_r) may legitimately draw
    the class equal to ignore_index, and that row must still contribute to R_i."""
    dr.set_backend(be.name)
    ignore_index = 1
    model = mlp(c=3, seed=3)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 3, generator=gen, dtype=F64)
    target = torch.tensor([0, 1, 2, 0, 2, 1, 0, 2, 2, 0, 1, 2, 0, 0, 2, 2])
    J, ex, im, yhat, _ = run_plain(model, x, target, 7, ignore_index, explicit="sampled", implicit=False)
    assert bool(((target != ignore_index) & (yhat == ignore_index)).any()), "seed must exercise the case"
    assert_matches_plain(model, x, target, ignore_index=ignore_index, explicit="sampled", implicit=False)


def _count_vjps(monkeypatch):
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("create_graph", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


@pytest.mark.parametrize(
    "explicit, vjps", [pytest.param("true", 1, id="true-one-vjp"), pytest.param("sampled", 2, id="sampled-two")]
)
@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_true_label_with_implicit_uses_one_vjp(be, explicit, vjps, monkeypatch):
    """explicit="true" + implicit: ∂J/∂o_i = g_e/N_eff, so one autograd.grad call serves both terms;
    the result equals the two-VJP plain implementation (recurrent model, ignored rows)."""
    dr.set_backend(be.name)
    model, x, target = make_case("recurrent")
    reg = dr.DropoutRegularizer(model, explicit=explicit, implicit=True)
    torch.manual_seed(11)
    with reg.capture():
        logits = model(x)
    calls = _count_vjps(monkeypatch)
    loss = reg.loss(logits, target)
    assert calls == [True] * vjps, f"autograd.grad calls (create_graph flags) in loss(): {calls}"
    monkeypatch.undo()
    params = list(model.parameters())
    got = torch.autograd.grad(loss, params)
    J, ex, im, _, _ = run_plain(model, x, target, 11, explicit=explicit, implicit=True)
    want = torch.autograd.grad(J + ex + im, params)
    torch.testing.assert_close(loss.detach(), (J + ex + im).detach(), **TIGHT)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TIGHT)


# ------------------------------------------------------------------------------------------------
# head=: the site gradients from cotangents at the output layer's input
# ------------------------------------------------------------------------------------------------

HEADS = {"mlp": lambda m: m[-1], "skip": lambda m: m.out, "wide": lambda m: m.out, "channel": lambda m: m.out}


@pytest.mark.parametrize("model_name", sorted(HEADS))
@pytest.mark.parametrize("explicit, implicit, noise", CONFIGS)
@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_head_objective_matches_plain_autograd(be, explicit, implicit, noise, model_name):
    """With the output layer given (head=), the same objective and parameter gradients as plain
    autograd: the cotangents enter at the head's input (c W), and where C > d ("wide") the implicit
    term's is derived from the sampled one's (G W + W[ŷ] - W[y]); ignored rows included."""
    dr.set_backend(be.name)
    model, x, target = make_case(model_name)
    assert_matches_plain(model, x, target, head=HEADS[model_name](model), explicit=explicit, implicit=implicit,
                         noise=noise, scale=1.5, noise_scale=0.7)


class _Products(TorchDispatchMode):
    """Counts the matrix products with an (N, C) operand or result."""

    def __init__(self, n, c):
        super().__init__()
        self.shapes, self.count = {(n, c), (c, n)}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            if any(isinstance(a, torch.Tensor) and tuple(a.shape) in self.shapes for a in (*args, out)):
                self.count += 1
        return out


@pytest.mark.parametrize("c, with_head", [pytest.param(7, 6, id="C>d"), pytest.param(4, 9, id="C<d")])
@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_head_saves_three_products_with_the_weight(be, c, with_head):
    """explicit="sampled" + implicit: without head= both cotangents (N, C) are multiplied by the
    output layer's weight (C, d) (and both products differentiated: two more each), 9 products with
    the forward's and the head's backward; with head= and C > d only the sampled one is (6); with
    C <= d the (N, d) rows would cost more than they save, and nothing changes. Objective and
    backward, counted by the aten calls with an (N, C) operand."""
    dr.set_backend(be.name)
    torch.manual_seed(0)
    model = mlp(d_in=3, d_h=5, c=c)
    x, target = torch.randn(6, 3, dtype=F64), torch.tensor([0, c - 1, IGNORE, 1, 2, 3])
    counts = []
    for head in (None, model[-1]):
        products = _Products(6, c)
        with products:
            _, loss = run_package(model, x, target, 3, head=head, explicit="sampled", implicit=True)
            loss.backward()
        counts.append(products.count)
    assert counts == [9, with_head], f"products with an (N, C) operand without / with head=: {counts}"


def test_head_reshaped_logits_and_float32():
    """Logits (B, T, C) from a Linear on (B, T, d), passed flattened (a view with the same rows), in
    float32: the objective and gradients agree with those without head= to float32 accuracy."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), dr.Dropout(0.3), torch.nn.Linear(8, 11))
    x = torch.randn(2, 5, 3)
    target = torch.randint(0, 11, (2, 5))
    target[0, 1] = IGNORE
    params = list(model.parameters())
    results = []
    for head in (None, model[-1]):
        reg = dr.DropoutRegularizer(model, head=head)
        torch.manual_seed(9)
        with reg.capture():
            logits = model(x)
        loss = reg.loss(logits.reshape(-1, 11), target.reshape(-1))
        results.append((loss.detach(), reg.last, torch.autograd.grad(loss, params)))
    (loss0, last0, grads0), (loss1, last1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for key in last0:
        torch.testing.assert_close(last1[key], last0[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_head_errors():
    model, x, target = make_case("mlp")
    reg = dr.DropoutRegularizer(model, head=torch.nn.Linear(5, 4).double())  # not the model's layer
    with reg.capture():
        logits = model(x)
    with pytest.raises(RuntimeError, match=r"'head'.*not called"):
        reg.loss(logits, target)
    reg = dr.DropoutRegularizer(model, head=model[-1])
    with reg.capture():
        logits = model(x)
    with pytest.raises(ValueError, match=r"argument 'logits' must be the output of the regularizer's head"):
        reg.loss(logits * 1, target)
    model, x, target = make_case("recurrent")  # the output layer is called once per step
    reg = dr.DropoutRegularizer(model, head=model.out)
    with reg.capture():
        logits = model(x)
    with pytest.raises(ValueError, match=r"argument 'logits'"):
        reg.loss(logits, target)


# ------------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck of the whole objective (float64)
# ------------------------------------------------------------------------------------------------

GRADCHECK_CONFIGS = [
    pytest.param("sampled", True, "rademacher", id="sampled-imp-rademacher"),
    pytest.param("true", True, "dropout", id="true-imp-dropout"),
    pytest.param(None, True, "rademacher", id="none-imp"),
    pytest.param("sampled", False, "rademacher", id="sampled-noimp"),
]


def _objective(model, target, **kwargs):
    reg = dr.DropoutRegularizer(model, **kwargs)

    def f(x, params=None):
        torch.manual_seed(1234)  # the same ŷ and η at every evaluation
        with reg.capture():
            logits = model(x) if params is None else torch.func.functional_call(model, params, (x,))
        return reg.loss(logits, target)

    return f


def _objective_of_input(be, explicit, implicit, noise):
    """Backend ``be`` set; the objective of mlp(q=0.3, seed=1) for targets [1, 3], and a fixed
    (2, 3) float64 input requiring grad."""
    dr.set_backend(be.name)
    model = mlp(q=0.3, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, generator=gen, dtype=F64, requires_grad=True)
    return _objective(model, torch.tensor([1, 3]), explicit=explicit, implicit=implicit, noise=noise), x


def _assert_gradcheck_wrt_weight(f, model, x, name):
    """gradcheck and gradgradcheck of ``f(x, params)`` w.r.t. the parameter ``name``, made an explicit
    input through torch.func.functional_call (the other parameters detached)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    w = params[name].clone().requires_grad_()

    def g(w):
        return f(x, {**params, name: w})

    assert torch.autograd.gradcheck(g, (w,))
    assert torch.autograd.gradgradcheck(g, (w,))


@pytest.mark.parametrize("explicit, implicit, noise", GRADCHECK_CONFIGS)
@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_objective_gradcheck_wrt_input(be, explicit, implicit, noise):
    f, x = _objective_of_input(be, explicit, implicit, noise)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_objective_gradcheck_wrt_parameter(be):
    """A weight made an explicit input through torch.func.functional_call."""
    dr.set_backend(be.name)
    model = mlp(q=0.4, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, generator=gen, dtype=F64)
    f = _objective(model, torch.tensor([0, 2]), explicit="sampled", implicit=True, noise="dropout")
    _assert_gradcheck_wrt_weight(f, model, x, "0.weight")


@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_head_objective_gradcheck_wrt_head_weight(be):
    """head= under torch.func.functional_call: the objective uses the weight the call saw, so the
    output layer's weight as an explicit input passes gradcheck and gradgradcheck."""
    dr.set_backend(be.name)
    model = mlp(q=0.4, seed=5, d_h=3, c=6)  # C > d: the implicit cotangent from the sampled one
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 3, generator=gen, dtype=F64)
    f = _objective(model, torch.tensor([0, IGNORE, 5]), explicit="sampled", implicit=True, noise="rademacher",
                   head=model[-1])
    _assert_gradcheck_wrt_weight(f, model, x, "3.weight")


@pytest.mark.parametrize("be", TRITON_BACKENDS)
def test_objective_gradcheck_triton(be):
    f, x = _objective_of_input(be, "sampled", True, "rademacher")
    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)


# ------------------------------------------------------------------------------------------------
# Statistics: the sampled explicit term is unbiased, the implicit term is zero-mean
# ------------------------------------------------------------------------------------------------

STATS: dict = {}


def _replicated_batches(model, x, target, reg, batches, copies):
    """Per batch, the terms of the objective on ``copies`` copies of (x, target): each copy's rows
    draw their own ŷ and η (the streams are keyed by element index), so a batch value is the mean
    over ``copies`` independent draws; batches are independent (fresh RNG states)."""
    xr, tr = x.repeat(copies, 1), target.repeat(copies)
    values = []
    for _ in range(batches):
        with reg.capture():
            logits = model(xr)
        _, ex, im = reg.terms(logits, tr)
        values.append((float(ex.detach()), float(im.detach())))
    return torch.tensor(values, dtype=F64)


def test_sampled_explicit_term_is_unbiased():
    """E_ŷ[λ R] = λ (1/N) Σ_r ⟨diag(J_rᵀ H_r J_r), h_r²⟩, H_r = diag(p_r) - p_r p_rᵀ, J_r = ∂z_r/∂o_r
    from the full Jacobian (torch.autograd.functional.jacobian). 40 batches × 100 copies = 4000
    draws; bound: |mean - exact| < 5 standard errors (estimated from the 40 batch means)."""
    dr.set_backend(STAT_BACKEND)
    q = 0.3
    model = mlp(q=q, seed=4)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, generator=gen, dtype=F64)
    target = torch.tensor([0, 1, 2, 3])

    with torch.no_grad():
        h = torch.tanh(model[0](x))
        p = torch.softmax(model[3](h), -1)
    jac = torch.autograd.functional.jacobian(model[3], h)  # (N, C, N, d)
    exact = 0.0
    for r in range(x.shape[0]):
        J_r = jac[r, :, r, :]
        H_r = torch.diag(p[r]) - torch.outer(p[r], p[r])
        exact += float((torch.diagonal(J_r.T @ H_r @ J_r) * h[r] ** 2).sum())
    exact *= 0.5 * q / (1 - q) / x.shape[0]

    torch.manual_seed(2020)
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=False)
    values = _replicated_batches(model, x, target, reg, batches=40, copies=100)[:, 0]
    mean, se = float(values.mean()), float(values.std() / math.sqrt(values.numel()))
    z = (mean - exact) / se
    STATS[f"explicit-{STAT_BACKEND}"] = dict(mean=mean, exact=exact, se=se, z=z)
    print(f"unbiasedness {STAT_BACKEND}: mean {mean:.6g}, exact {exact:.6g}, se {se:.3g}, z = {z:.3f}")
    assert se > 0 and abs(z) < 5, f"mean {mean} vs exact {exact}: z = {z}"


@pytest.mark.parametrize("noise", ["rademacher", "dropout"])
def test_implicit_term_is_zero_mean(noise):
    """T = Σ ⟨g_i, η_i ⊙ h_i⟩ with E[η] = 0: 30 batches × 50 copies; |mean| < 5 standard errors."""
    dr.set_backend(STAT_BACKEND)
    model = mlp(q=0.4, seed=5)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, generator=gen, dtype=F64)
    torch.manual_seed(2021)
    reg = dr.DropoutRegularizer(model, explicit=None, implicit=True, noise=noise)
    values = _replicated_batches(model, x, torch.tensor([0, 1, 2, 3]), reg, batches=30, copies=50)[:, 1]
    mean, se = float(values.mean()), float(values.std() / math.sqrt(values.numel()))
    STATS[f"implicit-{STAT_BACKEND}-{noise}"] = dict(mean=mean, se=se, z=mean / se)
    print(f"implicit zero-mean {STAT_BACKEND} {noise}: mean {mean:.3g}, se {se:.3g}, z = {mean / se:.3f}")
    assert se > 0 and abs(mean) < 5 * se


# ------------------------------------------------------------------------------------------------
# DROPOUT_k
# ------------------------------------------------------------------------------------------------


def _k_case():
    model = mlp(q=0.3, seed=9)  # not 0.5: there the two noise kinds coincide (±1, same threshold)
    gen = torch.Generator().manual_seed(10)
    return model, torch.randn(6, 3, generator=gen, dtype=F64), torch.tensor([0, 1, IGNORE, 3, 2, 1])


@pytest.fixture
def k_case(be):
    """The DROPOUT_k case (model, input, targets) with the test's backend ``be`` set as the global one."""
    dr.set_backend(be.name)
    return _k_case()


@pytest.mark.parametrize("be", REG_BACKENDS)
def test_k1_equals_plain_dropout_loss(k_case):
    model, x, target = k_case
    torch.manual_seed(3)
    a = dr.k_sample_loss(model, x, target, 1)
    ga = torch.autograd.grad(a, list(model.parameters()))
    torch.manual_seed(3)
    b = F.cross_entropy(model(x), target, ignore_index=IGNORE)
    gb = torch.autograd.grad(b, list(model.parameters()))
    assert torch.equal(a, b)
    for u, v in zip(ga, gb):
        assert torch.equal(u, v)
    torch.manual_seed(3)  # implicit_correction has no effect for k = 1
    assert torch.equal(dr.k_sample_loss(model, x, target, 1, implicit_correction=True), b)


@pytest.mark.parametrize("be", FAST_BACKENDS)
def test_k_sample_loss_is_mean_of_k_losses(k_case):
    model, x, target = k_case
    torch.manual_seed(4)
    a = dr.k_sample_loss(model, x, target, 3)
    torch.manual_seed(4)
    losses = torch.stack([F.cross_entropy(model(x), target, ignore_index=IGNORE) for _ in range(3)])
    assert torch.equal(a, losses.mean())
    assert len(set(losses.tolist())) == 3, "the k masks must differ"
    # custom loss_fn, and (B, T, C) logits through the default loss
    torch.manual_seed(5)
    c = dr.k_sample_loss(model, x, target, 2, loss_fn=lambda out, t: (out**2).mean())
    torch.manual_seed(5)
    assert torch.equal(c, torch.stack([(model(x) ** 2).mean() for _ in range(2)]).mean())
    rmodel, rx, rtarget = make_case("recurrent")
    torch.manual_seed(6)
    d = dr.k_sample_loss(rmodel, rx, rtarget, 2)
    torch.manual_seed(6)
    want = [F.cross_entropy(rmodel(rx).reshape(-1, 4), rtarget.reshape(-1), ignore_index=IGNORE) for _ in range(2)]
    assert torch.equal(d, torch.stack(want).mean())


@pytest.mark.parametrize("noise", ["rademacher", "dropout"])
def test_k_sample_implicit_correction(noise):
    """The correction is sqrt(1 - 1/k)·T of a DropoutRegularizer(explicit=None) on one more forward:
    its value is zero-mean (64 seeds, |mean| < 5 standard errors) and its gradient is not zero."""
    dr.set_backend(STAT_BACKEND)
    model, x, target = _k_case()
    params = list(model.parameters())
    k = 2
    diffs = []
    for seed in range(64):
        torch.manual_seed(seed)
        base = dr.k_sample_loss(model, x, target, k)
        torch.manual_seed(seed)
        corrected = dr.k_sample_loss(model, x, target, k, implicit_correction=True, noise=noise)
        diffs.append(float((corrected - base).detach()))
        if seed == 0:
            grad_diff = [a - b for a, b in zip(torch.autograd.grad(corrected, params),
                                               torch.autograd.grad(base, params))]
            assert max(float(g.abs().max()) for g in grad_diff) > 1e-6, "the correction must inject gradient"
            # exactly T of the regularizer under the same RNG sequence, scaled by sqrt(1 - 1/k)
            torch.manual_seed(seed)
            for _ in range(k):
                model(x)
            reg = dr.DropoutRegularizer(model, explicit=None, implicit=True, noise=noise,
                                        noise_scale=math.sqrt(1 - 1 / k))
            with reg.capture():
                logits = model(x)
            _, _, T = reg.terms(logits, target)
            assert math.isclose(diffs[0], float(T.detach()), rel_tol=1e-9, abs_tol=1e-15)
    d = torch.tensor(diffs, dtype=F64)
    mean, se = float(d.mean()), float(d.std() / math.sqrt(d.numel()))
    STATS[f"k-correction-{STAT_BACKEND}-{noise}"] = dict(mean=mean, se=se, z=mean / se)
    print(f"k-sample correction {STAT_BACKEND} {noise}: mean {mean:.3g}, se {se:.3g}, z = {mean / se:.3f}")
    assert se > 0 and abs(mean) < 5 * se


@pytest.mark.parametrize("k", [0, -1, 1.5, 2.0, True, "2", None])
def test_k_sample_bad_k(k):
    model, x, target = _k_case()
    with pytest.raises(ValueError, match=r"argument 'k'"):
        dr.k_sample_loss(model, x, target, k)


# ------------------------------------------------------------------------------------------------
# Evaluation, no_grad, sites without effect
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("be", REG_BACKENDS)
def test_no_grad_records_nothing_and_returns_J(k_case):
    """Under torch.no_grad() the model runs as usual (dropout applied) and loss() returns J only."""
    model, x, target = k_case
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True)
    torch.manual_seed(1)
    with torch.no_grad():
        with reg.capture():
            logits = model(x)
        loss = reg.loss(logits, target)
    torch.manual_seed(1)
    with torch.no_grad():
        assert torch.equal(logits, model(x)), "the forward must be the ordinary dropout forward"
        assert not torch.equal(logits, model.eval()(x))
    assert float(reg.last["explicit"]) == 0 and float(reg.last["implicit"]) == 0
    assert torch.equal(loss, reg.last["loss"])
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=IGNORE), rtol=1e-12, atol=0)


@pytest.mark.parametrize("be", REG_BACKENDS)
def test_eval_mode_has_no_sites(k_case):
    model, x, target = k_case
    model.eval()
    reg = dr.DropoutRegularizer(model)
    with reg.capture():
        logits = model(x)
    assert torch.equal(logits, model(x))
    with pytest.warns(UserWarning, match="recorded no dropout site"):  # not silently (tests/test_shared_masks.py)
        loss = reg.loss(logits, target)
    assert float(reg.last["explicit"]) == 0 and float(reg.last["implicit"]) == 0
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=IGNORE), rtol=1e-12, atol=0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_p0_dropout_and_model_without_dropout_give_J_only():
    for model in (mlp(q=0.0), torch.nn.Linear(3, 4).double()):
        reg = dr.DropoutRegularizer(model)
        with reg.capture():
            logits = model(torch.randn(3, 3, dtype=F64))
        target = torch.tensor([0, 1, 2])
        with pytest.warns(UserWarning, match="recorded no dropout site"):
            loss = reg.loss(logits, target)
        assert float(reg.last["explicit"]) == 0 and float(reg.last["implicit"]) == 0
        torch.testing.assert_close(loss, F.cross_entropy(logits, target), rtol=1e-12, atol=0)


def test_site_the_logits_do_not_depend_on():
    """A site whose output is unused has no gradient: it contributes nothing and does not fail."""

    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.drop = dr.Dropout(0.3)

        def forward(self, x):
            self.drop(x * 2)
            return self.lin(x)

    model = Unused().double()
    x = torch.randn(3, 3, dtype=F64)
    reg = dr.DropoutRegularizer(model, explicit="sampled", implicit=True)
    with reg.capture():
        logits = model(x)
    loss = reg.loss(logits, torch.tensor([0, 1, 2]))
    assert float(reg.last["explicit"]) == 0 and float(reg.last["implicit"]) == 0
    loss.backward()


def test_last_is_detached_and_all_ignored_rows_give_zero():
    model, x, _ = _k_case()
    reg, loss = run_package(model, x, torch.tensor([0, 1, IGNORE, 3, 2, 1]), 3)
    assert set(reg.last) == {"loss", "explicit", "implicit"}
    assert all(not v.requires_grad for v in reg.last.values()) and loss.requires_grad
    reg, loss = run_package(model, x, torch.full((6,), IGNORE), 3)
    assert float(loss.detach()) == 0 and all(float(v) == 0 for v in reg.last.values())
    loss.backward()
    assert all(bool(p.grad.isfinite().all()) for p in model.parameters())


def test_float32_model_matches_plain():
    """A float32 model through the default backend: the objective and gradients agree with the
    plain float32 implementation to float32 accuracy."""
    model, x, target = make_case("recurrent")
    model.float()
    x = x.float()
    params = list(model.parameters())
    reg, loss = run_package(model, x, target, 5, explicit="sampled", implicit=True)
    assert loss.dtype == torch.float32
    got = torch.autograd.grad(loss, params)
    J, ex, im, _, _ = run_plain(model, x, target, 5, explicit="sampled", implicit=True)
    want = torch.autograd.grad(J + ex + im, params)
    torch.testing.assert_close(loss, J + ex + im, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ------------------------------------------------------------------------------------------------

M = torch.nn.Linear(2, 2)
BAD_CONSTRUCTORS = [
    ("model-int", dict(model=42), TypeError, r"argument 'model'"),
    ("explicit-bogus", dict(explicit="bogus"), ValueError, r"argument 'explicit'.*bogus"),
    ("explicit-bool", dict(explicit=True), ValueError, r"argument 'explicit'"),
    ("implicit-int", dict(implicit=1), TypeError, r"argument 'implicit'"),
    ("implicit-str", dict(implicit="yes"), TypeError, r"argument 'implicit'"),
    ("noise-bogus", dict(noise="gauss"), ValueError, r"argument 'noise'.*gauss"),
    ("noise-none", dict(noise=None), ValueError, r"argument 'noise'"),
    ("scale-negative", dict(scale=-1.0), ValueError, r"argument 'scale'"),
    ("scale-nan", dict(scale=float("nan")), ValueError, r"argument 'scale'"),
    ("scale-inf", dict(scale=float("inf")), ValueError, r"argument 'scale'"),
    ("scale-bool", dict(scale=True), ValueError, r"argument 'scale'"),
    ("scale-str", dict(scale="1"), ValueError, r"argument 'scale'"),
    ("noise_scale-negative", dict(noise_scale=-0.5), ValueError, r"argument 'noise_scale'"),
    ("noise_scale-nan", dict(noise_scale=float("nan")), ValueError, r"argument 'noise_scale'"),
    ("noise_scale-none", dict(noise_scale=None), ValueError, r"argument 'noise_scale'"),
    ("head-relu", dict(head=torch.nn.ReLU()), TypeError, r"argument 'head'.*ReLU"),
    ("head-str", dict(head="auto"), TypeError, r"argument 'head'"),
]


@pytest.mark.parametrize("kwargs, exc, match", [pytest.param(*c[1:], id=c[0]) for c in BAD_CONSTRUCTORS])
def test_bad_constructor_arguments(kwargs, exc, match):
    kwargs = {"model": M, **kwargs}
    with pytest.raises(exc, match=match):
        dr.DropoutRegularizer(**kwargs)


def _captured(model=None, x=None):
    model = model if model is not None else mlp()
    reg = dr.DropoutRegularizer(model)
    with reg.capture():
        logits = model(x if x is not None else torch.randn(3, 3, dtype=F64))
    return reg, logits


BAD_LOSS_CALLS = [
    ("target-shape", lambda lg: (torch.tensor([0, 1]),), ValueError, r"argument 'target'.*\(3,\)"),
    ("target-logits-shape", lambda lg: (torch.tensor([[0, 1, 2]]),), ValueError, r"argument 'target'"),
    ("target-float", lambda lg: (torch.tensor([0.0, 1.0, 2.0]),), TypeError, r"argument 'target'.*float"),
    ("target-bool", lambda lg: (torch.tensor([True, False, True]),), TypeError, r"argument 'target'"),
    ("target-list", lambda lg: ([0, 1, 2],), ValueError, r"argument 'target'"),
    ("ignore_index-bool", lambda lg: (torch.tensor([0, 1, 2]), True), TypeError, r"argument 'ignore_index'"),
    ("ignore_index-float", lambda lg: (torch.tensor([0, 1, 2]), -1.0), TypeError, r"argument 'ignore_index'"),
]


@pytest.mark.parametrize("make_args, exc, match", [pytest.param(*c[1:], id=c[0]) for c in BAD_LOSS_CALLS])
def test_bad_loss_arguments(make_args, exc, match):
    reg, logits = _captured()
    with pytest.raises(exc, match=match):
        reg.loss(logits, *make_args(logits))


def test_bad_logits():
    reg, _ = _captured()
    with pytest.raises(ValueError, match=r"argument 'logits'"):
        reg.loss(torch.tensor(1.0), torch.tensor(0))
    reg, _ = _captured()
    with pytest.raises(ValueError, match=r"argument 'logits'"):
        reg.loss(torch.randn(3, 0), torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("bad", [4, -1], ids=["C", "minus1"])
@pytest.mark.parametrize("be", CHECKED_BACKENDS)
def test_target_out_of_range(be, bad):
    dr.set_backend(be.name)
    reg, logits = _captured()
    with pytest.raises((ValueError, RuntimeError), match=r"argument 'target'.*\[0, 4\)"):
        reg.loss(logits, torch.tensor([0, bad, 1]))


def test_q1_site_raises_and_capture_recovers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), dr.Dropout(1.0)).double()
    reg = dr.DropoutRegularizer(model)
    with pytest.raises(ValueError, match=r"p = 1"):
        with reg.capture():
            model(torch.randn(2, 3, dtype=F64))
    model[1].p = 0.5  # the failed capture left no active capture behind
    with reg.capture():
        logits = model(torch.randn(2, 3, dtype=F64))
    reg.loss(logits, torch.tensor([0, 2]))


def test_loss_without_capture_raises():
    reg = dr.DropoutRegularizer(mlp())
    with pytest.raises(RuntimeError, match=r"capture"):
        reg.loss(torch.randn(3, 4, dtype=F64), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"capture"):
        reg.terms(torch.randn(3, 4, dtype=F64), torch.tensor([0, 1, 2]))


def test_loss_twice_after_one_capture_raises():
    reg, logits = _captured()
    target = torch.tensor([0, 1, 2])
    reg.loss(logits, target)
    with pytest.raises(RuntimeError, match=r"capture"):
        reg.loss(logits, target)


def test_nested_capture_raises():
    model = mlp()
    reg, other = dr.DropoutRegularizer(model), dr.DropoutRegularizer(model)
    with reg.capture():
        for r in (reg, other):
            with pytest.raises(RuntimeError, match=r"nested"):
                with r.capture():
                    pass
    with other.capture():  # the outer capture ended cleanly
        model(torch.randn(2, 3, dtype=F64))
