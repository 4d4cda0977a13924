"""Drop-in behaviour: torch's dropout modules and functions as the yardstick, case by case.

Each case is run twice: with torch's own module/function (so the test states what torch does, and
fails if a torch release changes it) and with ours in its place, through the module classes and
through :func:`dropreg_ext.patch_functional`. The cases follow torch's own dropout tests
(``test/nn/test_dropout.py``: layouts, discontiguous inputs, stride order, no-batch-dim inputs, whole
channels, rank warnings and errors, alpha dropout's moments, invalid p, empty inputs), written here
in our words, plus what those tests leave out (``p`` as int or 0-d tensor, eval and p = 0 identity,
inplace on every kind, uncovered dtypes).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropreg_ext as dr


def _freeze_rng():
    """The CPU generator's state saved and restored around a block (torch's ``freeze_rng_state``)."""
    state = torch.get_rng_state()

    @contextlib.contextmanager
    def block():
        torch.set_rng_state(state)
        yield

    return block


# Who plays torch's part: torch itself, our modules, torch's modules with the functions patched.
IMPLS = ["torch", "ours", "patched"]
MODULES = {
    "Dropout": (nn.Dropout, dr.Dropout),
    "Dropout1d": (nn.Dropout1d, dr.Dropout1d),
    "Dropout2d": (nn.Dropout2d, dr.Dropout2d),
    "Dropout3d": (nn.Dropout3d, dr.Dropout3d),
    "AlphaDropout": (nn.AlphaDropout, dr.AlphaDropout),
    "FeatureAlphaDropout": (nn.FeatureAlphaDropout, dr.FeatureAlphaDropout),
}


@pytest.fixture(params=IMPLS)
def impl(request):
    """``make(name, *args)`` builds the module named as torch's under the implementation, in a context
    where the patch is on for "patched" (and checked off for the others)."""
    kind = request.param
    with dr.patch_functional(kind == "patched"):

        def make(name, *args, **kwargs):
            torch_cls, our_cls = MODULES[name]
            return (our_cls if kind == "ours" else torch_cls)(*args, **kwargs)

        make.kind = kind
        yield make
    assert not dr.functional_patched()


# ------------------------------------------------------------------------------------------------
# Layout, gradients, inplace and eval (torch's _test_dropout)
# ------------------------------------------------------------------------------------------------

LAYOUT_CASES = [
    ("Dropout", (1000,), torch.float32, torch.contiguous_format),
    ("Dropout", (1000,), torch.bfloat16, torch.contiguous_format),
    ("Dropout1d", (100, 11, 13), torch.float64, torch.contiguous_format),  # 1100 channels: the mean within 4σ
    ("Dropout2d", (1000, 3, 2, 4), torch.float32, torch.contiguous_format),
    ("Dropout2d", (1000, 3, 2, 4), torch.float32, torch.channels_last),
    ("Dropout3d", (1000, 2, 2, 3, 2), torch.float32, torch.contiguous_format),
]


@pytest.mark.parametrize("name, shape, dtype, memory_format", LAYOUT_CASES)
def test_mean_layout_and_gradient_kept(impl, name, shape, dtype, memory_format):
    p = 0.2
    base = torch.full(shape, 1 - p, dtype=dtype)
    for inplace in (False, True):
        x = base.clone(memory_format=memory_format).requires_grad_()
        y = impl(name, p, inplace)(x + 0 if inplace else x)
        assert y.is_contiguous(memory_format=memory_format)
        assert abs(y.detach().double().mean() - (1 - p)) < 0.05
        y.backward(base)
        assert x.grad.is_contiguous(memory_format=memory_format)
        assert abs(x.grad.double().mean() - (1 - p)) < 0.05
    for inplace in (False, True):
        assert torch.equal(impl(name, p, inplace).eval()(base), base)
    repr(impl(name, p))


@pytest.mark.parametrize("name", ["Dropout", "Dropout2d", "Dropout3d"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_discontiguous_input_values_and_layout(impl, name, memory_format):
    for p in (0.0, 1e-10):
        x = torch.empty(2, 3, 3, 6, memory_format=memory_format)[..., ::2]
        x.copy_(torch.ones(2, 3, 3, 3))
        y = impl(name, p)(x)
        if p != 0:
            assert y.is_contiguous(memory_format=memory_format)
        else:
            assert y.stride() == x.stride()
        assert torch.equal(y, x)


def _invert(perm):
    return tuple(perm.index(d) for d in range(len(perm)))


def test_output_follows_the_input_stride_order(impl):
    ones = torch.ones(2, 3, 4, 5)
    for perm in itertools.permutations(range(4)):
        for shift in ((0, 0), (1, 0), (0, 1), (1, 1)):
            x = ones.permute(perm).contiguous().permute(_invert(perm))[shift[0]:, shift[1]:]
            for p in (1e-10, 0.3, 0.5, 0.7):
                y = impl("Dropout", p)(x)
                assert y.permute(perm).is_contiguous(), (perm, shift, p)
                assert abs(y.mean() - 1) <= 0.5 + 0.5
                assert torch.equal(y, x) == (p == 1e-10)


# ------------------------------------------------------------------------------------------------
# Channel dropout: no batch dim, whole channels, ranks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape", [("Dropout1d", (50, 2)), ("Dropout3d", (50, 2, 2, 2))])
@pytest.mark.parametrize("inplace", [False, True])
def test_unbatched_input_gets_the_batched_mask(impl, name, shape, inplace):
    x = torch.rand(shape)
    frozen = _freeze_rng()
    module = impl(name, 0.5, inplace)
    with frozen():
        unbatched = module(x.clone())
    with frozen():
        batched = module(x.clone().unsqueeze(0)).squeeze(0)
    assert torch.equal(unbatched, batched)


@pytest.mark.parametrize("name, shape", [("Dropout1d", (10, 4, 2)), ("Dropout2d", (10, 4, 2, 2)),
                                         ("Dropout3d", (10, 4, 2, 2, 2))])
@pytest.mark.parametrize("inplace", [False, True])
def test_whole_channels_are_dropped(impl, name, shape, inplace):
    y = impl(name, 0.5, inplace)(torch.ones(shape))
    per_channel = y.flatten(2).count_nonzero(-1)
    channel = y[0, 0].numel()
    assert ((per_channel == 0) | (per_channel == channel)).all()
    assert 0 < int((per_channel == 0).sum()) < per_channel.numel()


@pytest.mark.parametrize("rank", [0, 1, 4, 5])
def test_dropout1d_rank_error(impl, rank):
    with pytest.raises(RuntimeError, match=f"Expected 2D or 3D input, but received a {rank}D input"):
        impl("Dropout1d", 0.5)(torch.rand((2,) * rank))


@pytest.mark.parametrize("name, rank, pattern", [
    ("Dropout2d", 5, "Received a 5-D input to dropout2d"),
    ("Dropout2d", 2, "Received a 2-D input to dropout2d"),
    ("Dropout2d", 3, "assuming that channel-wise 1D dropout behavior is desired"),
    ("Dropout3d", 6, "Received a 6-D input to dropout3d"),
    ("Dropout3d", 3, "Received a 3-D input to dropout3d"),
    ("Dropout3d", 1, "Received a 1-D input to dropout3d"),
])
def test_channel_rank_warnings(impl, name, rank, pattern):
    with pytest.warns(UserWarning, match=pattern):
        y = impl(name, 0.5)(torch.rand((3,) * rank))
    assert y.shape == (3,) * rank


@pytest.mark.parametrize("name, rank", [("Dropout2d", 1), ("Dropout3d", 0)])
def test_feature_dropout_needs_two_dims(impl, name, rank):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="Feature dropout requires at least 2 dimensions"):
            impl(name, 0.5)(torch.rand((3,) * rank))
        # as torch: no error where nothing is drawn (eval, p = 0) or everything is zeroed (p = 1)
        x = torch.rand((3,) * rank)
        for y in (impl(name, 0.5).eval()(x), impl(name, 0.0)(x)):  # the input, or (torch, unbatched) a view of it
            assert y.data_ptr() == x.data_ptr() and torch.equal(y, x)
        assert torch.equal(impl(name, 1.0)(x), torch.zeros_like(x))


def test_dropout2d_reads_3d_input_as_n_c_l(impl):
    """Torch's historical rule: a 3-D input to Dropout2d is (N, C, L), masked per (n, c)."""
    with pytest.warns(UserWarning):
        y = impl("Dropout2d", 0.5)(torch.ones(6, 8, 16))
    per_row = y.count_nonzero(-1)
    assert ((per_row == 0) | (per_row == 16)).all() and 0 < int((per_row == 0).sum()) < 48


# ------------------------------------------------------------------------------------------------
# Alpha dropout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape", [("AlphaDropout", (5000,)), ("FeatureAlphaDropout", (1000, 3, 2, 2, 2)),
                                         ("FeatureAlphaDropout", (50, 20, 16, 16))])
def test_alpha_dropout_keeps_mean_and_std(impl, name, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    for p in (0.2, 0.5, 0.8):
        xg = x.clone().requires_grad_()
        y = impl(name, p)(xg)
        assert abs(y.detach().mean() - x.mean()) < 0.1 and abs(y.detach().std() - x.std()) < 0.1
        y.backward(x)
        assert torch.isfinite(xg.grad).all()


def test_alpha_dropout_values_are_the_two_affine_branches():
    torch.manual_seed(0)
    x = torch.randn(4096, dtype=torch.float64)
    p = 0.25
    a = 1 / ((dr.reference.SELU_ALPHA**2 * p + 1) * (1 - p)) ** 0.5
    y = dr.functional.alpha_dropout(x, p, training=True, seed=7)
    dropped = y == dr.reference.SELU_ALPHA * a * (p - 1)
    kept = ~dropped
    torch.testing.assert_close(y[kept], a * x[kept] + dr.reference.SELU_ALPHA * a * p)
    assert 0.2 < dropped.double().mean() < 0.3
    # the keep mask is the dropout mask of the same seed
    assert torch.equal(kept, dr.reference.dropout_keep(x.shape, p, dr.ops.make_rng("cpu", 7)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature", [False, True])
def test_alpha_dropout_matches_the_reference(cpu_backend, dtype, feature):
    torch.manual_seed(1)
    x = torch.randn(16, 8, 33).to(dtype)
    fn = dr.functional.feature_alpha_dropout if feature else dr.functional.alpha_dropout
    mask_shape = (16, 8, 1) if feature else None
    expected = dr.reference.alpha_dropout(x, 0.3, dr.ops.make_rng("cpu", 11), mask_shape)
    with dr.use_backend(cpu_backend.name):
        got = fn(x, 0.3, True, seed=11)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_alpha_dropout_gradcheck_and_gradgradcheck():
    x = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dr.functional.alpha_dropout(t, 0.3, True, seed=3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: dr.functional.alpha_dropout(t, 0.3, True, seed=3), (x,))


def test_alpha_modules_ignore_inplace_like_torch(impl):
    x = torch.randn(100)
    before = x.clone()
    impl("AlphaDropout", 0.5, True)(x)
    assert torch.equal(x, before)


# ------------------------------------------------------------------------------------------------
# Arguments, early returns, uncovered inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("p", [-0.1, 1.1])
def test_invalid_p_is_a_value_error(impl, name, p):
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        impl(name, p)


@pytest.mark.parametrize("fn", ["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                                "feature_alpha_dropout"])
@pytest.mark.parametrize("p", [-0.1, 1.1])
def test_invalid_p_functional(fn, p):
    x = torch.ones(2, 3, 4)
    for patched in (False, True):
        with dr.patch_functional(patched), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
                getattr(F, fn)(x, p, True)
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        getattr(dr.functional, fn)(x, p, True)


@pytest.mark.parametrize("p", [0, 1, torch.tensor(0.5), torch.tensor(0, dtype=torch.int64)])
def test_p_as_int_or_0d_tensor(impl, p):
    x = torch.ones(200)
    y = impl("Dropout", p)(x)
    if float(p) == 0:
        assert torch.equal(y, x)
    elif float(p) == 1:
        assert torch.equal(y, torch.zeros_like(x))
    else:
        assert set(y.unique().tolist()) <= {0.0, 2.0}
    with dr.patch_functional(impl.kind == "patched"):
        assert F.dropout(x, p).shape == x.shape


@pytest.mark.parametrize("name, shape", [("Dropout", (7, 3)), ("Dropout1d", (4, 3, 5)), ("Dropout2d", (2, 3, 4, 4)),
                                         ("Dropout3d", (2, 3, 2, 2, 2)), ("AlphaDropout", (7, 3)),
                                         ("FeatureAlphaDropout", (2, 3, 4))])
def test_identity_returns_the_input_itself(impl, name, shape):
    """Eval mode, p = 0 and empty inputs return the very input tensor, as torch."""
    x = torch.randn(shape)
    assert impl(name, 0.5).eval()(x) is x
    assert impl(name, 0.0)(x) is x
    empty = torch.empty((0,) + shape[1:])
    assert impl(name, 0.5)(empty) is empty


@pytest.mark.parametrize("name, shape", [("Dropout", (64, 32)), ("Dropout1d", (8, 16, 4)), ("Dropout2d", (8, 16, 2, 2)),
                                         ("Dropout3d", (8, 16, 2, 2, 1))])
def test_inplace_writes_the_input(impl, name, shape):
    x = torch.ones(shape)
    y = impl(name, 0.5, True)(x)
    assert y.data_ptr() == x.data_ptr() and torch.equal(x, y)
    assert 0 < int((x == 0).sum()) < x.numel()


def test_empty_input_functional():
    x = torch.tensor([])
    with dr.patch_functional():
        assert F.dropout(x).shape == x.shape
    assert dr.functional.dropout(x).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64])
def test_uncovered_inputs_go_to_torch(impl, dtype):
    """What the kernels do not run is torch's: its result, or its own error."""
    x = torch.ones(8, 4, dtype=dtype)
    try:
        expected = ("ok", nn.Dropout(0.5).eval()(x))
        nn.Dropout(0.5)(x)
    except RuntimeError as exc:
        expected = ("error", type(exc))
    module = impl("Dropout", 0.5)
    if expected[0] == "ok":
        try:
            module(x)
        except RuntimeError as exc:  # torch's own error for this dtype
            assert impl.kind != "torch", exc
    assert torch.equal(module.eval()(x), x)


def test_meta_tensors_go_to_torch():
    x = torch.empty(4, 5, device="meta")
    assert dr.Dropout(0.5)(x).device.type == "meta"
    with dr.patch_functional():
        assert F.dropout(x, 0.5).shape == (4, 5)


# ------------------------------------------------------------------------------------------------
# patch_functional: on/off, nesting, torch.compile, regularizer sites
# ------------------------------------------------------------------------------------------------


def test_patch_call_stays_and_context_restores():
    original = dr.functional.TORCH_FUNCTIONS["dropout"]
    assert F.dropout is original
    handle = dr.patch_functional()
    try:
        assert dr.functional_patched() and F.dropout is not original
        with dr.patch_functional(False):
            assert F.dropout is original
            with dr.patch_functional(True):
                assert dr.functional_patched()
            assert not dr.functional_patched()
        assert dr.functional_patched()
    finally:
        handle.__exit__(None, None, None)
    assert F.dropout is original
    with pytest.raises(TypeError, match="argument 'enabled'"):
        dr.patch_functional(1)


def test_patched_function_draws_the_fused_mask():
    x = torch.ones(4096)
    with dr.patch_functional():
        torch.manual_seed(9)
        y = F.dropout(x, 0.3)
        # torch's own modules call F.dropout: fused too while the patch is on
        torch.manual_seed(9)
        y_module = nn.Dropout(0.3)(x)
    torch.manual_seed(9)
    expected = dr.functional.dropout(x, 0.3)
    assert torch.equal(y, expected) and torch.equal(y_module, expected)


def test_patch_under_torch_compile():
    import torch._inductor.config as inductor_config

    def f(t):
        return F.dropout(t, 0.3, True) * 2

    torch._dynamo.reset()
    try:
        with inductor_config.patch(fallback_random=True), dr.patch_functional():
            compiled = torch.compile(f, fullgraph=True)
            x = torch.ones(4096)
            torch.manual_seed(4)
            got = compiled(x)
        torch.manual_seed(4)
        assert torch.equal(got, dr.functional.dropout(x, 0.3) * 2)
    finally:
        torch._dynamo.reset()


def test_functional_calls_are_regularizer_sites():
    """Under the patch, F.dropout inside a capture is a site (its own p), like a module."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(F.dropout(torch.tanh(self.a(x)), 0.25, self.training))

    torch.manual_seed(0)
    net = Net().double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    with dr.patch_functional():
        with dr.record_sites(net) as sites:
            net(x)
        assert [s.q for s in sites] == [0.25]
        reg = dr.DropoutRegularizer(net, explicit="true", implicit=False)
        with reg.capture():
            logits = net(x)
        j, penalty, noise = reg.terms(logits, y)
    clean = F.cross_entropy(net.eval()(x), y)
    torch.testing.assert_close(j, clean)
    assert penalty > 0


def test_alpha_dropout_inside_a_capture_raises():
    net = nn.Sequential(nn.Linear(4, 4), dr.AlphaDropout(0.2), nn.Linear(4, 2))
    with dr.record_sites(net), pytest.raises(NotImplementedError, match="alpha dropout's noise is affine"):
        net(torch.randn(3, 4))
    with dr.patch_functional(), dr.record_sites(net), pytest.raises(NotImplementedError):
        F.alpha_dropout(torch.randn(3, 4, requires_grad=True), 0.2, True)
