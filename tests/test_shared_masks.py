"""Sites whose dropout mask is shared (LockedDropout along time, Dropout1d/2d/3d along the spatial dims):
the mask shape each site records, the exact penalty against the exact dropout gap (every mask enumerated,
float64) for each kind, the element-wise form that does not match it, the fused objective against the
plain-autograd one for both forms; and the warning or error of a capture without sites."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import dropreg_ext as dr
from dropreg_ext import reference as R

F64 = torch.float64
Q = 0.3

# kind -> (module, per-row input shape, functional.mask_shape name); rows are dim 0 (locked: batch_first)
KINDS = {
    "locked": (lambda: dr.LockedDropout(Q, batch_first=True), (3, 3), "locked_dropout"),
    "dropout1d": (lambda: dr.Dropout1d(Q), (3, 3), "dropout1d"),
    "dropout2d": (lambda: dr.Dropout2d(Q), (2, 2, 2), "dropout2d"),
    "dropout3d": (lambda: dr.Dropout3d(Q), (2, 1, 2, 2), "dropout3d"),
}


@pytest.mark.parametrize("module, shape, mask", [
    (dr.Dropout(0.2), (4, 3, 5), (4, 3, 5)),
    (dr.Dropout1d(0.2), (4, 3, 5), (4, 3, 1)),
    (dr.Dropout1d(0.2), (3, 5), (3, 1)),
    (dr.Dropout2d(0.2), (4, 3, 5, 2), (4, 3, 1, 1)),
    (dr.Dropout3d(0.2), (4, 3, 5, 2, 2), (4, 3, 1, 1, 1)),
    (dr.Dropout3d(0.2), (3, 5, 2, 2), (3, 1, 1, 1)),
    (dr.LockedDropout(0.2), (6, 4, 5), (1, 4, 5)),
    (dr.LockedDropout(0.2, batch_first=True), (4, 6, 5), (4, 1, 5)),
], ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else "x".join(map(str, v)))
def test_sites_record_the_mask_shape(module, shape, mask):
    with dr.record_sites(module) as sites:
        module(torch.randn(shape, requires_grad=True))
    assert len(sites) == 1 and sites[0].mask_shape == mask


def test_patched_functional_sites_record_the_mask_shape():
    class Net(torch.nn.Module):
        def forward(self, x):
            return F.dropout2d(x, 0.3) + F.dropout(x, 0.1)

    with dr.patch_functional(), dr.record_sites(Net()) as sites:
        Net()(torch.randn(2, 3, 4, 4, requires_grad=True))
    assert [s.mask_shape for s in sites] == [(2, 3, 1, 1), (2, 3, 4, 4)]


class SiteThenHead(torch.nn.Module):
    """A fixed activation h through the dropout site, then a linear head over each row's features whose
    weight is the same at every position one mask element covers (a pooling head), so those positions'
    gradients are correlated and the shared mask matters. Linear after the site: the Gauss-Newton
    Hessian is the loss's exact Hessian, so the penalty and the dropout gap differ only by the Taylor
    remainder (and the sampling of ŷ)."""

    def __init__(self, kind: str, classes: int = 4, seed: int = 0):
        super().__init__()
        make, shape, name = KINDS[kind]
        gen = torch.Generator().manual_seed(seed)
        self.drop = make()
        self.name = name
        self.h = 0.1 * torch.rand((1, *shape), generator=gen, dtype=F64) + 0.02
        mask = dr.functional.mask_shape(name, self.h, batch_first=True)[1:]
        pooled = torch.randn((classes, *mask), generator=gen, dtype=F64).expand(classes, *shape)
        self.head = torch.nn.Linear(self.h[0].numel(), classes).double()
        with torch.no_grad():
            self.head.weight.copy_(pooled.reshape(classes, -1))
            self.head.bias.copy_(torch.randn(classes, generator=gen, dtype=F64))
        self.target = torch.randint(0, classes, (1,), generator=gen)

    def logits(self, h):
        return self.head(h.flatten(1))

    def forward(self, h):
        return self.logits(self.drop(h))

    def dropout_gap(self) -> float:
        """E_m[J(h ⊙ m/(1-q))] − J(h) for one row, every mask m of the module's mask shape enumerated."""
        mask_shape = dr.functional.mask_shape(self.name, self.h, batch_first=True)
        gap = -F.cross_entropy(self.logits(self.h), self.target)
        for bits in itertools.product([0.0, 1.0], repeat=torch.Size(mask_shape).numel()):
            m = torch.tensor(bits, dtype=F64).reshape(mask_shape)
            prob = torch.where(m == 1, 1 - Q, Q).prod()
            gap = gap + prob * F.cross_entropy(self.logits(self.h * m / (1 - Q)), self.target)
        return gap.item()

    def penalty(self, shared_masks: str, rows: int = 20_000) -> float:
        """λ·R of the fused regularizer on ``rows`` copies of the row: the mean over independent draws of ŷ."""
        reg = dr.DropoutRegularizer(self, explicit="sampled", implicit=False, shared_masks=shared_masks)
        torch.manual_seed(0)
        with reg.capture():
            logits = self(self.h.expand(rows, *self.h.shape[1:]))
        reg.loss(logits, self.target.expand(rows))
        return reg.last["explicit"].item()


@pytest.mark.parametrize("kind", list(KINDS))
def test_exact_penalty_is_the_second_order_dropout_gap(kind):
    """½·q/(1-q)·Σ_k (Σ_{j∈S_k} g_j h_j)² averaged over ŷ equals the dropout gap up to the Taylor
    remainder (activations ~0.1: a few percent; the sampling error of 20,000 rows is about 1%); the
    element-wise form Σ_j (g_j h_j)² misses the cross terms within each mask element and does not."""
    model = SiteThenHead(kind)
    gap = model.dropout_gap()
    assert gap > 0
    assert model.penalty("exact") == pytest.approx(gap, rel=0.05)
    assert abs(model.penalty("elementwise") / gap - 1) > 0.3


class SharedNet(torch.nn.Module):
    """Both kinds of shared sites and an element-wise one, with parameters before and after them."""

    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 5)
        self.drop1d = dr.Dropout1d(0.3)
        self.locked = dr.LockedDropout(0.2, batch_first=True)
        self.drop = dr.Dropout(0.25)
        self.out = torch.nn.Linear(3 * 5, 4)

    def forward(self, x):  # x (B, 3, 4) -> logits (B, 4)
        h = self.drop1d(torch.tanh(self.l1(x)))
        return self.out(self.drop(self.locked(h)).flatten(1))


@pytest.mark.parametrize("shared_masks", ["exact", "elementwise"])
@pytest.mark.parametrize("explicit, implicit", [("sampled", True), ("true", True), ("sampled", False)])
def test_fused_objective_equals_the_reference(shared_masks, explicit, implicit):
    """DropoutRegularizer against reference.regularizer_objective with the same random numbers (ŷ, and η
    of the site-noise stream per mask element): value, terms and every parameter gradient."""
    torch.manual_seed(0)
    model = SharedNet().double()
    x = torch.randn(5, 3, 4, dtype=F64)
    y = torch.tensor([1, 0, 3, 2, 1])
    kwargs = dict(explicit=explicit, implicit=implicit, shared_masks=shared_masks)
    reg = dr.DropoutRegularizer(model, **kwargs)
    torch.manual_seed(7)
    with reg.capture():
        logits = model(x)
    got = torch.autograd.grad(reg.loss(logits, y), list(model.parameters()))
    torch.manual_seed(7)
    with dr.record_sites(model) as sites:
        logits = model(x)
    rng_label = dr.ops.make_rng(logits.device)
    J, ex, im, _ = R.regularizer_objective(logits, y, sites, rng_label=rng_label,
                                           rng_noise=lambda: dr.ops.make_rng(logits.device), **kwargs)
    want = torch.autograd.grad(J + ex + im, list(model.parameters()))
    tight = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(reg.last["explicit"], ex.detach(), **tight)
    torch.testing.assert_close(reg.last["implicit"], im.detach(), **tight)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tight)


def test_exact_and_elementwise_differ_only_at_shared_sites():
    torch.manual_seed(0)
    shared, plain = SharedNet().double(), torch.nn.Sequential(torch.nn.Linear(4, 5), dr.Dropout(0.3)).double()
    for model, x, y, same in ((shared, torch.randn(5, 3, 4, dtype=F64), torch.tensor([1, 0, 3, 2, 1]), False),
                              (plain, torch.randn(6, 4, dtype=F64), torch.tensor([1, 0, 3, 2, 1, 4]), True)):
        terms = []
        for form in ("exact", "elementwise"):
            reg = dr.DropoutRegularizer(model, shared_masks=form)
            torch.manual_seed(3)
            with reg.capture():
                logits = model(x)
            reg.loss(logits, y)
            terms.append((reg.last["explicit"], reg.last["implicit"]))
        assert (terms[0][0] == terms[1][0]) == same and (terms[0][1] == terms[1][1]) == same


def test_shared_masks_argument_checked():
    with pytest.raises(ValueError, match="argument 'shared_masks'"):
        dr.DropoutRegularizer(torch.nn.Linear(2, 2), shared_masks="shared")


# ------------------------------------------------------------------------------------------------
# A capture without sites
# ------------------------------------------------------------------------------------------------


def _capture_and_loss(reg, model, x, y):
    with reg.capture():
        logits = model(x)
    return reg.loss(logits, y)


def test_no_site_warns_once_and_returns_plain_loss():
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    reg = dr.DropoutRegularizer(model)
    with pytest.warns(UserWarning, match="recorded no dropout site.*patch_functional") as caught:
        loss = _capture_and_loss(reg, model, x, y)
    assert caught[0].filename == __file__  # points at the caller's line
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _capture_and_loss(reg, model, x, y)  # once per regularizer
        quiet = dr.DropoutRegularizer(model, explicit=None, implicit=False)  # no terms asked for
        _capture_and_loss(quiet, model, x, y)
        with torch.no_grad():  # evaluation: no terms wanted
            _capture_and_loss(dr.DropoutRegularizer(model), model, x, y)


@pytest.mark.parametrize("make", [lambda: dr.Dropout(0.0), lambda: dr.Dropout(0.3).eval()], ids=["p0", "eval"])
def test_no_site_warns_for_p0_and_eval_modules(make):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), make())
    with pytest.warns(UserWarning, match="recorded no dropout site"):
        _capture_and_loss(dr.DropoutRegularizer(model), model, torch.randn(2, 4), torch.tensor([0, 2]))


def test_torch_dropout_left_in_the_model_raises():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.3))
    reg = dr.DropoutRegularizer(model)
    with pytest.raises(RuntimeError, match=r"\['1'\] are torch's.*replace_dropout"):
        _capture_and_loss(reg, model, torch.randn(2, 4), torch.tensor([0, 2]))
    dr.replace_dropout(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _capture_and_loss(reg, model, torch.randn(2, 4), torch.tensor([0, 2]))
